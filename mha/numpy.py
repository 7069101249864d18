"""Multi-head attention in NumPy: the reference every other backend is checked against.

Shapes follow the legend in ``mha/__init__.py``. The chapters explain each
function; this file keeps the code short enough to read in one sitting.
"""

from __future__ import annotations

import math

import numpy as np

from mha import Weights, _checks

__all__ = [
    "softmax",
    "masked_softmax",
    "causal_mask",
    "padding_mask",
    "scaled_dot_product_attention",
    "split_heads",
    "merge_heads",
    "MultiHeadAttention",
]


def _dtype(x) -> str:
    return x.dtype.name


def _normalize(x: np.ndarray, axis: int) -> np.ndarray:
    """exp(x - max) / sum, where a row of only -inf (all masked) gives zeros, not NaN."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isneginf(m), 0, m)  # all -inf: subtract 0, every exp is 0
    with np.errstate(over="ignore"):  # min - max may round to -inf; exp(-inf) = 0 is right
        e = np.exp(x - m)
    total = np.sum(e, axis=axis, keepdims=True)
    return e / np.where(total == 0, 1, total)


def softmax(x, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax: subtracting the row's max changes nothing but the overflow."""
    x = np.asarray(x)
    _checks.check_float("softmax", "x", x.shape, _dtype(x))
    _checks.check_axis(axis, x.ndim)
    return _normalize(x, axis)


def masked_softmax(x, mask, axis: int = -1) -> np.ndarray:
    """Softmax over the entries where `mask` is True; rows with no True entry give zeros."""
    x, mask = np.asarray(x), np.asarray(mask)
    _checks.check_float("masked_softmax", "x", x.shape, _dtype(x))
    _checks.check_axis(axis, x.ndim)
    _checks.check_mask("masked_softmax", mask.shape, _dtype(mask), x.shape, "x.shape")
    return _normalize(np.where(mask, x, -np.inf), axis)


def causal_mask(t: int, s: int | None = None) -> np.ndarray:
    """Bool (T, S), True where query i may attend key j, that is j <= i."""
    s = t if s is None else s
    _checks.check_positive_int("t", t)
    _checks.check_positive_int("s", s)
    return np.arange(s)[None, :] <= np.arange(t)[:, None]  # (1, S) <= (T, 1) -> (T, S)


def padding_mask(lengths, s: int) -> np.ndarray:
    """Bool (B, 1, 1, S), True on the first lengths[b] keys of sequence b (the real tokens)."""
    _checks.check_positive_int("s", s)
    lengths = np.asarray(lengths)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"padding_mask: lengths must be integers, got dtype {_dtype(lengths)}")
    _checks.check_lengths(lengths.shape, lengths.tolist(), s)
    keep = np.arange(s)[None, :] < lengths[:, None]  # (1, S) < (B, 1) -> (B, S)
    return keep[:, None, None, :]  # (B, S) -> (B, 1, 1, S): broadcasts over heads and queries


def scaled_dot_product_attention(query, key, value, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """softmax(q k^T / sqrt(D)) v for q (..., T, D), k (..., S, D), v (..., S, Dv).

    `mask` is boolean, True = may attend, broadcastable to (..., T, S).
    Returns (out (..., T, Dv), weights (..., T, S)); fully masked rows give zeros.
    """
    q, k, v = np.asarray(query), np.asarray(key), np.asarray(value)
    scores_shape = _checks.check_attention(q.shape, k.shape, v.shape, _dtype(q), _dtype(k), _dtype(v))
    if mask is not None:
        mask = np.asarray(mask)
        _checks.check_mask("scaled_dot_product_attention", mask.shape, _dtype(mask), scores_shape, "(..., T, S)")
    q = q * (1.0 / math.sqrt(q.shape[-1]))  # a Python float keeps float32 float32
    scores = q @ np.swapaxes(k, -1, -2)  # (..., T, D) @ (..., D, S) -> (..., T, S)
    weights = _normalize(scores if mask is None else np.where(mask, scores, -np.inf), -1)
    return weights @ v, weights  # (..., T, S) @ (..., S, Dv) -> (..., T, Dv)


def split_heads(x, num_heads: int) -> np.ndarray:
    """(B, T, E) -> (B, H, T, D), einops 'b t (h d) -> b h t d'."""
    x = np.asarray(x)
    _checks.check_rank("split_heads", "x", x.shape, 3, "(B, T, E)")
    _checks.check_positive_int("num_heads", num_heads)
    _checks.check_heads(x.shape[-1], num_heads)
    b, t, e = x.shape
    x = x.reshape(b, t, num_heads, e // num_heads)  # (B, T, E) -> (B, T, H, D)
    return x.transpose(0, 2, 1, 3)  # (B, T, H, D) -> (B, H, T, D)


def merge_heads(x) -> np.ndarray:
    """(B, H, T, D) -> (B, T, E), einops 'b h t d -> b t (h d)'; the inverse of split_heads."""
    x = np.asarray(x)
    _checks.check_rank("merge_heads", "x", x.shape, 4, "(B, H, T, D)")
    b, h, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)  # (B, H, T, D) -> (B, T, H, D) -> (B, T, E)


def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    return x @ w if b is None else x @ w + b  # (B, T, E) @ (E, E) -> (B, T, E)


class MultiHeadAttention:
    """Multi-head attention as a plain class holding one `mha.Weights`.

    Called as ``(query, key=None, value=None, mask=None)``: key defaults to
    query and value to key. Returns (out (B, T, E), weights (B, H, T, S)).
    """

    def __init__(self, d_model: int, num_heads: int, bias: bool = True, *, seed: int = 0):
        self._w = Weights.random(d_model, num_heads, bias=bias, seed=seed)

    @classmethod
    def from_weights(cls, w: Weights) -> "MultiHeadAttention":
        layer = cls.__new__(cls)
        layer._w = w.copy()  # later edits to `w` do not leak in
        return layer

    def get_weights(self) -> Weights:
        return self._w.copy()

    @property
    def d_model(self) -> int:
        return self._w.d_model

    @property
    def num_heads(self) -> int:
        return self._w.num_heads

    def __call__(self, query, key=None, value=None, mask=None) -> tuple[np.ndarray, np.ndarray]:
        key = query if key is None else key
        value = key if value is None else value
        x_q, x_k, x_v = np.asarray(query), np.asarray(key), np.asarray(value)
        _checks.check_mha_inputs(
            self.d_model, x_q.shape, x_k.shape, x_v.shape, (_dtype(x_q), _dtype(x_k), _dtype(x_v))
        )
        b, t, _ = x_q.shape
        s = x_k.shape[1]
        if mask is not None:
            mask = np.asarray(mask)
            _checks.check_mask(
                "MultiHeadAttention", mask.shape, _dtype(mask), (b, self.num_heads, t, s), "(B, H, T, S)"
            )
        w, h = self._w, self.num_heads
        q = split_heads(_linear(x_q, w.w_q, w.b_q), h)  # (B, T, E) -> (B, H, T, D)
        k = split_heads(_linear(x_k, w.w_k, w.b_k), h)  # (B, S, E) -> (B, H, S, D)
        v = split_heads(_linear(x_v, w.w_v, w.b_v), h)  # (B, S, E) -> (B, H, S, D)
        out, weights = scaled_dot_product_attention(q, k, v, mask)  # (B, H, T, D), (B, H, T, S)
        return _linear(merge_heads(out), w.w_o, w.b_o), weights  # (B, H, T, D) -> (B, T, E)

    def __repr__(self) -> str:
        return f"mha.numpy.MultiHeadAttention(d_model={self.d_model}, num_heads={self.num_heads})"

