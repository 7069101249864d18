import os

# Quiet TensorFlow's C++ start-up lines before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from hypothesis import settings  # noqa: E402

# Same examples on every run (nothing flaky in CI), and no example database left on disk.
settings.register_profile("book", derandomize=True, database=None, print_blob=True)
settings.load_profile("book")


import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def built_site():
    """Builds the site once per run, as `make book` does, with warnings as errors.

    Returns (path to _build/html, the build's log lines with WARNING or ERROR).
    """
    jb = pathlib.Path(sys.executable).with_name("jupyter-book")
    result = subprocess.run(
        [str(jb), "build", str(ROOT), "-W", "-n", "--keep-going"],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    log = result.stdout + result.stderr
    problems = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    if result.returncode != 0 and not problems:
        problems = [log[-3000:]]
    return ROOT / "_build" / "html", problems
