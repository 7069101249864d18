"""mha.keras on Keras's JAX and torch backends: the Keras agreement, numerics and error tests, rerun.

Every other test runs Keras on TensorFlow (tests/conftest.py). Keras picks its backend once, at
import, so each other backend gets a pytest subprocess of its own with KERAS_BACKEND set; it runs
the tests whose names say keras (our layer and functions against keras.layers.MultiHeadAttention,
the NumPy reference, the error table, the position table, RoPE and the sliding window with
Keras's own sliding_window) plus the parametrized all-implementations table, which
includes keras.layers.MultiHeadAttention on that backend. The hypothesis property tests stay on
TensorFlow only, to keep `make test` short.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = ["tests/test_agreement.py", "tests/test_numerics.py", "tests/test_errors.py", "tests/test_positions.py",
         "tests/test_rope.py", "tests/test_sliding_window.py", "tests/test_gqa.py"]
SELECT = "keras or largest_differences or all_implementations_agree"
# JAX compiles each new shape on its first eager call (about 0.5 s a case here): of the
# all-implementations table it runs the four-head half, which keeps every mask and T/S case.
SELECT_FOR = {"jax": "keras or largest_differences or (all_implementations_agree and -4-)"}

# Each backend's own environment, and the warnings Keras itself triggers there (not our code):
EXTRA = {
    # JAX computes in float32 and int32 unless x64 is on: with it, float64 and int64 inputs stay
    # what they are, as on TensorFlow and torch, so the dtype tests mean the same thing.
    "jax": ({"JAX_ENABLE_X64": "1"}, []),
    # keras/src/backend/torch/core.py's convert_to_numpy calls np.array(tensor); torch 2.13's
    # Tensor.__array__ takes no `copy` argument, and NumPy 2 warns about that.
    "torch": (
        {},
        ["ignore:__array__ implementation doesn't accept a copy keyword"
         ":DeprecationWarning:keras.src.backend.torch.core"],
    ),
}


@pytest.mark.parametrize("backend", list(EXTRA))
def test_keras_tests_pass_on_backend(backend):
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
