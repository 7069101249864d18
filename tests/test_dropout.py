"""Dropout on the attention weights (chapter 9), in all three backends."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

import mha
import mha.keras
import mha.numpy as mnp
import mha.torch


def test_p0_and_eval_change_nothing():
    w = mha.Weights.random(8, 2, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    ref = mnp.MultiHeadAttention.from_weights(w)(x)[0]
    assert np.array_equal(mnp.MultiHeadAttention.from_weights(w, dropout=0.5)(x)[0], ref)  # training=False
    assert np.array_equal(mnp.MultiHeadAttention.from_weights(w)(x, training=True)[0], ref)  # p = 0
    t = mha.torch.MultiHeadAttention.from_weights(w, dropout=0.5).eval()
    np.testing.assert_allclose(t(torch.tensor(x))[0].detach().numpy(), ref, atol=1e-5)
    k = mha.keras.MultiHeadAttention.from_weights(w, dropout=0.5, seed=0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(k(x, training=False)[0]), ref, atol=1e-5)


@pytest.mark.parametrize("backend", ["numpy", "torch", "keras"])
def test_fraction_dropped_mean_and_pre_dropout_weights(backend):
    """v = identity makes the output the dropped weights. Bounds: 5 standard deviations, seeded."""
    p, n, s = 0.25, 400, 6
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((n, 4, 3)).astype(np.float32), rng.standard_normal((n, s, 3)).astype(np.float32)
    q[:], k[:] = q[0], k[0]  # n copies of one case: independent draws of the same dropout
    v = np.broadcast_to(np.eye(s, dtype=np.float32), (n, s, s)).copy()
    mask = np.ones((4, s), bool)
    mask[2] = False  # a fully masked row
    if backend == "numpy":
        out, a = mnp.scaled_dot_product_attention(q, k, v, mask, dropout=p, rng=np.random.default_rng(0))
    elif backend == "torch":
        g = torch.Generator().manual_seed(0)
        out, a = (t.numpy() for t in mha.torch.scaled_dot_product_attention(
            *(torch.tensor(x) for x in (q, k, v, mask)), dropout=p, rng=g))
    else:
        out, a = (keras.ops.convert_to_numpy(t) for t in mha.keras.scaled_dot_product_attention(
            q, k, v, mask, dropout=p, rng=0))
    ref = mnp.scaled_dot_product_attention(q, k, v, mask)[1]
    assert out.dtype == np.float32
    np.testing.assert_allclose(a, ref, atol=1e-6)  # the returned weights are before dropout
    assert not out[:, 2].any()  # the fully masked row stays zero
    live = ref > 0
    frac = np.mean(out[live] == 0)
    assert abs(frac - p) <= 5 * np.sqrt(p * (1 - p) / live.sum())
    kept = out[live] != 0
    np.testing.assert_allclose(out[live][kept], ref[live][kept] / (1 - p), rtol=1e-6)
    std = np.sqrt(p / (1 - p)) * ref[0] / np.sqrt(n)  # of the mean over n draws, entry by entry
    assert np.all(np.abs(out.mean(0) - ref[0]) <= 5 * std + 1e-6)


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan"), "0.1", True])
def test_bad_dropout_same_error_everywhere(bad):
    x = np.zeros((1, 2, 4), np.float32)
    calls = {
        "sdpa": [lambda: mnp.scaled_dot_product_attention(x, x, x, dropout=bad),
                 lambda: mha.torch.scaled_dot_product_attention(*(torch.tensor(x),) * 3, dropout=bad),
                 lambda: mha.keras.scaled_dot_product_attention(x, x, x, dropout=bad)],
        "layer": [lambda: mnp.MultiHeadAttention(4, 2, dropout=bad),
                  lambda: mha.torch.MultiHeadAttention(4, 2, dropout=bad),
                  lambda: mha.keras.MultiHeadAttention(4, 2, dropout=bad)],
    }
    for fs in calls.values():
        messages = set()
        for f in fs:
            with pytest.raises((ValueError, TypeError), match="dropout") as e:
                f()
            messages.add(f"{e.type.__name__}: {e.value}")
        assert len(messages) == 1, messages
