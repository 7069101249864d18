"""The eight multi-head attention forwards the benchmark races, all carrying one `mha.Weights`.

Each `make_*` function takes the weights and returns `forward(x)`, a function of a
NumPy (B, T, E) float32 input that runs one self-attention forward (no mask) and
returns its output as a NumPy array (the lower bound and the out-of-place floor below, which are
not among the eight, excepted). Inputs are converted to each framework's
tensors once, before timing; converting the output back is part of the forward
(it is a copy of a (B, T, E) array, negligible next to attention).
"""

from __future__ import annotations

import math

import numpy as np

import mha
from mha import numpy as mnp


def make_numpy(w: mha.Weights):
    layer = mnp.MultiHeadAttention.from_weights(w)
    return lambda x: layer(x)[0]  # it also returns the (B, H, T, S) weights: it computes them either way


def _numpy_around(w: mha.Weights, attention):
    """mha.numpy's projections around `attention(q, k, v)`, which returns the (B, H, T, D) heads."""
    h = w.num_heads

    def forward(x):
        b, t, e = x.shape
        x2 = x.reshape(b * t, e)  # (B, T, E) -> (B*T, E): one matrix product per projection
        q, k, v = (mnp.split_heads((x2 @ w_ + b_).reshape(b, t, e), h)
                   for w_, b_ in ((w.w_q, w.b_q), (w.w_k, w.b_k), (w.w_v, w.b_v)))  # (B, H, T, D)
        return mnp.merge_heads(attention(q, k, v)) @ w.w_o + w.b_o  # (B, H, T, D) -> (B, T, E)

    return forward


def make_numpy_fast(w: mha.Weights):
    """The same projections, with chapter 13's fast_scaled_dot_product_attention in the middle.

    It forms and returns the same (B, H, T, S) weights as the reference, in one array.
    """
    return _numpy_around(w, lambda q, k, v: mnp.fast_scaled_dot_product_attention(q, k, v)[0])


def make_numpy_tiled(w: mha.Weights):
    """The same projections as mha.numpy, with tiled_attention in the middle: no (T, S) matrix."""
    return _numpy_around(w, lambda q, k, v: mnp.tiled_attention(q, k, v))


def make_numpy_lower_bound(w: mha.Weights, exp_and_sum: bool = False):
    """Not a contestant: a lower bound on the time of *any* NumPy forward built on np.matmul.

    It runs exactly the matrix products of mha.numpy's forward (the four projections, QK^T and
    weights @ V) with every product written with `out=` into buffers allocated once, outside
    the timing: no time goes to allocating or to page faults, and there is no softmax, bias or
    scaling. With `exp_and_sum` it adds the least any softmax must do, one np.exp per score
    and one sum per row (no max subtracted, no division), both in place. Its output is
    meaningless; only its time counts.
    """
    h = w.num_heads
    buffers = {}

    def forward(x):
        b, t, e = x.shape
        if x.shape not in buffers:
            buffers[x.shape] = [np.empty(s, np.float32) for s in [(3, b * t, e), (b, h, t, e // h), (b, h, t, t),
                                                                  (b, h, t, 1), (b, h, t, e // h), (b * t, e)]]
        qkv, k_t, scores, sums, heads, out = buffers[x.shape]
        x2 = x.reshape(b * t, e)  # (B, T, E) -> (B*T, E)
        for i, w_ in enumerate((w.w_q, w.w_k, w.w_v)):
            np.matmul(x2, w_, out=qkv[i])  # (B*T, E) @ (E, E)
        q, k, v = (mnp.split_heads(a.reshape(b, t, e), h) for a in qkv)  # views (B, H, T, D)
        np.copyto(k_t, k)  # contiguous keys, as in mha.numpy
        np.matmul(q, np.swapaxes(k_t, -1, -2), out=scores)  # (B, H, T, D) @ (B, H, D, S)
        if exp_and_sum:
            np.exp(scores, out=scores)  # unscaled, yet below 15 in size here: no overflow
            np.sum(scores, axis=-1, keepdims=True, out=sums)
        np.matmul(scores, v, out=heads)  # (B, H, T, S) @ (B, H, S, D)
        return np.matmul(heads.reshape(b * t, e), w.w_o, out=out)  # (B*T, E) @ (E, E); heads not merged

    return forward


def make_numpy_out_of_place(w: mha.Weights):
    """Not a contestant: the layer's formula, every step a new array, holding as little as that allows.

    The steps are the reference's (the four projections with their biases, q k^T / sqrt(D),
    the row max, exp(scores - max), the row sums, the division, weights @ v), each allocating
    its result, nothing written in place and no buffers kept (BOOK.md, in ../shared/ from the
    repository root). The scores are made inside the function that takes their softmax, under
    one name that each step rebinds, so the array before a step is freed as soon as the step is
    done: at most two (B, H, T, S) arrays are alive at once, a step's input and its output, the
    least any code on whole arrays that writes nothing in place can hold. The reference holds
    three, because its softmax keeps its input under a name through every step (the scores,
    x - m and exp(x - m) at once). No input checks, no mask, no guard for fully masked rows. It
    returns what the layer returns.
    """
    h = w.num_heads

    def weights_of(q, k):  # the scores exist only under s: each rebinding frees the array before
        s = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, S)
        s = s - np.max(s, axis=-1, keepdims=True)
        s = np.exp(s)
        return s / np.sum(s, axis=-1, keepdims=True)

    def forward(x):
        q, k, v = (mnp.split_heads(x @ w_ + b_, h)  # (B, T, E) -> (B, H, T, D)
                   for w_, b_ in zip((w.w_q, w.w_k, w.w_v), w.biases()))
        weights = weights_of(q, k)  # (B, H, T, S)
        return mnp.merge_heads(weights @ v) @ w.w_o + w.biases()[3], weights  # (B, T, E), (B, H, T, S)

    return forward


def _torch(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def make_torch(w: mha.Weights):
    import torch

    import mha.torch

    layer = mha.torch.MultiHeadAttention.from_weights(w).eval()

    def forward(x):
        with torch.inference_mode():
            return layer(x)[0].numpy()

    return forward


def make_torch_sdpa(w: mha.Weights):
    """The same four projections in torch around the fused kernel F.scaled_dot_product_attention."""
    import torch
    import torch.nn.functional as F

    h = w.num_heads
    ws = [_torch(a.T) for a in (w.w_q, w.w_k, w.w_v, w.w_o)]  # F.linear wants (out, in), like nn.Linear
    bs = [_torch(a) for a in w.biases()]

    def forward(x):
        b, t, e = x.shape
        with torch.inference_mode():
            q, k, v = (F.linear(x, ws[i], bs[i]).view(b, t, h, e // h).transpose(1, 2) for i in range(3))
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D), never the (T, S) matrix
            return F.linear(out.transpose(1, 2).reshape(b, t, e), ws[3], bs[3]).numpy()

    return forward


def make_torch_builtin(w: mha.Weights):
    """torch.nn.MultiheadAttention in eval mode, asked for no weights: its fast path.

    That is one fused call, torch._native_multi_head_attention. On a CPU (torch 2.13) it runs
    mm, bmm, softmax, bmm (torch.profiler shows them): it forms the (B, H, T, S) weights inside
    and only does not return them, so its memory grows like T^2, unlike F.scaled_dot_product_attention.
    """
    import torch

    import mha.torch

    layer = mha.torch.to_builtin(w)

    def forward(x):
        with torch.inference_mode():
            return layer(x, x, x, need_weights=False)[0].numpy()

    return forward


def make_keras(w: mha.Weights):
    import keras

    import mha.keras

    layer = mha.keras.MultiHeadAttention.from_weights(w)
    return lambda x: keras.ops.convert_to_numpy(layer(x)[0])


def make_keras_builtin(w: mha.Weights):
    import keras

    import mha.keras

    layer = mha.keras.to_builtin(w)
    return lambda x: keras.ops.convert_to_numpy(layer(x, x))  # (query, value): value comes second


# name -> (maker, how the input is handed over, plot colour, plot marker, line style)
CONTESTANTS = {
    "mha.numpy": (make_numpy, np.asarray, "tab:blue", "o", "-"),
    "mha.numpy fast": (make_numpy_fast, np.asarray, "tab:cyan", "D", "-."),
    "mha.numpy tiled": (make_numpy_tiled, np.asarray, "tab:blue", "s", "--"),
    "mha.torch": (make_torch, _torch, "tab:red", "o", "-"),
    "torch SDPA": (make_torch_sdpa, _torch, "tab:red", "s", "--"),
    "torch.nn.MultiheadAttention": (make_torch_builtin, _torch, "tab:orange", "^", ":"),
    "mha.keras": (make_keras, None, "tab:green", "o", "-"),
    "keras MultiHeadAttention": (make_keras_builtin, None, "tab:olive", "^", ":"),
}


def keras_input(x):
    import keras

    return keras.ops.convert_to_tensor(x)


def build(name: str, w: mha.Weights, x: np.ndarray):
    """(forward, input): the contestant `name` loaded with `w`, and `x` as its framework's tensor."""
    maker, convert, *_ = CONTESTANTS[name]
    convert = convert or keras_input
    return maker(w), convert(x)
