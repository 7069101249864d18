"""Grouped-query and multi-query attention (chapter 12): num_kv_heads, repeat_kv, the smaller KV cache.

References: torch's F.scaled_dot_product_attention(enable_gqa=True) around projections computed in
float64, torch.repeat_interleave for the head layout, torch.autograd for the NumPy backward, and
keras.layers.GroupQueryAttention loaded by mha.keras.to_builtin.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

import mha
import mha.numpy as mnp
from backends import BACKENDS, keras_builtin_mha, project, torch_sdpa_mha

ATOL = 1e-5
B, E, H, D = 2, 32, 8, 4
KV_HEADS = [8, 4, 1]  # H / Hkv = 1 (plain MHA), 2 (grouped-query), 8 (multi-query)
NAMES = ["numpy", "torch", "keras"]
RNG = np.random.default_rng(12)


def inputs(t: int, s: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x_q = rng.standard_normal((B, t, E)).astype(np.float32)
    x_kv = x_q if t == s and seed % 2 == 0 else rng.standard_normal((B, s, E)).astype(np.float32)
    return x_q, x_kv


def make_mask(kind: str, t: int, s: int):
    """Boolean masks, True = may attend, every query row keeping at least one key."""
    if kind == "none":
        return None
    if kind == "bool":
        keep = np.random.default_rng(t * s).random((B, 1, t, s)) < 0.6  # (B, 1, T, S): shared by the heads
        keep[..., 0] = True
        return keep
    if kind == "padding":
        return mnp.padding_mask([s, s - 2], s)  # (B, 1, 1, S)
    return mnp.causal_mask(t, s)  # (T, S), top-left


def reference_weights(w: mha.Weights, x_q, x_kv, mask) -> np.ndarray:
    """softmax(q k^T / sqrt(D)) in float64, each kv head repeated with torch.repeat_interleave: (B, H, T, S)."""
    q = torch.from_numpy(project(w, x_q, "q")).unflatten(-1, (H, D)).transpose(1, 2)  # (B, H, T, D)
    k = torch.from_numpy(project(w, x_kv, "k")).unflatten(-1, (w.num_kv_heads, D)).transpose(1, 2)  # (B, Hkv, S, D)
    k = k.repeat_interleave(H // w.num_kv_heads, dim=1)  # (B, H, S, D)
    scores = q @ k.transpose(-2, -1) / D**0.5  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~torch.from_numpy(np.asarray(mask)), float("-inf"))
    return torch.softmax(scores, dim=-1).numpy()


# repeat_kv

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_rep", [1, 2, 4])
def test_repeat_kv_is_repeat_interleave_on_the_head_axis(name, n_rep):
    b = BACKENDS[name]
    x = RNG.standard_normal((2, 3, 5, 4)).astype(np.float32)  # (B, Hkv, S, D)
    got = b.numpy(b.module.repeat_kv(b.tensor(x), n_rep))
    expected = torch.from_numpy(x).repeat_interleave(n_rep, dim=1).numpy()
    assert got.shape == (2, 3 * n_rep, 5, 4) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    for h in range(3 * n_rep):  # query head h reads kv head h // n_rep
        np.testing.assert_array_equal(got[:, h], x[:, h // n_rep])


# The layer against torch's SDPA with enable_gqa=True

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "padding", "causal"])
@pytest.mark.parametrize("t, s", [(6, 6), (5, 7)], ids=["self", "cross"])
def test_gqa_layer_matches_torch_sdpa_enable_gqa(name, num_kv_heads, bias, mask_kind, t, s):
    w = mha.Weights.random(E, H, bias=bias, seed=num_kv_heads, num_kv_heads=num_kv_heads)
    x_q, x_kv = inputs(t, s, seed=t + s)
    mask = make_mask(mask_kind, t, s)
    out, weights = BACKENDS[name].mha(w, x_q, x_kv, x_kv, mask=mask)
    assert out.shape == (B, t, E) and weights.shape == (B, H, t, s)
    assert out.dtype == weights.dtype == np.float32
    np.testing.assert_allclose(out, torch_sdpa_mha(w, x_q, x_kv, x_kv, mask), atol=ATOL)
    np.testing.assert_allclose(weights, reference_weights(w, x_q, x_kv, mask), atol=ATOL)


def test_heads_of_one_group_share_keys_and_values():
    """With H / Hkv = 4, heads 0-3 see the same keys: where their queries agree, so do their weights."""
    w = mha.Weights.random(E, H, seed=3, num_kv_heads=2)
    w.w_q[:, D:2 * D] = w.w_q[:, :D]  # head 1 asks what head 0 asks (same group)
    w.w_q[:, 4 * D:5 * D] = w.w_q[:, :D]  # head 4 asks it too, but reads the other group's keys
    w.b_q[D:2 * D], w.b_q[4 * D:5 * D] = w.b_q[:D], w.b_q[:D]
    x = inputs(6, 6)[0]
    weights = mnp.MultiHeadAttention.from_weights(w)(x)[1]
    np.testing.assert_array_equal(weights[:, 1], weights[:, 0])
    assert np.abs(weights[:, 4] - weights[:, 0]).max() > 0.01


# num_kv_heads == num_heads (or None) is exactly plain multi-head attention

def test_weights_with_num_kv_heads_none_or_h_are_the_plain_weights():
    plain = mha.Weights.random(E, H, seed=5)
    for w in (mha.Weights.random(E, H, seed=5, num_kv_heads=None), mha.Weights.random(E, H, seed=5, num_kv_heads=H)):
        assert w.num_kv_heads == plain.num_kv_heads == H
        for name in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o"):
            np.testing.assert_array_equal(getattr(w, name), getattr(plain, name))
        assert repr(w) == repr(plain) == "Weights(E=32, H=8, D=4, with bias)"
    import dataclasses
    assert [f.name for f in dataclasses.fields(plain)] == ["num_heads", "w_q", "w_k", "w_v", "w_o",
                                                          "b_q", "b_k", "b_v", "b_o"]


@pytest.mark.parametrize("name", NAMES)
def test_num_kv_heads_equal_to_num_heads_gives_exactly_plain_mha(name):
    b = BACKENDS[name]
    plain = mha.Weights.random(E, H, seed=6)
    x_q, x_kv = inputs(5, 7, seed=1)
    mask = make_mask("bool", 5, 7)
    expected = b.mha(plain, x_q, x_kv, x_kv, mask=mask)
    for num_kv_heads in (None, H):
        w = mha.Weights(H, plain.w_q, plain.w_k, plain.w_v, plain.w_o, *plain.biases(), num_kv_heads=num_kv_heads)
        got = b.mha(w, x_q, x_kv, x_kv, mask=mask)
        for a, e in zip(got, expected):
            np.testing.assert_array_equal(a, e)
        layer = b.module.MultiHeadAttention.from_weights(w)
        assert layer.num_kv_heads == H
        assert layer.get_weights().allclose(plain)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_get_weights_round_trips_gqa(name, num_kv_heads):
    w = mha.Weights.random(E, H, seed=7, num_kv_heads=num_kv_heads)
    layer = BACKENDS[name].module.MultiHeadAttention.from_weights(w)
    back = layer.get_weights()
    assert back.num_kv_heads == num_kv_heads and back.w_k.shape == back.w_v.shape == (E, num_kv_heads * D)
    assert back.b_k.shape == back.b_v.shape == (num_kv_heads * D,)
    assert back.allclose(w) and back.copy().allclose(w)
    assert not back.allclose(mha.Weights.random(E, H, seed=7))  # another Hkv: not the same weights
    assert layer.num_kv_heads == num_kv_heads


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_kv_heads", [None, 4, 1])
def test_constructor_sizes_the_kv_projections(name, num_kv_heads):
    layer = BACKENDS[name].module.MultiHeadAttention(E, H, num_kv_heads=num_kv_heads)
    w = layer.get_weights()
    hkv = H if num_kv_heads is None else num_kv_heads
    assert w.num_kv_heads == layer.num_kv_heads == hkv
    assert w.w_q.shape == w.w_o.shape == (E, E) and w.w_k.shape == w.w_v.shape == (E, hkv * D)


def test_weights_count_shrinks_by_the_kv_projections():
    """2 E (Hkv D) + 2 E^2 weights and 2 Hkv D + 2 E biases, against 4 E^2 + 4 E for MHA."""
    for hkv in KV_HEADS:
        w = mha.Weights.random(E, H, num_kv_heads=hkv)
        n = sum(a.size for a in (w.w_q, w.w_k, w.w_v, w.w_o, *w.biases()))
        assert n == 2 * E * E + 2 * E * hkv * D + 2 * E + 2 * hkv * D


# Decoding with a cache of Hkv heads

def decode_in_chunks(name: str, layer, x: np.ndarray, sizes: list[int]):
    b = BACKENDS[name]
    cache, outs, start = None, [], 0
    for size in sizes:
        out, weights, cache = layer.decode(b.tensor(x[:, start:start + size]), cache)
        start += size
        assert tuple(weights.shape) == (B, H, size, start)
        outs.append(b.numpy(out))
    return np.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
@pytest.mark.parametrize("sizes", [[1] * 7, [4, 1, 2], [7]], ids=["tokens", "prompt", "whole"])
def test_gqa_decoding_in_chunks_equals_the_full_causal_forward(name, num_kv_heads, sizes):
    b = BACKENDS[name]
    w = mha.Weights.random(E, H, seed=8, num_kv_heads=num_kv_heads)
    layer = b.module.MultiHeadAttention.from_weights(w)
    x = inputs(7, 7, seed=2)[0]
    out, cache = decode_in_chunks(name, layer, x, sizes)
    causal = mnp.causal_mask(7)
    np.testing.assert_allclose(out, torch_sdpa_mha(w, x, x, x, causal), atol=ATOL)
    full, _ = b.mha(w, x, mask=causal)
    np.testing.assert_allclose(out, full, atol=ATOL)
    k, v = b.numpy(cache.k), b.numpy(cache.v)
    assert k.shape == v.shape == (B, num_kv_heads, 7, D) and k.dtype == np.float32 and len(cache) == 7
    expected_k = project(w, x, "k").reshape(B, 7, num_kv_heads, D).transpose(0, 2, 1, 3)  # float64
    np.testing.assert_allclose(k, expected_k, atol=ATOL)


@pytest.mark.parametrize("name", NAMES)
def test_the_cache_shrinks_by_num_heads_over_num_kv_heads(name):
    b = BACKENDS[name]
    x = inputs(9, 9)[0]
    sizes = {}
    for hkv in KV_HEADS:
        layer = b.module.MultiHeadAttention.from_weights(mha.Weights.random(E, H, num_kv_heads=hkv))
        sizes[hkv] = decode_in_chunks(name, layer, x, [5, 4])[1].nbytes
    assert sizes[8] == 2 * B * H * 9 * D * 4  # k and v, float32: 2 B H S D * 4 bytes
    assert sizes[8] == 2 * sizes[4] == 8 * sizes[1]


@pytest.mark.parametrize("name", NAMES)
def test_a_cache_of_another_layers_shape_is_refused(name):
    b = BACKENDS[name]
    x = b.tensor(inputs(3, 3)[0])
    mha_layer = b.module.MultiHeadAttention.from_weights(mha.Weights.random(E, H))
    gqa_layer = b.module.MultiHeadAttention.from_weights(mha.Weights.random(E, H, num_kv_heads=2))
    mha_cache = mha_layer.decode(x)[2]
    gqa_cache = gqa_layer.decode(x)[2]
    with pytest.raises(ValueError, match=r"\(2, 8, 3, 4\).*\(2, 2, S, 4\)"):
        gqa_layer.decode(x, mha_cache)
    with pytest.raises(ValueError, match=r"\(2, 2, 3, 4\).*\(2, 8, S, 4\)"):
        mha_layer.decode(x, gqa_cache)


# The NumPy backward with a grouped k and v, against torch.autograd

@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_numpy_vjp_of_gqa_matches_torch_autograd(num_kv_heads):
    w = mha.Weights.random(E, H, seed=9, num_kv_heads=num_kv_heads)
    x_q, x_kv = inputs(5, 6, seed=3)
    mask = make_mask("bool", 5, 6)
    d_out = np.random.default_rng(4).standard_normal((B, 5, E)).astype(np.float32)
    d_q, d_k, d_v, d_w = mnp.MultiHeadAttention.from_weights(w).vjp(x_q, x_kv, x_kv, d_out, mask)
    params = {n: torch.tensor(getattr(w, n), dtype=torch.float64, requires_grad=True)
              for n in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")}
    xs = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x_q, x_kv, x_kv)]
    split = lambda a, h: a.unflatten(-1, (h, D)).transpose(1, 2)  # (B, L, h D) -> (B, h, L, D)
    q = split(xs[0] @ params["w_q"] + params["b_q"], H)
    k = split(xs[1] @ params["w_k"] + params["b_k"], num_kv_heads)
    v = split(xs[2] @ params["w_v"] + params["b_v"], num_kv_heads)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.from_numpy(mask), enable_gqa=True)
    y = o.transpose(1, 2).flatten(2) @ params["w_o"] + params["b_o"]
    y.backward(torch.from_numpy(d_out).double())
    for got, x in zip((d_q, d_k, d_v), xs):
        np.testing.assert_allclose(got, x.grad.numpy(), atol=ATOL)
    assert d_w.num_kv_heads == num_kv_heads
    for n, p in params.items():
        np.testing.assert_allclose(getattr(d_w, n), p.grad.numpy(), atol=ATOL)


# Bad input

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_kv_heads, error, words", [
    (3, ValueError, ["num_kv_heads=3", "num_heads=8"]),
    (16, ValueError, ["num_kv_heads=16", "num_heads=8"]),
    (0, ValueError, ["num_kv_heads=0"]),
    (-2, ValueError, ["num_kv_heads=-2"]),
    (2.0, TypeError, ["num_kv_heads", "float"]),
    (True, TypeError, ["num_kv_heads", "bool"]),
    ("2", TypeError, ["num_kv_heads", "str"]),
])
def test_bad_num_kv_heads_is_refused_on_entry(name, num_kv_heads, error, words):
    module = BACKENDS[name].module
    for make in (lambda: module.MultiHeadAttention(E, H, num_kv_heads=num_kv_heads),
                 lambda: mha.Weights.random(E, H, num_kv_heads=num_kv_heads)):
        with pytest.raises(error) as info:
            make()
        assert type(info.value) is error
        assert all(word in str(info.value) for word in words), str(info.value)


def test_weights_of_the_wrong_kv_width_are_refused():
    w = mha.Weights.random(E, H, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"w_k must have shape \(E, Hkv \* D\) = \(32, 8\).*got \(32, 32\)"):
        mha.Weights(H, w.w_q, np.zeros((E, E)), w.w_v, w.w_o, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"w_v must have shape \(E, E\) = \(32, 32\).*got \(32, 8\)"):
        mha.Weights(H, w.w_q, w.w_q, w.w_v, w.w_o)  # GQA-sized w_v without num_kv_heads
    with pytest.raises(ValueError, match=r"b_v must have shape \(Hkv \* D,\) = \(8,\).*got \(32,\)"):
        mha.Weights(H, w.w_q, w.w_k, w.w_v, w.w_o, b_v=np.zeros(E), num_kv_heads=2)


@pytest.mark.parametrize("name", NAMES)
def test_bad_repeat_kv_input_is_refused(name):
    b = BACKENDS[name]
    x = np.zeros((2, 3, 5, 4), np.float32)
    cases = [(x[0], 2, ValueError, "rank 4"), (x, 0, ValueError, "n_rep=0"), (x, 2.0, TypeError, "n_rep")]
    for arg, n_rep, error, word in cases:
        with pytest.raises(error) as info:
            b.module.repeat_kv(b.tensor(arg), n_rep)
        assert type(info.value) is error and word in str(info.value) and "repeat_kv" in str(info.value)


# The torch layer

def test_torch_layer_with_num_kv_heads_none_is_the_plain_module():
    torch.manual_seed(0)
    plain = mha.torch.MultiHeadAttention(E, H).state_dict()
    for num_kv_heads in (None, H):
        torch.manual_seed(0)
        layer = mha.torch.MultiHeadAttention(E, H, num_kv_heads=num_kv_heads)
        state = layer.state_dict()
        assert list(state) == list(plain) and repr(layer) == repr(mha.torch.MultiHeadAttention(E, H))
        for name, value in state.items():
            assert torch.equal(value, plain[name]), name


@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_torch_layer_and_its_gradients_match_sdpa_enable_gqa_on_its_own_projections(num_kv_heads):
    """The same nn.Linear modules around F.scaled_dot_product_attention(enable_gqa=True): outputs and grads."""
    torch.manual_seed(1)
    layer = mha.torch.MultiHeadAttention(E, H, num_kv_heads=num_kv_heads)
    assert layer.k_proj.weight.shape == layer.v_proj.weight.shape == (num_kv_heads * D, E)
    x_q, x_kv = (torch.from_numpy(a) for a in inputs(5, 7, seed=5))
    mask = torch.from_numpy(make_mask("bool", 5, 7))
    out, _ = layer(x_q, x_kv, mask=mask)
    grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
    q = mha.torch.split_heads(layer.q_proj(x_q), H)  # (B, H, T, D)
    k = mha.torch.split_heads(layer.k_proj(x_kv), num_kv_heads)  # (B, Hkv, S, D)
    v = mha.torch.split_heads(layer.v_proj(x_kv), num_kv_heads)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    expected = layer.out_proj(mha.torch.merge_heads(o))
    expected_grads = torch.autograd.grad(expected.square().sum(), list(layer.parameters()))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


def test_torch_to_builtin_refuses_gqa_weights():
    with pytest.raises(ValueError, match="num_kv_heads=2 < num_heads=8.*enable_gqa"):
        mha.torch.to_builtin(mha.Weights.random(E, H, num_kv_heads=2))


# keras.layers.GroupQueryAttention, loaded by mha.keras.to_builtin

@pytest.mark.parametrize("num_kv_heads", [4, 1])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_keras_to_builtin_gives_a_built_group_query_attention_carrying_w(num_kv_heads, bias):
    w = mha.Weights.random(E, H, bias=bias, seed=10, num_kv_heads=num_kv_heads)
    layer = mha.keras.to_builtin(w)
    assert isinstance(layer, keras.layers.GroupQueryAttention) and layer.built
    assert (layer.head_dim, layer.num_query_heads, layer.num_key_value_heads) == (D, H, num_kv_heads)
    # Its layout: query (E, H, D), key and value (E, Hkv, D), output (H, D, E); biases (H, D), (Hkv, D), (E,).
    parts = {"q": layer._query_dense, "k": layer._key_dense, "v": layer._value_dense, "o": layer._output_dense}
    heads = {"q": (E, H, D), "k": (E, num_kv_heads, D), "v": (E, num_kv_heads, D), "o": (H, D, E)}
    for n, part in parts.items():
        arrays = [mha.keras._numpy(v) for v in part.weights]  # [kernel] or [kernel, bias]
        assert len(arrays) == (2 if bias else 1)
        np.testing.assert_array_equal(arrays[0], getattr(w, f"w_{n}").reshape(heads[n]))
        if bias:
            np.testing.assert_array_equal(arrays[1].reshape(-1), getattr(w, f"b_{n}"))
            assert arrays[1].shape == ((E,) if n == "o" else heads[n][1:])
    n_ours = sum(a.size for a in (w.w_q, w.w_k, w.w_v, w.w_o, w.b_q, w.b_k, w.b_v, w.b_o) if a is not None)
    assert layer.count_params() == n_ours


def test_keras_to_builtin_keeps_multi_head_attention_when_num_kv_heads_is_h():
    assert type(mha.keras.to_builtin(mha.Weights.random(E, H, num_kv_heads=H))) is keras.layers.MultiHeadAttention


@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "padding", "causal"])
@pytest.mark.parametrize("t, s", [(6, 6), (5, 7)], ids=["self", "cross"])
def test_the_three_backends_match_keras_group_query_attention(num_kv_heads, bias, mask_kind, t, s):
    """Keras's layer: the same mask meaning (True = may attend, (B, T, S)) and scores (B, H, T, S)."""
    w = mha.Weights.random(E, H, bias=bias, seed=20 + num_kv_heads, num_kv_heads=num_kv_heads)
    x_q, x_kv = inputs(t, s, seed=t + s + 1)
    mask = make_mask(mask_kind, t, s)
    keras_out, keras_scores = keras_builtin_mha(w, x_q, x_kv, x_kv, mask)
    results = {name: BACKENDS[name].mha(w, x_q, x_kv, x_kv, mask=mask) for name in NAMES}
    for out, weights in results.values():
        assert keras_scores.shape == weights.shape == (B, H, t, s)
        np.testing.assert_allclose(out, keras_out, atol=ATOL)
        np.testing.assert_allclose(weights, keras_scores, atol=ATOL)
    for out, weights in results.values():  # and each other
        np.testing.assert_allclose(out, results["numpy"][0], atol=ATOL)
        np.testing.assert_allclose(weights, results["numpy"][1], atol=ATOL)


@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_keras_group_query_attention_fused_path_agrees_too(num_kv_heads):
    """Without return_attention_scores Keras takes ops.dot_product_attention: the same output."""
    w = mha.Weights.random(E, H, seed=30, num_kv_heads=num_kv_heads)
    x_q, x_kv = inputs(5, 7, seed=7)
    mask = make_mask("bool", 5, 7)
    layer = mha.keras.to_builtin(w)
    fused = layer(x_q, x_kv, attention_mask=mha.keras.to_builtin_mask(mask, B, 5, 7))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fused), torch_sdpa_mha(w, x_q, x_kv, x_kv, mask), atol=ATOL)


def test_keras_group_query_attention_on_a_fully_masked_row():
    """A query that may attend nothing: zero weights on Keras's scores path, as ours; uniform on its fused path."""
    w = mha.Weights.random(E, H, seed=31, num_kv_heads=2)
    x = inputs(3, 3)[0]
    keep = np.ones((B, 3, 3), bool)
    keep[0, 1] = False  # query 1 of sequence 0 may attend no key
    layer = mha.keras.to_builtin(w)
    out, scores = (keras.ops.convert_to_numpy(a) for a in layer(x, x, attention_mask=keep, return_attention_scores=True))
    fused = keras.ops.convert_to_numpy(layer(x, x, attention_mask=keep))
    ours, weights = mnp.MultiHeadAttention.from_weights(w)(x, mask=keep[:, None])
    assert not scores[0, :, 1].any() and not weights[0, :, 1].any()
    np.testing.assert_allclose(out, ours, atol=ATOL)
    v = project(w, x, "v").reshape(B, 3, 2, D).transpose(0, 2, 1, 3)  # (B, Hkv, S, D)
    uniform = np.repeat(v.mean(axis=2), H // 2, axis=1).reshape(B, E)  # every key weighted 1/S
    expected = project(w, uniform[:, None], "o")[:, 0]
    np.testing.assert_allclose(fused[0, 1], expected[0], atol=ATOL)
    np.testing.assert_allclose(fused[1], ours[1], atol=ATOL)  # the rows with keys agree


def test_keras_layer_config_names_num_kv_heads_only_for_gqa():
    plain = mha.keras.MultiHeadAttention(E, H, name="attn").get_config()
    assert "num_kv_heads" not in plain
    assert mha.keras.MultiHeadAttention(E, H, num_kv_heads=None, name="attn").get_config() == plain
    assert mha.keras.MultiHeadAttention(E, H, num_kv_heads=H, name="attn").get_config() == plain
    config = mha.keras.MultiHeadAttention(E, H, num_kv_heads=2).get_config()
    assert config["num_kv_heads"] == 2
    assert mha.keras.MultiHeadAttention.from_config(config).num_kv_heads == 2
