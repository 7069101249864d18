"""mha.keras on Keras's JAX and torch backends: the Keras agreement, numerics and error tests, rerun.

Every other test runs Keras on TensorFlow (tests/conftest.py). Keras picks its backend once, at
import, so each other backend gets a pytest subprocess of its own with KERAS_BACKEND set; it runs
the tests whose names say keras (our layer and functions against keras.layers.MultiHeadAttention,
the NumPy reference, the error table, the position table, RoPE and the sliding window with
Keras's own sliding_window) plus the parametrized all-implementations table, which
includes keras.layers.MultiHeadAttention on that backend. The hypothesis property tests stay on
TensorFlow only, to keep `make test` short. The torch run is its own file,
tests/test_keras_backends_torch.py, so that `make test` (a file per worker) runs the two at once.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time


ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = ["tests/test_agreement.py", "tests/test_numerics.py", "tests/test_errors.py", "tests/test_positions.py",
         "tests/test_gqa.py", "tests/test_rope.py", "tests/test_sliding_window.py"]
SELECT = "keras or largest_differences or all_implementations_agree"
# JAX compiles each new shape on its first eager call (about 0.5 s a case here): of the
# all-implementations table it runs the four-head half, and of the two grouped-query tables
# the half with biases; both keep every mask, T/S and num_kv_heads case.
SELECT_FOR = {"jax": "(keras or largest_differences or (all_implementations_agree and -4-))"
                     " and not (test_gqa and no_bias)"}

# Each backend's own environment, and the warnings Keras itself triggers there (not our code):
EXTRA = {
    # JAX computes in float32 and int32 unless x64 is on: with it, float64 and int64 inputs stay
    # what they are, as on TensorFlow and torch, so the dtype tests mean the same thing.
    # Compiling is most of the run (about 1,500 small programs: every op at every shape), so XLA's
    # programs are kept on disk in _build/jax-cache and a second run loads them instead (the
    # cache's key is the program, the JAX version and the flags): 90 s alone cold, 40 s warm.
    "jax": ({"JAX_ENABLE_X64": "1", "JAX_COMPILATION_CACHE_DIR": str(ROOT / "_build" / "jax-cache"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
             "JAX_COMPILATION_CACHE_MAX_SIZE": str(256 * 2**20)}, []),
    # keras/src/backend/torch/core.py's convert_to_numpy calls np.array(tensor); torch 2.13's
    # Tensor.__array__ takes no `copy` argument, and NumPy 2 warns about that.
    "torch": (
        {},
        ["ignore:__array__ implementation doesn't accept a copy keyword"
         ":DeprecationWarning:keras.src.backend.torch.core"],
    ),
}


def test_keras_tests_pass_on_jax():
    run_on_backend("jax")


def run_on_backend(backend: str) -> None:
    """Runs FILES' Keras tests in a pytest subprocess with KERAS_BACKEND=backend; fails with its log."""
    env_extra, filters = EXTRA[backend]
    env = {**os.environ, "KERAS_BACKEND": backend, **env_extra}
    cmd = [sys.executable, "-m", "pytest", *FILES, "-k", SELECT_FOR.get(backend, SELECT), "-q", "-p", "no:nbval",
           "-o", "addopts=-p no:cacheprovider", "-o", "testpaths=tests", "-s"]
    for f in filters:
        cmd += ["-W", f]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert f"backend {backend}" in log, log[-3000:]  # the subprocess really ran that backend
    summary = re.findall(r"^\d+ passed.*$", log, re.M)
    assert summary and "failed" not in summary[-1], log[-3000:]
    print(f"KERAS_BACKEND={backend}: {summary[-1]} ({seconds:.0f} s)")
    for line in log.splitlines():
        if " out " in line and "weights" in line:
            print("  ", line.strip())
