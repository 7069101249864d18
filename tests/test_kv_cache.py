"""Decoding with a key/value cache (chapter 11): chunks of any sizes equal the full causal forward; masks' alignment."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import mha
import mha.keras
import mha.numpy as mnp
import mha.torch

ATOL = 1e-5
B, E, H, T_MAX = 2, 16, 4, 10

TENSOR = {"numpy": np.asarray, "torch": torch.from_numpy, "keras": keras.ops.convert_to_tensor}
NUMPY = {"numpy": np.asarray, "torch": lambda x: x.detach().numpy(), "keras": keras.ops.convert_to_numpy}
MODULES = {"numpy": mnp, "torch": mha.torch, "keras": mha.keras}
W = mha.Weights.random(E, H, seed=11)
LAYERS = {name: module.MultiHeadAttention.from_weights(W) for name, module in MODULES.items()}
X = np.random.default_rng(11).standard_normal((B, T_MAX, E)).astype(np.float32)


def full_forward(backend: str, t: int):
    """The whole sequence at once, with the square causal mask: the answer decode must give."""
    layer, tensor, numpy = LAYERS[backend], TENSOR[backend], NUMPY[backend]
    out, weights = layer(tensor(X[:, :t]), mask=tensor(np.asarray(mnp.causal_mask(t))))
    return numpy(out), numpy(weights)


def decode_in_chunks(backend: str, sizes: list[int]):
    """Feeds X[:, :sum(sizes)] chunk by chunk; weights padded with trailing zeros to the full width."""
    layer, tensor, numpy = LAYERS[backend], TENSOR[backend], NUMPY[backend]
    t = sum(sizes)
    cache, outs, rows, start = None, [], [], 0
    for size in sizes:
        out, weights, cache = layer.decode(tensor(X[:, start:start + size]), cache)
        start += size
        weights = numpy(weights)
        assert weights.shape == (B, H, size, start) and len(cache) == start
        outs.append(numpy(out))
        rows.append(np.pad(weights, ((0, 0), (0, 0), (0, 0), (0, t - start))))  # keys not seen yet: weight 0
    return np.concatenate(outs, axis=1), np.concatenate(rows, axis=2), cache


chunkings = st.lists(st.integers(1, 4), min_size=1, max_size=6).filter(lambda sizes: sum(sizes) <= T_MAX)


@pytest.mark.parametrize("backend", list(MODULES))
@settings(max_examples=12, deadline=None)
@given(sizes=chunkings)
@example(sizes=[1] * T_MAX)  # one token at a time
@example(sizes=[1, 9])  # a first chunk of one token, then the rest
@example(sizes=[T_MAX])  # a single chunk of everything: the plain causal forward
@example(sizes=[7, 1, 2])  # a prompt, then tokens
def test_decoding_in_any_chunks_equals_the_full_causal_forward(backend, sizes):
    out, weights, cache = decode_in_chunks(backend, sizes)
    full_out, full_weights = full_forward(backend, sum(sizes))
    np.testing.assert_allclose(out, full_out, atol=ATOL)
    np.testing.assert_allclose(weights, full_weights, atol=ATOL)
    assert out.dtype == weights.dtype == np.float32


@pytest.mark.parametrize("backend", list(MODULES))
def test_the_cache_holds_every_tokens_keys_and_values(backend):
    _, _, cache = decode_in_chunks(backend, [3, 1, 4])
    k, v = NUMPY[backend](cache.k), NUMPY[backend](cache.v)
    x = X[:, :8].astype(np.float64)
    for got, w, b in ((k, W.w_k, W.b_k), (v, W.w_v, W.b_v)):
        expected = (x @ w + b).reshape(B, 8, H, E // H).transpose(0, 2, 1, 3)  # (B, H, S, D), in float64
        assert got.shape == (B, H, 8, E // H) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=ATOL)
    assert len(cache) == 8 and cache.nbytes == 2 * B * H * 8 * (E // H) * 4 == k.nbytes + v.nbytes


@pytest.mark.parametrize("backend", list(MODULES))
def test_decode_leaves_the_old_cache_as_it_was(backend):
    layer, tensor = LAYERS[backend], TENSOR[backend]
    _, _, cache = layer.decode(tensor(X[:, :3]))
    before = NUMPY[backend](cache.k).copy()
    _, _, longer = layer.decode(tensor(X[:, 3:5]), cache)
    assert len(cache) == 3 and len(longer) == 5
    np.testing.assert_array_equal(NUMPY[backend](cache.k), before)


def _error(call):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return type(info.value), str(info.value)


def bad_decodes(backend: str) -> dict:
    module, tensor = MODULES[backend], TENSOR[backend]
    layer = LAYERS[backend]
    _, _, cache = layer.decode(tensor(X[:, :3]))
    two_heads = module.MultiHeadAttention.from_weights(mha.Weights.random(E, 2, seed=1))
    _, _, other_batch = layer.decode(tensor(X[:1, :3]))
    return {
        "x of the wrong width": lambda: layer.decode(tensor(X[:, 3:4, :-1]), cache),
        "x of rank 2": lambda: layer.decode(tensor(X[0, 3:4]), cache),
        "integer x": lambda: layer.decode(tensor(X[:, 3:4].astype(np.int32)), cache),
        "a cache from a layer of another shape": lambda: two_heads.decode(tensor(X[:, 3:4]), cache),
        "a cache of another batch": lambda: layer.decode(tensor(X[:, 3:4]), other_batch),
        "a cache that is not a KVCache": lambda: layer.decode(tensor(X[:, 3:4]), (cache.k, cache.v)),
        "a mask (decode's mask is always causal)": lambda: layer.decode(tensor(X[:, 3:4]), cache, mask=None),
    }


def test_bad_decode_input_gets_the_same_error_in_every_backend():
    errors = {backend: {case: _error(call) for case, call in bad_decodes(backend).items()} for backend in MODULES}
    for case, (kind, message) in errors["numpy"].items():
        for backend in ("torch", "keras"):
            other_kind, other_message = errors[backend][case]
            assert other_kind is kind, (case, backend, other_kind)
            if "mask" not in case:  # Python's own message names the class
                assert other_message == message, (case, backend, other_message)
    numpy_errors = errors["numpy"]
    assert numpy_errors["x of the wrong width"] == (
        ValueError, "MultiHeadAttention.decode: x must have shape (B, T_new, E) with E = d_model = 16, got (2, 1, 15)"
    )
    kind, message = numpy_errors["a cache from a layer of another shape"]
    assert kind is ValueError and "(2, 4, 3, 4)" in message and "(2, 2, S, 8)" in message
    kind, message = numpy_errors["a cache of another batch"]
    assert kind is ValueError and "(1, 4, 3, 4)" in message and "(2, 4, S, 4)" in message
    assert numpy_errors["a cache that is not a KVCache"][0] is TypeError
    assert "KVCache" in numpy_errors["a cache that is not a KVCache"][1]
    assert numpy_errors["a mask (decode's mask is always causal)"][0] is TypeError


# The alignment of a causal mask when T != S.

SIZES = [(t, s) for t in range(1, 6) for s in range(1, 7)]


def as_numpy(mask) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(mask)) if not isinstance(mask, (np.ndarray, torch.Tensor)) else (
        mask.numpy() if isinstance(mask, torch.Tensor) else mask)


@pytest.mark.parametrize("name", list(MODULES))
def test_bottom_right_is_torchs_causal_lower_right_and_top_left_its_upper_left(name):
    module = MODULES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that T > S leaves rows with no key
        for t, s in SIZES:
            bottom_right = as_numpy(module.causal_mask(t, s, align="bottom-right"))
            top_left = as_numpy(module.causal_mask(t, s, align="top-left"))
            assert bottom_right.dtype == top_left.dtype == np.bool_ and bottom_right.shape == (t, s)
            np.testing.assert_array_equal(bottom_right, causal_lower_right(t, s)._materialize().numpy())
            np.testing.assert_array_equal(top_left, causal_upper_left(t, s)._materialize().numpy())
            np.testing.assert_array_equal(as_numpy(module.causal_mask(t, s)), top_left)  # the default
    np.testing.assert_array_equal(as_numpy(module.causal_mask(4, align="bottom-right")), np.tril(np.ones((4, 4), bool)))


def test_top_left_is_what_is_causal_and_use_causal_mask_do():
    rng = np.random.default_rng(0)
    t, s, d = 3, 5, 8
    q, k, v = (torch.from_numpy(rng.standard_normal((1, 2, n, d)).astype(np.float32)) for n in (t, s, s))
    for align, kwargs in (("top-left", {"is_causal": True}), ("bottom-right", {"attn_mask": causal_lower_right(t, s)})):
        ours = mha.torch.scaled_dot_product_attention(q, k, v, mha.torch.causal_mask(t, s, align=align))[0]
        torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, **kwargs), atol=ATOL, rtol=0)
    w = mha.Weights.random(d, 2, seed=0)
    x_q = rng.standard_normal((1, t, d)).astype(np.float32)
    x_kv = rng.standard_normal((1, s, d)).astype(np.float32)
    _, weights = mha.keras.to_builtin(w)(x_q, x_kv, use_causal_mask=True, return_attention_scores=True)
    keep = keras.ops.convert_to_numpy(weights)[0, 0] > 0
    np.testing.assert_array_equal(keep, mnp.causal_mask(t, s))


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("align", ["bottom_right", "lower-right", "Top-Left", None, 1])
def test_an_unknown_align_is_a_value_error_naming_the_allowed_values(name, align):
    with pytest.raises(ValueError) as info:
        MODULES[name].causal_mask(3, 5, align=align)
    assert str(info.value) == f"causal_mask: align must be one of ('top-left', 'bottom-right'), got align={align!r}"
