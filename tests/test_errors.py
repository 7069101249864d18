"""Bad input gets one clear sentence on entry: the same exception type in every backend.

Each row builds a call from a backend's adapter; the test checks the exact
exception type (not a subclass such as NumPy's AxisError or a framework
error) and that the message names the argument and the shapes.
"""

from __future__ import annotations

import numpy as np
import pytest

import mha
from backends import BACKENDS

f32 = lambda *shape: np.zeros(shape, np.float32)
E8 = np.eye(8, dtype=np.float32)


def sdpa(q, k, v, mask=None):
    return lambda b: b.module.scaled_dot_product_attention(
        b.tensor(q), b.tensor(k), b.tensor(v), None if mask is None else b.tensor(mask)
    )


def layer_call(x_q, x_k=None, x_v=None, mask=None, d_model=8, num_heads=2):
    def call(b):
        layer = b.module.MultiHeadAttention.from_weights(mha.Weights.random(d_model, num_heads))
        t = lambda a: None if a is None else b.tensor(a)
        return layer(t(x_q), t(x_k), t(x_v), mask=t(mask))

    return call


BAD_INPUTS = [
    # (id, call, exception, fragments the message must contain)
    ("d_model not divisible by num_heads", lambda b: b.module.MultiHeadAttention(10, 3), ValueError, ["d_model=10", "num_heads=3"]),
    ("d_model zero", lambda b: b.module.MultiHeadAttention(0, 1), ValueError, ["d_model", "0"]),
    ("num_heads negative", lambda b: b.module.MultiHeadAttention(8, -2), ValueError, ["num_heads", "-2"]),
    ("num_heads a float", lambda b: b.module.MultiHeadAttention(8, 2.0), TypeError, ["num_heads", "float"]),
    ("q/k head sizes differ", sdpa(f32(2, 3, 8), f32(2, 4, 4), f32(2, 4, 4)), ValueError, ["head size", "(2, 3, 8)", "(2, 4, 4)"]),
    ("k/v lengths differ", sdpa(f32(2, 3, 8), f32(2, 4, 8), f32(2, 5, 8)), ValueError, ["length S", "(2, 4, 8)", "(2, 5, 8)"]),
    ("query of rank 1", sdpa(f32(8), f32(4, 8), f32(4, 8)), ValueError, ["query", "rank", "(8,)"]),
    ("batch axes do not broadcast", sdpa(f32(2, 3, 8), f32(3, 4, 8), f32(3, 4, 8)), ValueError, ["(2, 3, 8)", "(3, 4, 8)"]),
    ("integer query", sdpa(np.zeros((2, 3, 8), np.int64), f32(2, 4, 8), f32(2, 4, 8)), TypeError, ["query", "int64", "(2, 3, 8)"]),
    ("mixed dtypes", sdpa(f32(2, 3, 8), np.zeros((2, 4, 8)), f32(2, 4, 8)), TypeError, ["float32", "float64"]),
    ("float mask", sdpa(f32(2, 3, 8), f32(2, 4, 8), f32(2, 4, 8), np.ones((3, 4), np.float32)), TypeError, ["mask", "boolean", "float32", "(3, 4)"]),
    ("integer 0/1 mask", sdpa(f32(2, 3, 8), f32(2, 4, 8), f32(2, 4, 8), np.ones((3, 4), np.int32)), TypeError, ["mask", "boolean", "int32"]),
    ("mask (S, T) instead of (T, S)", sdpa(f32(2, 3, 8), f32(2, 4, 8), f32(2, 4, 8), np.ones((4, 3), bool)), ValueError, ["mask", "(4, 3)", "(2, 3, 4)"]),
    ("mask of higher rank", sdpa(f32(3, 8), f32(4, 8), f32(4, 8), np.ones((2, 3, 4), bool)), ValueError, ["mask", "(2, 3, 4)", "(3, 4)"]),
    ("split_heads on rank 2", lambda b: b.module.split_heads(b.tensor(f32(3, 8)), 2), ValueError, ["split_heads", "(B, T, E)", "(3, 8)"]),
    ("split_heads E not divisible", lambda b: b.module.split_heads(b.tensor(f32(1, 3, 10)), 4), ValueError, ["d_model=10", "num_heads=4"]),
    ("split_heads zero heads", lambda b: b.module.split_heads(b.tensor(f32(1, 3, 8)), 0), ValueError, ["num_heads", "0"]),
    ("merge_heads on rank 3", lambda b: b.module.merge_heads(b.tensor(f32(2, 3, 8))), ValueError, ["merge_heads", "(B, H, T, D)", "(2, 3, 8)"]),
    ("Weights w_k of the wrong shape", lambda b: b.module.MultiHeadAttention.from_weights(mha.Weights(2, E8, E8[:, :4], E8, E8)), ValueError, ["w_k", "(8, 4)", "(8, 8)"]),
    ("Weights bias of the wrong shape", lambda b: b.module.MultiHeadAttention.from_weights(mha.Weights(2, E8, E8, E8, E8, b_q=np.zeros(4))), ValueError, ["b_q", "(4,)", "(8,)"]),
    ("Weights heads do not divide E", lambda b: b.module.MultiHeadAttention.from_weights(mha.Weights(3, E8, E8, E8, E8)), ValueError, ["d_model=8", "num_heads=3"]),
    ("layer input of the wrong width", layer_call(f32(2, 3, 6)), ValueError, ["query", "d_model = 8", "(2, 3, 6)"]),
    ("layer input of rank 2", layer_call(f32(3, 8)), ValueError, ["query", "(B, length, E)", "(3, 8)"]),
    ("layer key/value lengths differ", layer_call(f32(2, 3, 8), f32(2, 4, 8), f32(2, 5, 8)), ValueError, ["key", "value", "(2, 4, 8)", "(2, 5, 8)"]),
    ("layer batch sizes differ", layer_call(f32(2, 3, 8), f32(3, 4, 8)), ValueError, ["batch size", "(2, 3, 8)", "(3, 4, 8)"]),
    ("layer integer input", layer_call(np.zeros((2, 3, 8), np.int32)), TypeError, ["query", "int32"]),
    ("layer mask that does not broadcast", layer_call(f32(2, 3, 8), mask=np.ones((2, 1, 4, 3), bool)), ValueError, ["mask", "(2, 1, 4, 3)", "(2, 2, 3, 3)"]),
    ("layer float mask", layer_call(f32(2, 3, 8), mask=np.ones((3, 3), np.float32)), TypeError, ["mask", "boolean", "float32"]),
    ("causal_mask of size 0", lambda b: b.module.causal_mask(0), ValueError, ["t", "0"]),
    ("causal_mask of a float size", lambda b: b.module.causal_mask(3, 2.5), TypeError, ["s", "float"]),
    ("padding length beyond s", lambda b: b.module.padding_mask([2, 7], 5), ValueError, ["lengths", "[2, 7]", "s=5"]),
    ("negative padding length", lambda b: b.module.padding_mask([-1, 3], 5), ValueError, ["lengths", "[-1, 3]"]),
    ("float padding lengths", lambda b: b.module.padding_mask(np.array([2.0, 3.0]), 5), TypeError, ["lengths", "float64"]),
    ("padding lengths of rank 2", lambda b: b.module.padding_mask([[2, 3]], 5), ValueError, ["lengths", "(1, 2)"]),
    ("softmax axis out of range", lambda b: b.module.softmax(b.tensor(f32(2, 3)), axis=2), ValueError, ["axis=2", "rank 2"]),
    ("softmax of integers", lambda b: b.module.softmax(b.tensor(np.arange(3))), TypeError, ["softmax", "int64"]),
]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("call,exc,fragments", [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_raises_clearly(backend, call, exc, fragments):
    with pytest.raises(Exception) as info:
        call(BACKENDS[backend])
    assert type(info.value) is exc, f"{backend} raised {type(info.value).__name__}: {info.value}"
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{backend}: message lacks {missing}: {message}"


def test_the_table_covers_the_contract():
    """BOOK.md's list of bad inputs, each with at least one row."""
    ids = " | ".join(row[0] for row in BAD_INPUTS)
    for topic in ["divisible", "head sizes", "lengths differ", "mask", "rank", "Weights", "zero", "negative"]:
        assert topic in ids, topic
    print(f"{len(BAD_INPUTS)} bad inputs x {len(BACKENDS)} backends")


def test_torch_rejects_numpy_arrays_by_name():
    import mha.torch

    with pytest.raises(TypeError, match="query must be a torch.Tensor, got ndarray"):
        mha.torch.scaled_dot_product_attention(f32(2, 3), f32(2, 3), f32(2, 3))


def test_torch_layer_rejects_a_dtype_it_does_not_hold():
    import torch

    import mha.torch

    layer = mha.torch.MultiHeadAttention(8, 2)
    with pytest.raises(TypeError, match="layer's dtype float32.*float64"):
        layer(torch.zeros(1, 3, 8, dtype=torch.float64))
