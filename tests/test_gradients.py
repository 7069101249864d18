"""The NumPy backward pass (chapter 9) against torch.autograd, TensorFlow's GradientTape and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mha
import mha.keras
import mha.numpy as mnp
import mha.torch

ATOL = RTOL = 1e-5  # float32 against autograd
FD_RTOL = 1e-6  # float64 central differences (h = 1e-6) against the vjp
MASKS = ("none", "padding", "causal", "combined", "fully_masked")
GRAD_NAMES = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")


def make_mask(kind: str, b: int, t: int, s: int, rng: np.random.Generator):
    """A mask in our convention (True = may attend); "fully_masked" has whole query rows that may attend nothing."""
    lengths = rng.integers(1, s + 1, size=b)
    if kind == "none":
        return None
    if kind == "padding":
        return mnp.padding_mask(lengths, s)  # (B, 1, 1, S)
    if kind == "causal":
        return mnp.causal_mask(t, s)  # (T, S)
    if kind == "combined":
        return mnp.padding_mask(lengths, s) & mnp.causal_mask(t, s)  # (B, 1, T, S)
    mask = rng.random((b, 1, t, s)) < 0.6  # random holes, and then
    mask[0, :, 0, :] = False  # query 0 of sequence 0 may attend nothing
    return mask


@st.composite
def attention_cases(draw):
    """q (B, H, T, D), k (B, H, S, D), v (B, H, S, Dv) with T != S allowed, and a mask of every kind."""
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    t, s, d, dv = (draw(st.integers(1, n)) for n in (5, 6, 4, 4))
    kind = draw(st.sampled_from(MASKS))
    shared_kv = draw(st.booleans())  # k and v of shape (1, 1, S, .): broadcast over batch and heads
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    kv_lead = (1, 1) if shared_kv else (b, h)
    q = rng.standard_normal((b, h, t, d))
    k, v = rng.standard_normal((*kv_lead, s, d)), rng.standard_normal((*kv_lead, s, dv))
    d_out = rng.standard_normal((b, h, t, dv))
    return q, k, v, d_out, make_mask(kind, b, t, s, rng)


@st.composite
def layer_cases(draw):
    """A layer (H = 1 or several, with or without bias), inputs (B, T, E), (B, S, E), a gradient and a mask."""
    b, h, d = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3])), draw(st.integers(1, 3))
    t, s = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    bias, kind = draw(st.booleans()), draw(st.sampled_from(MASKS))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    w = mha.Weights.random(h * d, h, bias=bias, seed=seed)
    x_q, x_k, x_v, d_out = (rng.standard_normal(shape).astype(np.float32)
                            for shape in ((b, t, h * d), (b, s, h * d), (b, s, h * d), (b, t, h * d)))
    return w, x_q, x_k, x_v, d_out, make_mask(kind, b, t, s, rng)


def f32(*arrays):
    return [None if a is None else np.asarray(a, np.float32) for a in arrays]


def torch_sdpa_grads(q, k, v, d_out, mask):
    """torch.autograd through PyTorch's own F.scaled_dot_product_attention (fully masked rows: zeros, since 2.5)."""
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    attn_mask = None if mask is None else torch.tensor(mask)
    out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=attn_mask)
    out.backward(torch.tensor(d_out))
    return [x.grad.numpy() for x in (tq, tk, tv)]


def torch_layer_grads(w, x_q, x_k, x_v, d_out, mask):
    """torch.autograd through mha.torch.MultiHeadAttention: the three input gradients and an mha.Weights."""
    layer = mha.torch.MultiHeadAttention.from_weights(w)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (x_q, x_k, x_v))
    out, _ = layer(tq, tk, tv, mask=None if mask is None else torch.tensor(mask))
    out.backward(torch.tensor(d_out))
    projs = layer._projections()
    zeros = np.zeros(w.d_model, np.float32)
    biases = [zeros if p.bias is None else p.bias.grad.numpy() for p in projs]
    grads = mha.Weights(w.num_heads, *(p.weight.grad.numpy().T for p in projs), *biases)
    return tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy(), grads


def keras_layer_grads(w, x_q, x_k, x_v, d_out, mask):
    """TensorFlow's GradientTape through mha.keras.MultiHeadAttention."""
    layer = mha.keras.MultiHeadAttention.from_weights(w)
    tq, tk, tv = (tf.constant(a) for a in (x_q, x_k, x_v))
    with tf.GradientTape() as tape:
        tape.watch([tq, tk, tv])
        out, _ = layer(tq, tk, tv, mask=None if mask is None else tf.constant(mask))
        loss = tf.reduce_sum(out * d_out)
    variables = [*layer.kernels, *(b for b in layer.biases if b is not None)]
    d_q, d_k, d_v, *d_vars = (g.numpy() for g in tape.gradient(loss, [tq, tk, tv, *variables]))
    zeros = np.zeros(w.d_model, np.float32)
    biases = d_vars[4:] if w.has_bias else [zeros] * 4
    return d_q, d_k, d_v, mha.Weights(w.num_heads, *d_vars[:4], *biases)


def assert_weights_close(ours: mha.Weights, ref: mha.Weights, atol=ATOL, rtol=RTOL):
    for name in GRAD_NAMES:
        np.testing.assert_allclose(getattr(ours, name), getattr(ref, name), atol=atol, rtol=rtol, err_msg=name)


# scaled_dot_product_attention_vjp

@settings(max_examples=40, deadline=None)
@given(attention_cases())
def test_attention_vjp_matches_torch_autograd(case):
    q, k, v, d_out, mask = case
    q, k, v, d_out = f32(q, k, v, d_out)
    ours = mnp.scaled_dot_product_attention_vjp(q, k, v, d_out, mask)
    for mine, ref, name in zip(ours, torch_sdpa_grads(q, k, v, d_out, mask), ("d_q", "d_k", "d_v")):
        assert mine.dtype == np.float32 and mine.shape == ref.shape, name
        np.testing.assert_allclose(mine, ref, atol=ATOL, rtol=RTOL, err_msg=name)


def loss64(q, k, v, d_out, mask):
    return np.sum(mnp.scaled_dot_product_attention(q, k, v, mask)[0] * d_out)


@settings(max_examples=30, deadline=None)
@given(attention_cases(), st.integers(0, 2**16))
def test_attention_vjp_matches_finite_differences(case, seed):
    """Along a random direction u of (q, k, v): (L(x + h u) - L(x - h u)) / 2h equals <grad, u>, in float64."""
    q, k, v, d_out, mask = case
    grads = mnp.scaled_dot_product_attention_vjp(q, k, v, d_out, mask)
    assert all(g.dtype == np.float64 for g in grads)
    rng = np.random.default_rng(seed)
    u = [rng.standard_normal(x.shape) for x in (q, k, v)]
    h = 1e-6
    plus = loss64(*(x + h * du for x, du in zip((q, k, v), u)), d_out, mask)
    minus = loss64(*(x - h * du for x, du in zip((q, k, v), u)), d_out, mask)
    numeric = (plus - minus) / (2 * h)
    analytic = sum(np.sum(g * du) for g, du in zip(grads, u))
    scale = sum(np.abs(g * du).sum() for g, du in zip(grads, u)) + 1e-12
    assert abs(numeric - analytic) <= FD_RTOL * scale, (numeric, analytic)


def test_attention_vjp_every_entry_by_finite_differences():
    """One small case, every entry of d_q, d_k and d_v against a central difference."""
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 3))
    d_out = rng.standard_normal((2, 3, 3))
    mask = mnp.causal_mask(3, 5)
    grads = mnp.scaled_dot_product_attention_vjp(q, k, v, d_out, mask)
    h = 1e-6
    for i, x in enumerate((q, k, v)):
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            args = [q, k, v]
            for sign in (1, -1):
                shifted = x.copy()
                shifted[idx] += sign * h
                args[i] = shifted
                numeric[idx] += sign * loss64(*args, d_out, mask) / (2 * h)
        np.testing.assert_allclose(grads[i], numeric, atol=1e-8, rtol=1e-6)


def test_fully_masked_rows_give_zero_gradients():
    rng = np.random.default_rng(1)
    q, k, v, d_out = f32(*(rng.standard_normal(s) for s in ((2, 4, 3), (2, 5, 3), (2, 5, 2), (2, 4, 2))))
    mask = np.ones((2, 4, 5), bool)
    mask[0, 1] = False  # query 1 of sequence 0 may attend nothing
    mask[1] = False  # sequence 1 may attend nothing at all
    d_q, d_k, d_v = mnp.scaled_dot_product_attention_vjp(q, k, v, d_out, mask)
    assert np.isfinite(d_q).all() and np.isfinite(d_k).all() and np.isfinite(d_v).all()
    assert not d_q[0, 1].any() and not d_q[1].any() and not d_k[1].any() and not d_v[1].any()
    assert d_q[0, 0].any()  # the other rows still learn


def test_softmax_vjp_is_the_jacobian_transpose_times_g():
    """softmax_vjp(a, g) == (diag(a) - a a^T)^T g, the Jacobian built in full, along any axis."""
    rng = np.random.default_rng(2)
    x, g = rng.standard_normal((3, 6, 4)).astype(np.float32), rng.standard_normal((3, 6, 4)).astype(np.float32)
    for axis in (-1, 1, 0):
        a = mnp.softmax(x, axis=axis)
        am, gm = np.moveaxis(a, axis, -1), np.moveaxis(g, axis, -1)  # (..., n)
        jac = am[..., :, None] * np.eye(am.shape[-1], dtype=np.float32) - am[..., :, None] * am[..., None, :]
        full = np.moveaxis(np.einsum("...ji,...j->...i", jac, gm), -1, axis)
        ours = mnp.softmax_vjp(a, g, axis=axis)
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, full, atol=1e-6)


# MultiHeadAttention.vjp

@settings(max_examples=30, deadline=None)
@given(layer_cases())
def test_layer_vjp_matches_torch_autograd(case):
    w, x_q, x_k, x_v, d_out, mask = case
    d_q, d_k, d_v, d_w = mnp.MultiHeadAttention.from_weights(w).vjp(x_q, x_k, x_v, d_out, mask)
    r_q, r_k, r_v, r_w = torch_layer_grads(w, x_q, x_k, x_v, d_out, mask)
    for mine, ref in ((d_q, r_q), (d_k, r_k), (d_v, r_v)):
        assert mine.dtype == np.float32
        np.testing.assert_allclose(mine, ref, atol=ATOL, rtol=RTOL)
    assert_weights_close(d_w, r_w)
    if not w.has_bias:
        assert not any(b.any() for b in d_w.biases())  # zeros where the layer has no bias


@settings(max_examples=12, deadline=None)
@given(layer_cases())
def test_layer_vjp_matches_keras_gradient_tape(case):
    w, x_q, x_k, x_v, d_out, mask = case
    d_q, d_k, d_v, d_w = mnp.MultiHeadAttention.from_weights(w).vjp(x_q, x_k, x_v, d_out, mask)
    r_q, r_k, r_v, r_w = keras_layer_grads(w, x_q, x_k, x_v, d_out, mask)
    for mine, ref in ((d_q, r_q), (d_k, r_k), (d_v, r_v)):
        np.testing.assert_allclose(mine, ref, atol=ATOL, rtol=RTOL)
    assert_weights_close(d_w, r_w)


def float64_layer(w: mha.Weights) -> mnp.MultiHeadAttention:
    """The NumPy layer carrying w's numbers in float64 (mha.Weights itself is float32 by contract)."""
    layer = mnp.MultiHeadAttention.from_weights(w)
    for name in GRAD_NAMES:
        if getattr(w, name) is not None:
            setattr(layer._w, name, getattr(w, name).astype(np.float64))
    return layer


@settings(max_examples=20, deadline=None)
@given(layer_cases(), st.integers(0, 2**16))
def test_layer_vjp_matches_finite_differences(case, seed):
    """Along one random direction of the inputs, weights and biases together, in float64.

    The vjp's d_weights come back as float32 (an mha.Weights), so the bound is float32's relative precision.
    """
    w, x_q, x_k, x_v, d_out, mask = case
    layer = float64_layer(w)
    xs = [x.astype(np.float64) for x in (x_q, x_k, x_v)]
    d_q, d_k, d_v, d_w = layer.vjp(*xs, d_out.astype(np.float64), mask)
    names = [n for n in GRAD_NAMES if getattr(w, n) is not None]  # the layer's parameters
    params = {n: getattr(layer._w, n) for n in names}
    rng = np.random.default_rng(seed)
    u_x = [rng.standard_normal(x.shape) for x in xs]
    u_p = {n: rng.standard_normal(params[n].shape) for n in names}
    h = 1e-6

    def loss(sign):
        for n in names:
            setattr(layer._w, n, params[n] + sign * h * u_p[n])
        return np.sum(layer(*(x + sign * h * du for x, du in zip(xs, u_x)), mask)[0] * d_out)

    numeric = (loss(1) - loss(-1)) / (2 * h)
    terms = [g * du for g, du in zip((d_q, d_k, d_v), u_x)] + [getattr(d_w, n) * u_p[n] for n in names]
    analytic = sum(np.sum(t) for t in terms)
    assert abs(numeric - analytic) <= 1e-6 * (sum(np.abs(t).sum() for t in terms) + 1e-12), (numeric, analytic)
    if not w.has_bias:
        assert not any(b.any() for b in d_w.biases())


def test_self_attention_gradient_is_the_sum_of_three():
    """With query = key = value = x, d_x = d_query + d_key + d_value, as torch.autograd finds with one tensor."""
    w = mha.Weights.random(8, 2, seed=3)
    rng = np.random.default_rng(3)
    x, d_out = rng.standard_normal((2, 5, 8)).astype(np.float32), rng.standard_normal((2, 5, 8)).astype(np.float32)
    mask = mnp.causal_mask(5)
    d_q, d_k, d_v, _ = mnp.MultiHeadAttention.from_weights(w).vjp(x, x, x, d_out, mask)
    tx = torch.tensor(x, requires_grad=True)
    out, _ = mha.torch.MultiHeadAttention.from_weights(w)(tx, mask=torch.tensor(mask))
    out.backward(torch.tensor(d_out))
    np.testing.assert_allclose(d_q + d_k + d_v, tx.grad.numpy(), atol=ATOL, rtol=RTOL)


def test_key_bias_gradient_is_zero():
    """b_K adds q_i . b_K to every score of row i: softmax ignores it, so its gradient vanishes (chapter 9)."""
    w = mha.Weights.random(12, 3, seed=4)
    rng = np.random.default_rng(4)
    x_q, x_kv, d_out = (rng.standard_normal(s).astype(np.float32) for s in ((2, 4, 12), (2, 7, 12), (2, 4, 12)))
    mask = make_mask("fully_masked", 2, 4, 7, rng)
    _, _, _, d_w = mnp.MultiHeadAttention.from_weights(w).vjp(x_q, x_kv, x_kv, d_out, mask)
    assert np.abs(d_w.b_k).max() <= 1e-6 * np.abs(d_w.b_q).max()
    assert np.abs(d_w.b_q).max() > 0.1


def test_nn_multihead_attention_gives_nan_gradients_on_a_fully_masked_row():
    """The built-in layer's NaN output row poisons every weight gradient; ours stay finite."""
    w = mha.Weights.random(8, 2, seed=5)
    rng = np.random.default_rng(5)
    x, d_out = rng.standard_normal((1, 4, 8)).astype(np.float32), rng.standard_normal((1, 4, 8)).astype(np.float32)
    mask = np.ones((1, 1, 4, 4), bool)
    mask[..., 2, :] = False
    builtin = mha.torch.to_builtin(w).train()
    tx = torch.tensor(x, requires_grad=True)
    attn_mask = mha.torch.to_builtin_mask(torch.tensor(mask), 1, 2, 4, 4)
    out, _ = builtin(tx, tx, tx, attn_mask=attn_mask)
    out.backward(torch.tensor(d_out))
    assert torch.isnan(builtin.in_proj_weight.grad).any() and torch.isnan(tx.grad).any()
    grads = mnp.MultiHeadAttention.from_weights(w).vjp(x, x, x, d_out, mask)
    assert all(np.isfinite(g).all() for g in grads[:3]) and np.isfinite(grads[3].w_q).all()


def test_vjp_input_errors():
    q, k, v = np.zeros((2, 3, 4), np.float32), np.zeros((2, 5, 4), np.float32), np.zeros((2, 5, 6), np.float32)
    with pytest.raises(ValueError, match=r"d_out must have the output's shape \(\.\.\., T, Dv\) = \(2, 3, 6\)"):
        mnp.scaled_dot_product_attention_vjp(q, k, v, np.zeros((2, 3, 4), np.float32))
    with pytest.raises(TypeError, match="d_out must be a float tensor"):
        mnp.scaled_dot_product_attention_vjp(q, k, v, np.zeros((2, 3, 6), np.int64))
    with pytest.raises(ValueError, match="key and value must have the same length S"):
        mnp.scaled_dot_product_attention_vjp(q, k, v[:, :2], np.zeros((2, 3, 6), np.float32))
    with pytest.raises(ValueError, match=r"d_weights must have the output's shape weights.shape = \(2, 3\)"):
        mnp.softmax_vjp(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    layer = mnp.MultiHeadAttention(8, 2)
    x = np.zeros((2, 3, 8), np.float32)
    with pytest.raises(ValueError, match=r"d_out must have the output's shape \(B, T, E\) = \(2, 3, 8\)"):
        layer.vjp(x, x, x, np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="does not broadcast to the scores' shape"):
        layer.vjp(x, x, x, x, mask=np.ones((4, 4), bool))
