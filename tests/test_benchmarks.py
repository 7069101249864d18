"""`make bench` keeps working: a two-length sweep of all eight contestants, and the lower bound's arithmetic.

The full benchmark takes minutes and its timings cannot be compared; what can
break silently is a contestant that no longer runs, no longer agrees with
mha.numpy, or a CSV that loses a column, and a lower bound that stops running
the products it claims to run.
"""

from __future__ import annotations

import csv
import pathlib
import sys
from unittest import mock

import numpy as np
import pytest

import mha
from mha import numpy as mnp

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # run.py imports its siblings as top-level modules, as `python benchmarks/run.py`

import contestants  # noqa: E402
import measure  # noqa: E402
import run  # noqa: E402


def test_one_length_sweep_writes_csv_and_plots(tmp_path):
    run.main(["--lengths", "64", "128", "--runs", "1", "--no-targets", "--out", str(tmp_path)])
    with open(tmp_path / "attention.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["implementation"], int(r["T"])) for r in rows] == [
        (name, t) for t in (64, 128) for name in contestants.CONTESTANTS
    ]
    for row in rows:
        assert float(row["max_abs_diff_vs_numpy"]) <= 1e-5, row
        assert 0 < float(row["time_median_s"]) < 10, row
    for name in ("time.png", "memory.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("exp_and_sum", [False, True])
def test_lower_bound_runs_the_layers_products(exp_and_sum):
    """The same six products as the layer, on the same numbers, written out with plain operators."""
    b, t, e, h = 2, 16, 32, 4
    w = mha.Weights.random(e, h, seed=1)
    x = np.random.default_rng(1).standard_normal((b, t, e)).astype(np.float32)
    x2 = x.reshape(b * t, e)
    q, k, v = (mnp.split_heads((x2 @ m).reshape(b, t, e), h) for m in (w.w_q, w.w_k, w.w_v))
    scores = q @ np.swapaxes(k, -1, -2)  # (B, H, T, T), unscaled and unnormalized
    if exp_and_sum:
        scores = np.exp(scores)
    expected = (scores @ v).reshape(b * t, e) @ w.w_o  # the heads are not merged: only the product's size counts
    forward = contestants.make_numpy_lower_bound(w, exp_and_sum=exp_and_sum)
    np.testing.assert_allclose(forward(x), expected, rtol=1e-5, atol=1e-5)


def test_lower_bound_allocates_nothing_once_warm():
    w = mha.Weights.random(64, 4, seed=2)
    x = np.random.default_rng(2).standard_normal((2, 128, 64)).astype(np.float32)
    forward = contestants.make_numpy_lower_bound(w, exp_and_sum=True)
    forward(x)  # allocates its buffers
    peak_mib, _ = measure.traced_peak_mib(lambda: forward(x))  # the benchmark's own tracemalloc measure
    scores_mib = 2 * 4 * 128 * 128 * 4 / measure.MIB
    assert peak_mib < scores_mib / 8, f"{peak_mib} MiB allocated by a warm call; the scores alone are {scores_mib}"


@pytest.mark.parametrize(("name", "function"), [
    ("mha.numpy fast", "fast_scaled_dot_product_attention"), ("mha.numpy tiled", "tiled_attention"),
])
def test_numpy_contestants_time_the_function_they_name(name, function):
    """Each NumPy contestant calls its attention function once per forward, and the reference's never."""
    w = mha.Weights.random(32, 4, seed=3)
    x = np.random.default_rng(3).standard_normal((2, 16, 32)).astype(np.float32)
    forward, xin = contestants.build(name, w, x)
    real = getattr(mnp, function)
    with mock.patch.object(mnp, function, side_effect=real) as named, \
            mock.patch.object(mnp, "scaled_dot_product_attention") as reference:
        out = forward(xin)
    assert named.call_count == 1 and reference.call_count == 0
    np.testing.assert_allclose(out, mnp.MultiHeadAttention.from_weights(w)(x)[0], atol=1e-5)
