import os

# Quiet TensorFlow's C++ start-up lines before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# make test runs two workers on two cores. After each call, OpenBLAS's (NumPy's) idle threads spin
# for about 0.1 s waiting for more work (0.10-0.11 s on the machine of 2026-12-08), and libgomp's
# (PyTorch's OpenMP) for 300,000 spins by default, on a core the other worker needs: a warm make test
# took 192 s and 350 busy CPU-seconds with the libraries' defaults, 170-180 s and 302-304 with the
# spinning cut (three runs, 2026-12-04).
# Only speed changes: nbval compares no timing, and the only timings asserted (chapter 13's np.exp
# against np.exp2, in child processes; test_benchmarks' probe, only that it is positive) are of
# single-threaded ufuncs. The kernels and subprocesses the tests start inherit these settings
# (chapter 13 measures the spin and sets its pause from it, so its pauses are shorter here too);
# `make notebooks` (the stored outputs, chapter 13's timings among them) keeps the defaults.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # spin 2^4 cycles, OpenBLAS's least
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hypothesis import settings  # noqa: E402

# Same examples on every run (nothing flaky in CI), and no example database left on disk.
settings.register_profile("book", derandomize=True, database=None, print_blob=True)
settings.load_profile("book")


import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _build_site() -> list[str]:
    jb = pathlib.Path(sys.executable).with_name("jupyter-book")
    result = subprocess.run(
        [str(jb), "build", str(ROOT), "-W", "-n", "--keep-going"],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    log = result.stdout + result.stderr
    problems = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    if result.returncode != 0 and not problems:
        problems = [log[-3000:]]
    return problems


@pytest.fixture(scope="session")
def built_site():
    """Builds the site once per run, as `make book` does, with warnings as errors.

    Returns (path to _build/html, the build's log lines with WARNING or ERROR).
    Under pytest-xdist (`make test`) the first worker that needs the site builds it
    while holding a lock; the others wait, then read its result, so that two
    builds never write into _build/ at once.
    """
    html = ROOT / "_build" / "html"
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        return html, _build_site()
    (ROOT / "_build").mkdir(exist_ok=True)
    stamp = ROOT / "_build" / f".built-{run}.json"
    with FileLock(str(ROOT / "_build" / ".build.lock")):
        if not stamp.exists():
            for old in (ROOT / "_build").glob(".built-*.json"):
                old.unlink()
            stamp.write_text(json.dumps(_build_site()))
        return html, json.loads(stamp.read_text())



# The files that take longest go first (make test hands whole files to the workers in collection
# order, with --no-loadscope-reorder: by default pytest-xdist 3.8 hands out the files with the most
# tests first, which put the one-test Keras-backend runs last), so that the last file to finish is
# not a long one started late. Each file's tests keep their order. Worker seconds of a warm make
# test on 2 cores, 2026-12-04: chapter 13 102, test_site.py 78, test_keras_backends.py (JAX) 32,
# test_colab.py 17, chapter 8 16, test_benchmarks.py 15, chapter 7 13,
# test_keras_backends_torch.py 9; every other file under 10.
# (Not --dist loadgroup: under pytest 9.2 it no longer groups, pytest-xdist #1386.)
LONGEST_FIRST = ["13_fast_attention.ipynb", "test_site.py", "test_keras_backends.py", "test_colab.py",
                 "08_encoder_block.ipynb", "test_benchmarks.py", "07_three_frameworks.ipynb",
                 "test_keras_backends_torch.py"]


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable
