"""Multi-head attention in NumPy: the reference every other backend is checked against.

Shapes follow the legend in ``mha/__init__.py``. The chapters explain each
function; this file keeps the code short enough to read in one sitting.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from mha import Weights, _checks

__all__ = [
    "softmax",
    "masked_softmax",
    "causal_mask",
    "padding_mask",
    "sinusoidal_positions",
    "rope",
    "sliding_window_mask",
    "scaled_dot_product_attention",
    "softmax_vjp",
    "scaled_dot_product_attention_vjp",
    "split_heads",
    "merge_heads",
    "repeat_kv",
    "MultiHeadAttention",
    "layer_norm",
    "EncoderBlock",
    "KVCache",
    "DecoderBlock",
    "fast_scaled_dot_product_attention",
    "tiled_attention",
    "threaded_attention",
    "fixed_shift_attention",
]


def _dtype(x) -> str:
    return x.dtype.name


def softmax(x, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax: subtracting the row's max changes nothing but the overflow.

    A row of only -inf (every key masked) gives zeros, not NaN.
    """
    x = np.asarray(x)
    _checks.check_float("softmax", "x", x.shape, _dtype(x))
    _checks.check_axis(axis, x.ndim)
    m = np.max(x, axis=axis, keepdims=True)  # the row's largest entry, kept as a size-1 axis
    m = np.where(np.isneginf(m), 0, m)  # a row of only -inf: subtract 0, so that exp gives 0, not NaN
    with np.errstate(over="ignore"):  # x - m may round below the dtype's min to -inf: exp(-inf) = 0 is right
        e = np.exp(x - m)  # every exponent <= 0: nothing overflows
    total = np.sum(e, axis=axis, keepdims=True)
    return e / np.where(total == 0, 1, total)  # an all-masked row sums to 0: divide by 1, keep its zeros


def masked_softmax(x, mask, axis: int = -1) -> np.ndarray:
    """Softmax over the entries where `mask` is True; rows with no True entry give zeros."""
    x, mask = np.asarray(x), np.asarray(mask)
    _checks.check_float("masked_softmax", "x", x.shape, _dtype(x))
    _checks.check_axis(axis, x.ndim)
    _checks.check_mask("masked_softmax", mask.shape, _dtype(mask), x.shape, "x.shape")
    return softmax(np.where(mask, x, -np.inf), axis)  # blocked entries become -inf: exp(-inf) = 0


def causal_mask(t: int, s: int | None = None, *, align: str = "top-left") -> np.ndarray:
    """Bool (T, S), True where query i may attend key j: j <= i (top-left, as ``is_causal``).

    ``align="bottom-right"`` puts the triangle's corner at the last key, j <= i + (S - T): the T
    queries are the last T of the S positions, as when decoding with a cache (chapter 11).
    """
    s = t if s is None else s
    _checks.check_positive_int("t", t)
    _checks.check_positive_int("s", s)
    _checks.check_align(align)
    offset = s - t if align == "bottom-right" else 0  # where query 0 sits among the keys
    return np.arange(s)[None, :] <= np.arange(t)[:, None] + offset  # (1, S) <= (T, 1) -> (T, S)


def padding_mask(lengths, s: int) -> np.ndarray:
    """Bool (B, 1, 1, S), True on the first lengths[b] keys of sequence b (the real tokens)."""
    _checks.check_positive_int("s", s)
    lengths = np.asarray(lengths)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"padding_mask: lengths must be integers, got dtype {_dtype(lengths)}")
    _checks.check_lengths(lengths.shape, lengths.tolist(), s)
    keep = np.arange(s)[None, :] < lengths[:, None]  # (1, S) < (B, 1) -> (B, S)
    return keep[:, None, None, :]  # (B, S) -> (B, 1, 1, S): broadcasts over heads and queries


def sinusoidal_positions(t: int, d_model: int) -> np.ndarray:
    """(T, E) float32: the position encoding of Vaswani et al., added to the token embeddings (chapter 10).

    PE[p, 2i] = sin(p / 10000^(2i/E)) and PE[p, 2i+1] = cos(p / 10000^(2i/E)): feature pair i
    turns at its own frequency, from 1 radian per position (i = 0) down to 1/10000.
    """
    _checks.check_positions(t, d_model)
    position = np.arange(t, dtype=np.float64)[:, None]  # (T, 1); float64: a float32 angle is off by ~p * 6e-8
    freq = 10000.0 ** (-np.arange(0, d_model, 2, dtype=np.float64) / d_model)  # (E/2,)
    angle = position * freq  # (T, 1) * (E/2,) -> (T, E/2)
    pe = np.stack([np.sin(angle), np.cos(angle)], axis=-1)  # (T, E/2, 2): sin and cos side by side
    return pe.reshape(t, d_model).astype(np.float32)  # (T, E/2, 2) -> (T, E): sin even, cos odd


def rope(x, positions=None, base: float = 10000.0) -> np.ndarray:
    """Rotary position embedding of x (..., T, D), D even, in the half-split layout (chapter 12).

    Feature i and feature i + D/2 form pair i, turned by the angle p * base^(-2i/D) at
    position p: (x_i, x_{i+D/2}) -> (x_i cos - x_{i+D/2} sin, x_i sin + x_{i+D/2} cos), as
    Hugging Face's ``rotate_half`` and KerasHub's ``RotaryEmbedding``. `positions` is an integer
    array of shape (T,), 0..T-1 by default. The dtype of x is kept.
    """
    x = np.asarray(x)
    pos = None if positions is None else np.asarray(positions)
    pos_shape, pos_dtype = (None, None) if pos is None else (pos.shape, _dtype(pos))
    _checks.check_rope(x.shape, _dtype(x), pos_shape, pos_dtype, base)
    t, d = x.shape[-2:]
    angle = _rope_angles(np.arange(t) if pos is None else pos, d, base)  # (T, D/2)
    cos, sin = np.cos(angle).astype(x.dtype), np.sin(angle).astype(x.dtype)  # (T, D/2), in x's dtype
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]  # (..., T, D/2) each: the two halves of every pair
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)  # (..., T, D)


def _rope_angles(positions: np.ndarray, d: int, base: float) -> np.ndarray:
    """(T, D/2) float64: the angle p * base^(-2i/D) of pair i at position p (also mha.keras's table).

    float64, as in sinusoidal_positions: a float32 angle is off by up to p * 6e-8 radians.
    """
    freq = float(base) ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # (D/2,): base^(-2i/D)
    return positions.astype(np.float64)[:, None] * freq  # (T, 1) * (D/2,) -> (T, D/2)


def sliding_window_mask(t: int, window: int, s: int | None = None) -> np.ndarray:
    """Bool (T, S), S >= T: query i may attend the `window` most recent keys up to its own position.

    Bottom-right aligned, as ``causal_mask(t, s, align="bottom-right")``: query i sits at position
    i + (S - T), and key j is allowed when i + (S - T) - window < j <= i + (S - T) (chapter 12).
    """
    s = t if s is None else s
    _checks.check_window(t, window, s)
    position = np.arange(t)[:, None] + (s - t)  # (T, 1): where each query sits among the keys
    key = np.arange(s)[None, :]  # (1, S)
    return (key <= position) & (key > position - window)  # (1, S) vs (T, 1) -> (T, S)


def _attention_inputs(where: str, query, key, value, mask):
    """The checks on entry of both attention functions; returns arrays and the scores' shape (..., T, S)."""
    q, k, v = np.asarray(query), np.asarray(key), np.asarray(value)
    scores_shape = _checks.check_attention(q.shape, k.shape, v.shape, _dtype(q), _dtype(k), _dtype(v), where)
    if mask is not None:
        mask = np.asarray(mask)
        _checks.check_mask(where, mask.shape, _dtype(mask), scores_shape, "(..., T, S)")
    return q, k, v, mask, scores_shape


def scaled_dot_product_attention(query, key, value, mask=None, *, dropout=0.0, rng=None
                                 ) -> tuple[np.ndarray, np.ndarray]:
    """softmax(q k^T / sqrt(D)) v for q (..., T, D), k (..., S, D), v (..., S, Dv).

    `mask` is boolean, True = may attend, broadcastable to (..., T, S).
    Returns (out (..., T, Dv), weights (..., T, S)); fully masked rows give zeros.
    `dropout` > 0 zeroes each weight with that probability before they multiply v
    (the kept ones scaled by 1/(1 - dropout)), drawn from `rng`, a np.random.Generator;
    the weights returned are those before dropout (chapter 9).
    """
    q, k, v, mask, _ = _attention_inputs("scaled_dot_product_attention", query, key, value, mask)
    dropout = _checks.check_dropout("scaled_dot_product_attention", dropout)
    d = q.shape[-1]
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(d)  # (..., T, D) @ (..., D, S) -> (..., T, S)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)  # blocked keys get -inf, so their weight is exp(-inf) = 0
    weights = softmax(scores, axis=-1)  # (..., T, S): each query's weights over the keys sum to 1
    if dropout:
        return _dropout(weights, dropout, rng) @ v, weights  # (..., T, S) @ (..., S, Dv) -> (..., T, Dv)
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


def repeat_kv(x, n_rep: int) -> np.ndarray:
    """(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D): each key/value head repeated for its group of query heads.

    Query head h reads kv head h // n_rep, the layout of ``enable_gqa=True`` in torch's SDPA
    (``repeat_interleave`` on the head axis), einops 'b g s d -> b (g r) s d' (chapter 12).
    """
    x = np.asarray(x)
    _checks.check_repeat_kv(x.shape, n_rep)
    return np.repeat(x, n_rep, axis=1)  # (B, Hkv, S, D) -> (B, Hkv * n_rep, S, D)


def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """x @ w + b: (B, T, E_in) @ (E_in, E_out) -> (B, T, E_out)."""
    return x @ w if b is None else x @ w + b


class MultiHeadAttention:
    """Multi-head attention as a plain class holding one `mha.Weights`.

    Called as ``(query, key=None, value=None, mask=None)``: key defaults to
    query and value to key. Returns (out (B, T, E), weights (B, H, T, S)).
    ``num_kv_heads`` (Hkv, dividing H) makes it grouped-query attention: H / Hkv query
    heads share each key/value head (Hkv = 1: multi-query); None is plain multi-head.
    """

    def __init__(self, d_model: int, num_heads: int, bias: bool = True, *, dropout: float = 0.0,
                 num_kv_heads: int | None = None, seed: int = 0):
        self._w = Weights.random(d_model, num_heads, bias=bias, seed=seed, num_kv_heads=num_kv_heads)
        self.dropout = _checks.check_dropout("MultiHeadAttention", dropout)

    @classmethod
    def from_weights(cls, w: Weights, *, dropout: float = 0.0) -> "MultiHeadAttention":
        layer = cls.__new__(cls)
        layer._w = w.copy()  # later edits to `w` do not leak in
        layer.dropout = _checks.check_dropout("MultiHeadAttention", dropout)
        return layer

    def get_weights(self) -> Weights:
        return self._w.copy()

    @property
    def d_model(self) -> int:
        return self._w.d_model

    @property
    def num_heads(self) -> int:
        return self._w.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self._w.num_kv_heads

    def _project_kv(self, x_k: np.ndarray, x_v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The keys and values, one per kv head: (B, S, E) -> (B, Hkv, S, D) each."""
        w, g = self._w, self.num_kv_heads
        k = split_heads(_linear(x_k, w.w_k, w.b_k), g)  # (B, S, E) @ (E, Hkv * D) -> (B, Hkv, S, D)
        v = split_heads(_linear(x_v, w.w_v, w.b_v), g)  # (B, S, E) @ (E, Hkv * D) -> (B, Hkv, S, D)
        return k, v

    def __call__(self, query, key=None, value=None, mask=None, *, training: bool = False,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
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
        n_rep = h // self.num_kv_heads  # query heads per kv head; 1 for plain multi-head attention
        q = split_heads(_linear(x_q, w.w_q, w.b_q), h)  # (B, T, E) -> (B, H, T, D)
        k, v = self._project_kv(x_k, x_v)  # (B, Hkv, S, D) each
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, Hkv, S, D) -> (B, H, S, D)
        p = self.dropout if training else 0.0  # dropout only while training
        out, weights = scaled_dot_product_attention(q, k, v, mask, dropout=p, rng=rng)  # (B, H, T, D), (B, H, T, S)
        return _linear(merge_heads(out), w.w_o, w.b_o), weights  # (B, H, T, D) -> (B, T, E)

    def decode(self, x, cache: "KVCache | None" = None) -> tuple[np.ndarray, np.ndarray, "KVCache"]:
        """Causal self-attention of new tokens x (B, T_new, E) over the cached keys and values and their own.

        The S = len(cache) + T_new keys are masked bottom-right: new token i sits at position
        S - T_new + i. Returns (out (B, T_new, E), weights (B, H, T_new, S), the cache with S keys).
        """
        x = np.asarray(x)
        _checks.check_decode_input(self.d_model, x.shape, _dtype(x))
        if cache is not None:
            _checks.check_cache_type(isinstance(cache, KVCache), cache)
            expected = (x.shape[0], self.num_kv_heads, self._w.head_dim)  # (B, Hkv, D)
            _checks.check_cache(cache.k.shape, cache.v.shape, expected, (_dtype(cache.k), _dtype(cache.v)))
        w, h = self._w, self.num_heads
        n_rep = h // self.num_kv_heads
        q = split_heads(_linear(x, w.w_q, w.b_q), h)  # (B, T_new, E) -> (B, H, T_new, D)
        k, v = self._project_kv(x, x)  # (B, Hkv, T_new, D) each
        cache = KVCache(k, v) if cache is None else cache.append(k, v)  # (B, Hkv, S, D): H / Hkv times smaller
        mask = causal_mask(q.shape[2], len(cache), align="bottom-right")  # (T_new, S)
        k, v = repeat_kv(cache.k, n_rep), repeat_kv(cache.v, n_rep)  # (B, Hkv, S, D) -> (B, H, S, D)
        out, weights = scaled_dot_product_attention(q, k, v, mask)  # (B, H, T_new, D), (B, H, T_new, S)
        return _linear(merge_heads(out), w.w_o, w.b_o), weights, cache  # (B, H, T_new, D) -> (B, T_new, E)

    def vjp(self, query, key, value, d_out, mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, Weights]:
        """The backward pass of ``self(query, key, value, mask)`` (without dropout), derived in chapter 9.

        `d_out` (B, T, E) is the gradient of a loss with respect to the output. Returns
        (d_query (B, T, E), d_key (B, S, E), d_value (B, S, E), d_weights), `d_weights` an
        `mha.Weights` of the gradients of every weight and bias (zeros where the layer has
        no bias). For self-attention, the gradient of the one input is the sum of the three.
        """
        x_q, x_k, x_v = np.asarray(query), np.asarray(key), np.asarray(value)
        _checks.check_mha_inputs(
            self.d_model, x_q.shape, x_k.shape, x_v.shape, (_dtype(x_q), _dtype(x_k), _dtype(x_v))
        )
        d_y = np.asarray(d_out)
        _checks.check_grad("MultiHeadAttention.vjp", "d_out", d_y.shape, _dtype(d_y), x_q.shape, "(B, T, E)")
        b, t, _ = x_q.shape
        if mask is not None:
            mask = np.asarray(mask)
            _checks.check_mask(
                "MultiHeadAttention", mask.shape, _dtype(mask), (b, self.num_heads, t, x_k.shape[1]), "(B, H, T, S)"
            )
        w, h = self._w, self.num_heads
        n_rep = h // self.num_kv_heads
        # The forward again, keeping what the backward needs.
        q = split_heads(_linear(x_q, w.w_q, w.b_q), h)  # (B, T, E) -> (B, H, T, D)
        k, v = self._project_kv(x_k, x_v)  # (B, Hkv, S, D) each
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, Hkv, S, D) -> (B, H, S, D)
        m = merge_heads(scaled_dot_product_attention(q, k, v, mask)[0])  # (B, H, T, D) -> (B, T, E)
        # Backward, last step first: y = m @ w_o + b_o.
        d_m, d_w_o, d_b_o = _linear_vjp(m, w.w_o, d_y)  # (B, T, E), (E, E), (E,)
        # merge_heads only moves entries around: its backward is split_heads, and the other way round.
        d_q, d_k, d_v = scaled_dot_product_attention_vjp(q, k, v, split_heads(d_m, h), mask)  # (B, H, ., D)
        d_k, d_v = _repeat_kv_vjp(d_k, n_rep), _repeat_kv_vjp(d_v, n_rep)  # (B, H, S, D) -> (B, Hkv, S, D)
        d_query, d_w_q, d_b_q = _linear_vjp(x_q, w.w_q, merge_heads(d_q))  # (B, T, E), (E, E), (E,)
        d_key, d_w_k, d_b_k = _linear_vjp(x_k, w.w_k, merge_heads(d_k))  # (B, S, E), (E, Hkv * D), (Hkv * D,)
        d_value, d_w_v, d_b_v = _linear_vjp(x_v, w.w_v, merge_heads(d_v))  # (B, S, E), (E, Hkv * D), (Hkv * D,)
        d_b = (d_b_q, d_b_k, d_b_v, d_b_o)
        if not w.has_bias:  # no bias: zeros of the same shapes
            d_b = tuple(np.zeros_like(d) for d in d_b)
        d_w = Weights(h, d_w_q, d_w_k, d_w_v, d_w_o, *d_b, num_kv_heads=self.num_kv_heads)
        return d_query, d_key, d_value, d_w

    def __repr__(self) -> str:
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        return f"mha.numpy.MultiHeadAttention(d_model={self.d_model}, num_heads={self.num_heads}{kv})"


# Chapter 9: the backward pass, and dropout on the attention weights.

def _dropout(weights: np.ndarray, p: float, rng: np.random.Generator | None) -> np.ndarray:
    """Zeroes each entry with probability p and scales the kept ones by 1/(1 - p): unchanged on average."""
    if rng is None:
        rng = np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"scaled_dot_product_attention: rng must be a np.random.Generator, got {type(rng).__name__}")
    keep = rng.random(weights.shape) >= p  # (..., T, S) bool: True with probability 1 - p
    return np.where(keep, weights / (1 - p), 0)  # (..., T, S); p is a Python float: float32 stays float32


def _repeat_kv_vjp(d_x: np.ndarray, n_rep: int) -> np.ndarray:
    """The backward of repeat_kv: each kv head gets the sum of its group's gradients, (B, H, S, D) -> (B, Hkv, S, D)."""
    b, h, s, d = d_x.shape
    return d_x.reshape(b, h // n_rep, n_rep, s, d).sum(axis=2)  # (B, Hkv, n_rep, S, D) -> (B, Hkv, S, D)


def _linear_vjp(x: np.ndarray, w: np.ndarray, d_y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The backward of y = x @ w + b for x (B, L, E_in): returns (d_x, d_w, d_b)."""
    d_x = d_y @ w.T  # (B, L, E_out) @ (E_out, E_in) -> (B, L, E_in)
    d_w = np.einsum("bli,blj->ij", x, d_y)  # x^T d_y summed over every token: (E_in, E_out)
    d_b = d_y.sum(axis=(0, 1))  # (B, L, E_out) -> (E_out,)
    return d_x, d_w, d_b


def softmax_vjp(weights, d_weights, axis: int = -1) -> np.ndarray:
    """The gradient with respect to softmax's input, from its output a and the gradient g of its output.

    J^T g with J = diag(a) - a a^T, without building J: a * (g - sum(a * g)). A row of
    zero weights (fully masked) gets zero gradient.
    """
    a, g = np.asarray(weights), np.asarray(d_weights)
    _checks.check_float("softmax_vjp", "weights", a.shape, _dtype(a))
    _checks.check_grad("softmax_vjp", "d_weights", g.shape, _dtype(g), a.shape, "weights.shape")
    _checks.check_axis(axis, a.ndim)
    return a * (g - np.sum(a * g, axis=axis, keepdims=True))  # (..., S) * ((..., S) - (..., 1))


def _unbroadcast(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sums a gradient over the leading axes its input was broadcast along, back to the input's shape."""
    grad = grad.sum(axis=tuple(range(grad.ndim - len(shape))))  # axes the input did not have
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=stretched, keepdims=True)  # axes of size 1 that broadcasting stretched


def scaled_dot_product_attention_vjp(query, key, value, d_out, mask=None):
    """The backward pass of ``scaled_dot_product_attention(query, key, value, mask)``, derived in chapter 9.

    `d_out` (..., T, Dv) is the gradient of a loss with respect to the output. Returns
    (d_q (..., T, D), d_k (..., S, D), d_v (..., S, Dv)), each the shape of its input;
    fully masked rows give zero gradients.
    """
    where = "scaled_dot_product_attention_vjp"
    q, k, v, mask, scores_shape = _attention_inputs(where, query, key, value, mask)
    d_o = np.asarray(d_out)
    _checks.check_grad(where, "d_out", d_o.shape, _dtype(d_o), (*scores_shape[:-1], v.shape[-1]), "(..., T, Dv)")
    scale = 1 / math.sqrt(q.shape[-1])  # a Python float keeps float32 float32
    # Forward: s = q k^T * scale, masked; a = softmax(s); o = a v. The weights are recomputed, not stored.
    a = scaled_dot_product_attention(q, k, v, mask)[1]  # (..., T, S)
    # Backward, last step first.
    d_v = np.swapaxes(a, -1, -2) @ d_o  # o = a v: (..., S, T) @ (..., T, Dv) -> (..., S, Dv)
    d_a = d_o @ np.swapaxes(v, -1, -2)  # (..., T, Dv) @ (..., Dv, S) -> (..., T, S)
    d_s = softmax_vjp(a, d_a)  # (..., T, S); zero where a is 0, so blocked keys and masked rows get nothing
    d_q = d_s @ k * scale  # s = q k^T * scale: (..., T, S) @ (..., S, D) -> (..., T, D)
    d_k = np.swapaxes(d_s, -1, -2) @ q * scale  # (..., S, T) @ (..., T, D) -> (..., S, D)
    return _unbroadcast(d_q, q.shape), _unbroadcast(d_k, k.shape), _unbroadcast(d_v, v.shape)


# The encoder block of chapter 8.

def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Normalizes each token's E features to mean 0, variance 1 (biased, as torch and Keras), then scales."""
    mu = x.mean(axis=-1, keepdims=True)  # (B, T, E) -> (B, T, 1)
    var = x.var(axis=-1, keepdims=True)  # (B, T, 1)
    return (x - mu) / np.sqrt(var + np.float32(eps)) * gamma + beta  # (B, T, E); float32 eps keeps float32


class EncoderBlock:
    """A transformer encoder block in NumPy: the reference for ``mha.torch`` and ``mha.keras``.

    post-LN (``norm_first=False``, the original):  x = LN(x + MHA(x));  x = LN(x + FFN(x))
    pre-LN  (``norm_first=True``):                 x = x + MHA(LN(x));  x = x + FFN(LN(x))

    FFN(x) = ReLU(x @ w_1 + b_1) @ w_2 + b_2. NumPy has no training mode, so the block
    always runs as the others do in eval mode: ``dropout`` is kept for the same
    signature and is never applied. Called as ``block(x, mask=None)``; returns
    (out (B, T, E), weights (B, H, T, T)).
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float = 0.0, norm_first: bool = False,
                 eps: float = 1e-5, *, seed: int = 0):
        _checks.check_block_args(d_model, num_heads, d_ff, dropout, norm_first, eps)
        rng = np.random.default_rng(seed)
        draw = lambda fan_in, *shape: rng.uniform(-fan_in**-0.5, fan_in**-0.5, shape).astype(np.float32)
        w = Weights.random(d_model, num_heads, seed=seed)
        ones, zeros = np.ones(d_model, np.float32), np.zeros(d_model, np.float32)
        params = {
            **{f"w_{n}": getattr(w, f"w_{n}") for n in "qkvo"}, **{f"b_{n}": getattr(w, f"b_{n}") for n in "qkvo"},
            "ln1_gamma": ones, "ln1_beta": zeros, "ln2_gamma": ones, "ln2_beta": zeros,
            "w_1": draw(d_model, d_model, d_ff), "b_1": draw(d_model, d_ff),
            "w_2": draw(d_ff, d_ff, d_model), "b_2": draw(d_ff, d_model),
        }
        self._set(params, num_heads, dropout, norm_first, eps)

    def _set(self, params: dict, num_heads: int, dropout: float, norm_first: bool, eps: float) -> None:
        self.p = {name: np.array(value, dtype=np.float32) for name, value in params.items()}  # copies
        self.d_model, self.d_ff = self.p["w_1"].shape
        self.num_heads, self.dropout, self.norm_first, self.eps = num_heads, dropout, norm_first, eps
        self.attn = MultiHeadAttention.from_weights(
            Weights(num_heads, *(self.p[f"w_{n}"] for n in "qkvo"), *(self.p[f"b_{n}"] for n in "qkvo"))
        )

    def _norm(self, x: np.ndarray, i: int) -> np.ndarray:
        return layer_norm(x, self.p[f"ln{i}_gamma"], self.p[f"ln{i}_beta"], self.eps)

    def _ffn(self, x: np.ndarray) -> np.ndarray:
        h = np.maximum(_linear(x, self.p["w_1"], self.p["b_1"]), 0)  # (B, T, E) -> (B, T, d_ff)
        return _linear(h, self.p["w_2"], self.p["b_2"])  # (B, T, d_ff) -> (B, T, E)

    def __call__(self, x, mask=None) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x)
        _checks.check_block_input(self.d_model, x.shape, _dtype(x))
        if self.norm_first:  # pre-LN: each sublayer sees a normalized copy; the residual path is left alone
            a, weights = self.attn(self._norm(x, 1), mask=mask)  # (B, T, E), (B, H, T, T)
            x = x + a
            x = x + self._ffn(self._norm(x, 2))
        else:  # post-LN: normalize each residual sum
            a, weights = self.attn(x, mask=mask)  # (B, T, E), (B, H, T, T)
            x = self._norm(x + a, 1)
            x = self._norm(x + self._ffn(x), 2)
        return x, weights

    def to_numpy_dict(self) -> dict[str, np.ndarray]:
        """Every parameter as a float32 NumPy array (copies), applied as ``x @ w``."""
        return {name: value.copy() for name, value in self.p.items()}

    @classmethod
    def from_numpy_dict(cls, d: dict, num_heads: int, *, dropout: float = 0.0, norm_first: bool = False,
                        eps: float = 1e-5) -> "EncoderBlock":
        """The inverse of ``to_numpy_dict``; d_model and d_ff are read from the shape of ``d['w_1']``."""
        e, f = _checks.check_block_dict(d)
        _checks.check_block_args(e, num_heads, f, dropout, norm_first, eps)
        block = cls.__new__(cls)
        block._set(d, num_heads, dropout, norm_first, eps)
        return block

    def __repr__(self) -> str:
        return (f"mha.numpy.EncoderBlock(d_model={self.d_model}, num_heads={self.num_heads}, d_ff={self.d_ff}, "
                f"norm_first={self.norm_first})")


# Chapter 11: decoding. The key/value cache and the decoder block.

@dataclasses.dataclass(frozen=True)
class KVCache:
    """The keys and values of every token decoded so far by one attention layer: k, v (B, Hkv, S, D).

    ``len(cache)`` is S. ``append`` returns a new, longer cache and leaves this one as it was.
    """

    k: np.ndarray
    v: np.ndarray

    def __len__(self) -> int:
        return self.k.shape[2]

    def append(self, k, v) -> "KVCache":
        """This cache followed by the new tokens' k, v (B, Hkv, T_new, D): (B, Hkv, S + T_new, D)."""
        return KVCache(np.concatenate([self.k, k], axis=2), np.concatenate([self.v, v], axis=2))

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def _attention_params(prefix: str, w: Weights) -> dict[str, np.ndarray]:
    return {f"{prefix}_{n}": getattr(w, n) for n in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")}


def _attention_from(p: dict, prefix: str, num_heads: int) -> MultiHeadAttention:
    names = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")
    return MultiHeadAttention.from_weights(Weights(num_heads, *(p[f"{prefix}_{n}"] for n in names)))


class DecoderBlock:
    """A transformer decoder block in NumPy: the reference for ``mha.torch`` and ``mha.keras``.

    post-LN (``norm_first=False``):  x = LN1(x + SelfMHA(x));  x = LN2(x + CrossMHA(x, memory));  x = LN3(x + FFN(x))
    pre-LN  (``norm_first=True``):   x = x + SelfMHA(LN1(x));  x = x + CrossMHA(LN2(x), memory);  x = x + FFN(LN3(x))

    The order of ``nn.TransformerDecoderLayer``. The memory (the encoder's output) is never
    normalized here. As in ``EncoderBlock``, NumPy has no training mode: ``dropout`` is kept for the
    signature and never applied. Called as ``block(x, memory, mask=None, memory_mask=None)`` with x
    (B, T, E) and memory (B, S, E); `mask` is the self-attention's (broadcastable to (B, H, T, T), a
    causal mask for a decoder), `memory_mask` the cross-attention's (to (B, H, T, S)). Returns
    (out (B, T, E), self_weights (B, H, T, T), cross_weights (B, H, T, S)).
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float = 0.0, norm_first: bool = False,
                 eps: float = 1e-5, *, seed: int = 0):
        _checks.check_decoder_args(d_model, num_heads, d_ff, dropout, norm_first, eps)
        rng = np.random.default_rng(seed)
        draw = lambda fan_in, *shape: rng.uniform(-fan_in**-0.5, fan_in**-0.5, shape).astype(np.float32)
        ones, zeros = np.ones(d_model, np.float32), np.zeros(d_model, np.float32)
        params = {
            **_attention_params("self", Weights.random(d_model, num_heads, seed=seed)),
            **_attention_params("cross", Weights.random(d_model, num_heads, seed=seed + 1)),
            **{f"ln{i}_{p}": (ones if p == "gamma" else zeros) for i in (1, 2, 3) for p in ("gamma", "beta")},
            "w_1": draw(d_model, d_model, d_ff), "b_1": draw(d_model, d_ff),
            "w_2": draw(d_ff, d_ff, d_model), "b_2": draw(d_ff, d_model),
        }
        self._set(params, num_heads, dropout, norm_first, eps)

    def _set(self, params: dict, num_heads: int, dropout: float, norm_first: bool, eps: float) -> None:
        self.p = {name: np.array(value, dtype=np.float32) for name, value in params.items()}  # copies
        self.d_model, self.d_ff = self.p["w_1"].shape
        self.num_heads, self.dropout, self.norm_first, self.eps = num_heads, dropout, norm_first, eps
        self.self_attn = _attention_from(self.p, "self", num_heads)
        self.cross_attn = _attention_from(self.p, "cross", num_heads)

    _norm = EncoderBlock._norm  # LN number i, read from self.p as in the encoder block
    _ffn = EncoderBlock._ffn  # ReLU(x @ w_1 + b_1) @ w_2 + b_2

    def __call__(self, x, memory, mask=None, memory_mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, memory = np.asarray(x), np.asarray(memory)
        _checks.check_decoder_input(self.d_model, x.shape, memory.shape, _dtype(x), _dtype(memory))
        if self.norm_first:  # pre-LN: each sublayer sees a normalized copy of x; the residual path is left alone
            a, self_weights = self.self_attn(self._norm(x, 1), mask=mask)  # (B, T, E), (B, H, T, T)
            x = x + a
            c, cross_weights = self.cross_attn(self._norm(x, 2), memory, mask=memory_mask)  # (B, H, T, S)
            x = x + c
            x = x + self._ffn(self._norm(x, 3))
        else:  # post-LN: normalize each residual sum
            a, self_weights = self.self_attn(x, mask=mask)  # (B, T, E), (B, H, T, T)
            x = self._norm(x + a, 1)
            c, cross_weights = self.cross_attn(x, memory, mask=memory_mask)  # queries from x, keys from memory
            x = self._norm(x + c, 2)
            x = self._norm(x + self._ffn(x), 3)
        return x, self_weights, cross_weights

    def to_numpy_dict(self) -> dict[str, np.ndarray]:
        """Every parameter as a float32 NumPy array (copies), applied as ``x @ w``."""
        return {name: value.copy() for name, value in self.p.items()}

    @classmethod
    def from_numpy_dict(cls, d: dict, num_heads: int, *, dropout: float = 0.0, norm_first: bool = False,
                        eps: float = 1e-5) -> "DecoderBlock":
        """The inverse of ``to_numpy_dict``; d_model and d_ff are read from the shape of ``d['w_1']``."""
        e, f = _checks.check_decoder_dict(d)
        _checks.check_decoder_args(e, num_heads, f, dropout, norm_first, eps)
        block = cls.__new__(cls)
        block._set(d, num_heads, dropout, norm_first, eps)
        return block

    def __repr__(self) -> str:
        return (f"mha.numpy.DecoderBlock(d_model={self.d_model}, num_heads={self.num_heads}, d_ff={self.d_ff}, "
                f"norm_first={self.norm_first})")


# Chapter 13: fast attention. The functions above read like the maths; these
# give the same results with tricks that exist only for speed and memory.

def _safe_max(x: np.ndarray, axis: int) -> np.ndarray:
    """The max along `axis`, kept as a size-1 axis, with 0 where a row is all -inf (all masked)."""
    m = np.max(x, axis=axis, keepdims=True)
    m[np.isneginf(m)] = 0  # all -inf: subtract 0, every exp is 0 (m is ours: writing into it is safe)
    return m


def _softmax_inplace(x: np.ndarray, axis: int) -> np.ndarray:
    """softmax, overwriting `x`: only for an array this module created, never a caller's."""
    with np.errstate(over="ignore"):  # min - max may round to -inf; exp(-inf) = 0 is right
        x -= _safe_max(x, axis)
        np.exp(x, out=x)  # in place: no second array of the scores' size
    total = np.sum(x, axis=axis, keepdims=True)
    total[total == 0] = 1  # an all-masked row sums to 0: divide by 1 and keep its zeros
    x /= total
    return x


def fast_scaled_dot_product_attention(query, key, value, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """scaled_dot_product_attention's contract and results, with one (..., T, S) array instead of three.

    Row-major copies of the inputs (so every product gets plain matrices), q scaled
    instead of the scores (T x D multiplications, not T x S), the mask written into the
    scores in place, and the softmax computed in the scores' own memory.
    """
    q, k, v, mask, _ = _attention_inputs("fast_scaled_dot_product_attention", query, key, value, mask)
    q, k, v = np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v)  # no-ops if already
    q = q * (1.0 / math.sqrt(q.shape[-1]))  # a Python float keeps float32 float32
    scores = q @ np.swapaxes(k, -1, -2)  # (..., T, D) @ (..., D, S) -> (..., T, S)
    if mask is not None:
        np.copyto(scores, -np.inf, where=~mask)  # in place: scores is ours, and no second (T, S) array
    weights = _softmax_inplace(scores, -1)  # the scores become the weights, in the same memory
    return weights @ v, weights  # (..., T, S) @ (..., S, Dv) -> (..., T, Dv)


def tiled_attention(query, key, value, mask=None, block_size: int = 512) -> np.ndarray:
    """scaled_dot_product_attention's output, computed tile by tile with the online softmax.

    The same contract (q (..., T, D), k (..., S, D), v (..., S, Dv); `mask` boolean,
    True = may attend, broadcastable to (..., T, S); fully masked rows give zeros) and
    the same errors, but it returns only `out` (..., T, Dv): it never holds the (T, S)
    weights, only one (..., block_size, block_size) block of scores at a time (chapter 13).
    """
    q, k, v, mask, scores_shape = _attention_inputs("tiled_attention", query, key, value, mask)
    if mask is not None:
        mask = np.broadcast_to(mask, scores_shape)  # a view, so it can be sliced tile by tile
    _checks.check_positive_int("block_size", block_size)
    q, k, v = np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v)  # as in SDPA: BLAS-friendly
    *batch, t, _ = scores_shape
    out = np.empty((*batch, t, v.shape[-1]), dtype=q.dtype)  # (..., T, Dv)
    for i in range(0, t, block_size):  # query tiles are independent: each gets its own softmax
        rows = slice(i, i + block_size)
        tile_mask = None if mask is None else mask[..., rows, :]
        out[..., rows, :] = _attend_query_tile(q[..., rows, :], k, v, tile_mask, block_size)
    return out


def threaded_attention(query, key, value, mask=None, block_size: int = 512, key_block_size: int = 512,
                       workers: int | None = None) -> np.ndarray:
    """tiled_attention's contract and result, its query tiles shared among threads (chapter 13).

    NumPy releases the GIL inside its matrix products and element-wise loops, so
    `workers` threads (default: one per core) each run whole tiles: one head's
    `block_size` queries against all its keys, `key_block_size` keys at a time, with
    the online softmax of `_attend_query_tile`. Every core does exps, not only the one
    a single NumPy call uses; a (512, 512) float32 block of scores is 1 MiB, about one
    core's cache, and large enough that the Python loop costs little. Tiles write
    disjoint rows of `out`: their writes need no lock.
    """
    q, k, v, mask, out = _threaded_inputs("threaded_attention", query, key, value, mask, block_size,
                                          key_block_size)
    batch = out.shape[:-2]
    q, k, v = np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v)
    q, k, v = (np.broadcast_to(a, (*batch, *a.shape[-2:])) for a in (q, k, v))  # views: one head per index

    def attend(head, rows):  # one head's (Tb, D) queries, against all of that head's S keys
        tile_mask = None if mask is None else mask[head][rows]
        out[head][rows] = _attend_query_tile(q[head][rows], k[head], v[head], tile_mask, key_block_size)

    _run_tiles(attend, batch, out.shape[-2], block_size, workers)
    return out


def _threaded_inputs(where: str, query, key, value, mask, block_size: int, key_block_size: int):
    """The entry of both threaded functions: checked arrays, the mask as a (..., T, S) view, the empty output."""
    q, k, v, mask, scores_shape = _attention_inputs(where, query, key, value, mask)
    _checks.check_positive_int("block_size", block_size)
    _checks.check_positive_int("key_block_size", key_block_size)
    if mask is not None:
        mask = np.broadcast_to(mask, scores_shape)  # a view, sliced tile by tile
    out = np.empty((*scores_shape[:-1], v.shape[-1]), dtype=q.dtype)  # (..., T, Dv)
    return q, k, v, mask, out


def _run_tiles(attend, batch, t: int, block_size: int, workers: int | None) -> None:
    """Calls attend(head, rows) for every head and every `block_size` rows of it, on `workers` threads.

    OpenBLAS splits each large matrix product among a pool of its own threads, by
    default one per core the process may use. With our workers on those cores as well,
    its threads and ours compete for them, and a split product is done only when its
    last part is, which may wait behind another worker's exps. So while the pool runs,
    OpenBLAS is held to one thread: each product runs on the worker that calls it.
    threadpoolctl's limit is process-wide (it also holds other threads' products to one
    thread) and is restored afterwards. A lock keeps two overlapping calls from
    restoring each other's limit, so calls from different threads run one after the
    other (and a tile must not call a threaded function).
    """
    tiles = [(head, slice(i, i + block_size)) for head in np.ndindex(*batch) for i in range(0, t, block_size)]
    with _BLAS_LIMIT, threadpool_limits(1, user_api="blas"):
        with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
            list(pool.map(lambda tile: attend(*tile), tiles))  # list(): re-raises here any error raised in a tile


_BLAS_LIMIT = threading.Lock()  # one pool at a time holds OpenBLAS to one thread (see _run_tiles)


def fixed_shift_attention(query, key, value, mask=None, block_size: int = 1024, key_block_size: int = 256,
                          workers: int | None = None) -> np.ndarray:
    """tiled_attention's contract and result, threaded, with each query's shift known before its scores.

    Chapter 13 explains it. Any shift c leaves softmax unchanged:
    exp(s - c) / sum(exp(s - c)). The online softmax takes c = the running max, so it
    rescales its sums in every block. Here c is fixed in advance by Cauchy-Schwarz,
    q_i . k_j / sqrt(D) <= |q_i| max_j |k_j| / sqrt(D), so no score exceeds it:
    exp(s - c) <= 1 never overflows, nothing is rescaled, and a block of keys costs two
    products and one exp. The shift rides in the first product as one more column,
    (q, -c) @ (k, 1)^T = q k^T - c, the row sums in the second, p @ (v, 1) = (p v, sum p),
    and the exps are exp2's, log2(e) folded into the scale as FlashAttention-2 does
    (NumPy's float32 exp2 is usually the cheaper where it has an AVX-512 loop for it,
    not in every process: chapter 13; on AVX2-only CPUs it is the dearer). By default
    a tile is 1024 queries against blocks of 256 keys: 1 MiB of float32 scores, as
    threaded_attention's 512 x 512, but each block of keys serves twice as many
    queries (a call with fewer tiles than workers leaves some idle). The bound says
    nothing about how far below c a row's scores lie: where it is loose, the exps
    underflow.
    Rows whose sum of exps ends below sqrt(tiny) (2**-63 in float32), or is NaN, are
    recomputed with the running max of `_attend_query_tile`; in a row above it, the
    exps lost to underflow (each below tiny) weigh at most S * 2**-63 of the sum.
    float16 inputs are computed in float32 (float16's sqrt(tiny) is 2**-7) and the
    output cast back. Known limit: only the sum is checked, so in a row whose exps are
    all tiny, values of magnitude below about 1e-21 can underflow in exps @ v and come
    out as 0.
    """
    q, k, v, mask, out = _threaded_inputs("fixed_shift_attention", query, key, value, mask, block_size,
                                          key_block_size)
    batch = out.shape[:-2]
    work = np.promote_types(out.dtype, np.float32)  # float16 has too little range for exps of s - c
    q, k, v = (np.ascontiguousarray(a, dtype=work) for a in (q, k, v))  # copies only if not already
    # Built before broadcasting, so that keys and values shared by several heads are copied once.
    k_norm = np.sqrt(np.max(np.sum(k * k, axis=-1), axis=-1, initial=0))  # (...,): each head's longest key
    k1 = np.concatenate([k, np.ones((*k.shape[:-1], 1), work)], axis=-1)  # (..., S, D + 1): a column of ones
    v1 = np.concatenate([v, np.ones((*v.shape[:-1], 1), work)], axis=-1)  # (..., S, Dv + 1): the same for the sums
    k_norm = np.broadcast_to(k_norm, batch)
    q, k, k1, v, v1 = (np.broadcast_to(a, (*batch, *a.shape[-2:])) for a in (q, k, k1, v, v1))  # one head per index
    threshold = np.sqrt(np.finfo(work).tiny)  # 2**-63 in float32

    def attend(head, rows):  # one head's (Tb, D) queries, against all of that head's S keys
        tile_mask = None if mask is None else mask[head][rows]
        qt = q[head][rows] * (math.log2(math.e) / math.sqrt(q.shape[-1]))  # (Tb, D): scores in base 2
        c = np.sqrt(np.sum(qt * qt, axis=-1, keepdims=True)) * k_norm[head]  # (Tb, 1): >= every score
        acc, l = _attend_with_shift(np.concatenate([qt, -c], axis=-1), k1[head], v1[head], tile_mask,
                                    key_block_size)
        low = ~(l[:, 0] >= threshold)  # exps underflowed, no key may be attended, or NaN (an inf norm)
        if low.any():
            acc[low] = _attend_query_tile(q[head][rows][low], k[head], v[head],
                                          None if mask is None else tile_mask[low], key_block_size)
            l[low] = 1
        out[head][rows] = acc / l  # cast to the output's dtype here, for float16

    _run_tiles(attend, batch, out.shape[-2], block_size, workers)
    return out


def _attend_with_shift(q1, k1, v1, mask, block_size: int):
    """Sums exp(s - c) @ v and exp(s - c) over the keys, block by block, in base 2.

    q1 = (q log2(e) / sqrt(D), -c) with c in base 2, k1 = (k, 1), v1 = (v, 1). Returns
    (acc (Tb, Dv), l (Tb, 1)), two views of one (Tb, Dv + 1) array.
    """
    acc = np.zeros((*q1.shape[:-1], v1.shape[-1]), dtype=v1.dtype)  # (Tb, Dv + 1): sum of p @ (v, 1)
    for j in range(0, k1.shape[-2], block_size):
        cols = slice(j, j + block_size)
        p = q1 @ k1[cols].T  # (Tb, D + 1) @ (D + 1, Sb) -> (Tb, Sb): the scores minus c, all <= 0
        if mask is not None:
            np.copyto(p, -np.inf, where=~mask[:, cols])
        np.exp2(p, out=p)  # in place, at most 1: 2**((s - c) log2(e)) = e**(s - c), up to rounding
        acc += p @ v1[cols]  # (Tb, Sb) @ (Sb, Dv + 1) -> (Tb, Dv + 1): p @ v, and p's row sums last
        del p  # now, not when the next product replaces it: one (Tb, Sb) block at a time
    return acc[:, :-1], acc[:, -1:]  # (Tb, Dv) and (Tb, 1)


def _attend_query_tile(q, k, v, mask, block_size: int) -> np.ndarray:
    """Attention for one tile of queries q (..., Tb, D), streaming over the keys block by block."""
    q = q * (1.0 / math.sqrt(q.shape[-1]))  # (..., Tb, D); a Python float keeps float32 float32
    m = np.full((*q.shape[:-1], 1), -np.inf, dtype=q.dtype)  # (..., Tb, 1) running max: nothing seen yet
    l = np.zeros_like(m)  # (..., Tb, 1) running sum of exp(score - m)
    acc = np.zeros_like(m)  # running sum of exp(score - m) * value; grows to (..., Tb, Dv)
    for j in range(0, k.shape[-2], block_size):
        cols = slice(j, j + block_size)
        block_mask = None if mask is None else mask[..., cols]
        m, l, acc = _online_softmax_step(q, k[..., cols, :], v[..., cols, :], block_mask, m, l, acc)
    l[l == 0] = 1  # a query that may attend nothing: acc is 0, so its output stays 0
    return acc / l  # (..., Tb, Dv)


def _online_softmax_step(q, k, v, mask, m, l, acc):
    """Folds one block of keys k (..., Sb, D) and values v (..., Sb, Dv) into the running (m, l, acc).

    When the block raises a query's max from m to m_new, everything summed so far was
    relative to m, so l and acc are rescaled by exp(m - m_new) before the block is added.
    """
    p = q @ np.swapaxes(k, -1, -2)  # (..., Tb, D) @ (..., D, Sb) -> (..., Tb, Sb): the only big array
    if mask is not None:
        np.copyto(p, -np.inf, where=~mask)  # p is ours: fill in place
    m_new = np.maximum(m, np.max(p, axis=-1, keepdims=True))  # (..., Tb, 1)
    shift = np.where(np.isneginf(m_new), 0, m_new)  # nothing seen yet: subtract 0, not -inf (no NaN)
    p -= shift
    np.exp(p, out=p)  # the block's unnormalized weights, in place
    rescale = np.exp(m - shift)  # (..., Tb, 1): exp(m - m_new) <= 1, and 0 while m is -inf
    l = rescale * l + np.sum(p, axis=-1, keepdims=True)  # (..., Tb, 1)
    acc = rescale * acc + p @ v  # (..., Tb, Sb) @ (..., Sb, Dv) -> (..., Tb, Dv)
    return m_new, l, acc  # p is freed on return: one (Tb, Sb) block at a time
