"""`make bench` keeps working: the like-for-like table on small cases, a two-length sweep of all eight
contestants, and the lower bound's arithmetic.

The full benchmark takes minutes and its timings cannot be compared; what can
break silently is a pair whose two sides no longer do the same work or agree,
a memory figure that no longer comes from a fresh process, a CSV that loses a
column, and a lower bound that stops running the products it claims to run.
"""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
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
import pairs  # noqa: E402
import run  # noqa: E402
import table  # noqa: E402

SMALL_LAYER = [pairs.Case(2, 64), pairs.Case(2, 64, True)]
SMALL_ATTENTION = [pairs.Case(1, 300)]


def small_cases(names):
    """The small cases of each implementation: attention ones, layer ones, no causal case for a floor."""
    def small(name):
        if pairs.IMPLEMENTATIONS[name][1] is pairs.ATTENTION_CASES:
            return SMALL_ATTENTION
        return [c for c in SMALL_LAYER if not (name in pairs.FLOORS and c.causal)]
    return {n: small(n) for n in names}


def test_like_for_like_table_on_small_cases():
    """Every torch and NumPy row, memory from child processes, one timed round: the two sides agree."""
    floors = ["floor: NumPy products", "floor: out of place"]
    names = ["mha.torch", "nn.MultiheadAttention", "mha.numpy", *floors,
             "mha.numpy.fixed_shift_attention", "F.scaled_dot_product_attention"]
    rows = [r for r in pairs.ROWS if r.ours in names]
    lines = []
    got = table.like_for_like(1, lines.append, rows=rows, names=names, cases_of=small_cases(names))
    assert [(r["ours"], r["case"]) for r in got] == [
        (r.ours, c.label) for r in rows + [pairs.Row(f, "", None, None) for f in floors]
        for c in small_cases(names)[r.ours]]
    for r in got:
        assert float(r["ours_ms"]) > 0 and float(r["reference_ms"]) > 0
        assert float(r["reference_peak_mib"]) >= 0
        if r["ours"] == "floor: NumPy products":  # it computes no layer: no output to check, no memory
            assert r["max_abs_diff"] == r["ours_peak_mib"] == r["memory"] == "", r
        else:
            assert float(r["max_abs_diff"]) <= 1e-5, r
    floor = [r for r in got if r["ours"] == "floor: out of place"]
    assert floor and all(float(r["ours_peak_mib"]) > 0 and float(r["memory"]) > 0 for r in floor), floor
    assert sum("in its own process" in line for line in lines) == len(names) - 1  # the products floor needs none
    nn_rows = [r for r in got if r["reference"] == "nn.MultiheadAttention" and r["time_limit"]]
    assert all("_native_multi_head_attention" in r["note"] for r in nn_rows)  # its fused path ran
    assert "| mha.torch | nn.MultiheadAttention | B=2 T=64 causal |" in table.markdown(got)


def test_keras_pair_does_the_same_work():
    """Both Keras layers return (out, weights (B, H, T, S)) and agree, with and without the causal mask."""
    for case in SMALL_LAYER:
        ours, theirs = (pairs.to_numpy(pairs.IMPLEMENTATIONS[n][0](case)())
                        for n in ("mha.keras", "keras MultiHeadAttention"))
        assert len(ours) == len(theirs) == 2 and ours[1].shape == theirs[1].shape == (2, pairs.H, 64, 64)
        assert table.max_diff(ours, theirs) <= 1e-5


def test_memory_child_measures_a_known_allocation():
    """The child's figure counts what a call allocates: mha.numpy's weights at least, (B, H, T, S) float32."""
    peaks = table.memory_in_fresh_processes(["mha.numpy"], {"mha.numpy": [pairs.Case(4, 512)]}, lambda _: None)
    weights_mib = 4 * pairs.H * 512 * 512 * 4 / measure.MIB
    assert weights_mib <= peaks["mha.numpy", "B=4 T=512 no mask"] < 6 * weights_mib


def test_memory_child_runs_with_a_fixed_mmap_threshold():
    """Each child gets MALLOC_MMAP_THRESHOLD_, so its figure does not depend on glibc's moving threshold."""
    envs = []

    def child(cmd, env, **kwargs):
        envs.append(env)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"B=4 T=512 no mask": 1.0}\n', stderr="")

    with mock.patch.object(table.subprocess, "run", child):
        table.memory_in_fresh_processes(["mha.numpy", "mha.torch"], {n: [pairs.Case(4, 512)] for n in
                                                                      ("mha.numpy", "mha.torch")}, lambda _: None)
    assert [e["MALLOC_MMAP_THRESHOLD_"] for e in envs] == [str(table.MMAP_THRESHOLD_BYTES)] * 2
    assert all(e["PATH"] == os.environ["PATH"] for e in envs)  # the rest of the environment is kept


def test_one_length_sweep_writes_csv_and_plots(tmp_path):
    run.main(["--no-table", "--sweep", "--lengths", "64", "128", "--runs", "1", "--out", str(tmp_path)])
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


def test_out_of_place_floor_is_the_layer_with_two_score_arrays():
    """The out-of-place floor returns what mha.numpy's layer returns, with two (B, H, T, S) arrays alive
    at its peak (a step's input and output) where the reference holds three."""
    b, t, e, h = 2, 256, 64, 4
    w = mha.Weights.random(e, h, seed=4)
    x = np.random.default_rng(4).standard_normal((b, t, e)).astype(np.float32)
    forward = contestants.make_numpy_out_of_place(w)
    layer = mnp.MultiHeadAttention.from_weights(w)
    for got, expected in zip(forward(x), layer(x)):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    scores_mib = b * h * t * t * 4 / measure.MIB  # the rest (inputs, projections) is under 1/4 of this
    floor_mib, _ = measure.traced_peak_mib(lambda: forward(x))
    reference_mib, _ = measure.traced_peak_mib(lambda: layer(x))
    assert 2 <= floor_mib / scores_mib < 2.5, floor_mib / scores_mib
    assert 3 <= reference_mib / scores_mib < 3.5, reference_mib / scores_mib


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


def test_exp_probe_times_both_exps_on_one_block():
    """The figures the bench prints for its own process time np.exp and np.exp2, 100 calls each."""
    with (mock.patch.object(np, "exp", wraps=np.exp) as exp, mock.patch.object(np, "exp2", wraps=np.exp2) as exp2):
        exp_us, exp2_us = measure.exp_microseconds()
    assert exp.call_count == exp2.call_count == 100
    assert exp.call_args.args[0].shape == (512, 512) and exp.call_args.args[0].dtype == np.float32
    assert 0 < exp_us < 1e5 and 0 < exp2_us < 1e5
