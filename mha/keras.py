"""Multi-head attention in Keras 3, written with ``keras.ops`` only, so it runs on any backend.

The same names and meaning as ``mha.numpy``. Functions accept NumPy arrays or
backend tensors and return backend tensors; ``MultiHeadAttention`` is a
``keras.layers.Layer``. ``to_builtin`` loads an ``mha.Weights`` into
``keras.layers.MultiHeadAttention`` (see chapter 6 for its kernel shapes).
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
from keras import ops
from keras.src.backend import get_keras_mask  # no public name; Keras's own MultiHeadAttention uses it

from mha import Weights, _checks
from mha import numpy as _reference

__all__ = [
    "softmax",
    "masked_softmax",
    "causal_mask",
    "padding_mask",
    "sinusoidal_positions",
    "rope",
    "sliding_window_mask",
    "scaled_dot_product_attention",
    "split_heads",
    "merge_heads",
    "repeat_kv",
    "MultiHeadAttention",
    "to_builtin",
    "to_builtin_mask",
    "EncoderBlock",
    "KVCache",
    "DecoderBlock",
]


def _dtype(x) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def _shape(x) -> tuple:
    return tuple(x.shape)


def _tensor(x):
    """x as the backend's tensor: arrays are converted, a variable gives its value (a tf.Variable has no .ndim)."""
    if isinstance(x, keras.KerasTensor):
        return x
    if isinstance(x, keras.Variable):
        x = x.value
    if hasattr(x, "read_value"):  # a tf.Variable (also behind a keras.Variable on TensorFlow)
        x = x.read_value()
    return x if ops.is_tensor(x) else ops.convert_to_tensor(x)


def _numpy(x) -> np.ndarray:
    """A tensor or variable as a NumPy array (a variable has no .numpy() on every backend)."""
    return ops.convert_to_numpy(_tensor(x))


def _normalize(x, axis: int):
    """exp(x - max) / sum, where a row of only -inf (all masked) gives zeros, not NaN."""
    m = ops.max(x, axis=axis, keepdims=True)
    m = ops.where(ops.isinf(m) & (m < 0), ops.zeros_like(m), m)  # all -inf: subtract 0, every exp is 0
    e = ops.exp(x - m)
    total = ops.sum(e, axis=axis, keepdims=True)
    return e / ops.where(total == 0, ops.ones_like(total), total)


def _fill_masked(x, mask):
    return ops.where(mask, x, ops.full_like(x, float("-inf")))


def softmax(x, axis: int = -1):
    """Numerically stable softmax: subtracting the row's max changes nothing but the overflow."""
    x = _tensor(x)
    _checks.check_float("softmax", "x", _shape(x), _dtype(x))
    _checks.check_axis(axis, len(x.shape))
    return _normalize(x, axis)


def masked_softmax(x, mask, axis: int = -1):
    """Softmax over the entries where `mask` is True; rows with no True entry give zeros."""
    x, mask = _tensor(x), _tensor(mask)
    _checks.check_float("masked_softmax", "x", _shape(x), _dtype(x))
    _checks.check_axis(axis, len(x.shape))
    _checks.check_mask("masked_softmax", _shape(mask), _dtype(mask), _shape(x), "x.shape")
    return _normalize(_fill_masked(x, mask), axis)


def causal_mask(t: int, s: int | None = None, *, align: str = "top-left"):
    """Bool (T, S), True where query i may attend key j: j <= i (top-left, as ``use_causal_mask``).

    ``align="bottom-right"``: j <= i + (S - T), the last T of S positions, as when decoding with a cache.
    """
    s = t if s is None else s
    _checks.check_positive_int("t", t)
    _checks.check_positive_int("s", s)
    _checks.check_align(align)
    offset = s - t if align == "bottom-right" else 0  # where query 0 sits among the keys
    return ops.arange(s)[None, :] <= ops.arange(t)[:, None] + offset  # (1, S) <= (T, 1) -> (T, S)


def padding_mask(lengths, s: int):
    """Bool (B, 1, 1, S), True on the first lengths[b] keys of sequence b (the real tokens)."""
    _checks.check_positive_int("s", s)
    lengths = _tensor(lengths)
    if not _dtype(lengths).startswith(("int", "uint")):
        raise TypeError(f"padding_mask: lengths must be integers, got dtype {_dtype(lengths)}")
    _checks.check_lengths(_shape(lengths), ops.convert_to_numpy(lengths).tolist(), s)
    keep = ops.arange(s, dtype=_dtype(lengths))[None, :] < lengths[:, None]  # (1, S) < (B, 1) -> (B, S)
    return keep[:, None, None, :]  # (B, S) -> (B, 1, 1, S): broadcasts over heads and queries


def sinusoidal_positions(t: int, d_model: int):
    """(T, E) float32: the position encoding of Vaswani et al., added to the token embeddings (chapter 10).

    The table is `mha.numpy.sinusoidal_positions`'s, as a tensor: a constant, built once in
    float64 there. (Built with `keras.ops` it would not be: the JAX backend takes `ops.sin` of a
    float64 tensor in float32: 7.5e-6 off at T = 300, E = 64, where the NumPy table is within 1e-7.)
    """
    return ops.convert_to_tensor(_reference.sinusoidal_positions(t, d_model))


def rope(x, positions=None, base: float = 10000.0):
    """Rotary position embedding of x (..., T, D), D even, in the half-split layout (chapter 12).

    Pair i is (x_i, x_{i+D/2}), turned by the angle p * base^(-2i/D) at position p, as KerasHub's
    ``RotaryEmbedding``. `positions`: integers (T,), 0..T-1 by default. The cos/sin table is built
    from the NumPy reference's float64 angles, as `sinusoidal_positions` is, so `positions` must
    hold values (not a symbolic tensor): Keras's JAX backend takes ``ops.sin`` of float64 in float32.
    """
    x = _tensor(x)
    pos = None if positions is None else _tensor(positions)
    pos_shape, pos_dtype = (None, None) if pos is None else (_shape(pos), _dtype(pos))
    _checks.check_rope(_shape(x), _dtype(x), pos_shape, pos_dtype, base)
    t, d = x.shape[-2:]
    angle = _reference._rope_angles(np.arange(t) if pos is None else ops.convert_to_numpy(pos), d, base)
    cos = ops.cast(ops.convert_to_tensor(np.cos(angle)), _dtype(x))  # (T, D/2), in x's dtype
    sin = ops.cast(ops.convert_to_tensor(np.sin(angle)), _dtype(x))
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]  # (..., T, D/2) each: the two halves of every pair
    return ops.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)  # (..., T, D)


def sliding_window_mask(t: int, window: int, s: int | None = None):
    """Bool (T, S), S >= T: query i may attend the `window` most recent keys up to its own position.

    Bottom-right aligned: key j is allowed when i + (S - T) - window < j <= i + (S - T).
    (``keras.layers.MultiHeadAttention(sliding_window=w)`` with ``use_causal_mask=True`` is
    ``sliding_window_mask(t, w)`` when S = T; chapter 12.)
    """
    s = t if s is None else s
    _checks.check_window(t, window, s)
    position = ops.arange(t)[:, None] + (s - t)  # (T, 1): where each query sits among the keys
    key = ops.arange(s)[None, :]  # (1, S)
    return (key <= position) & (key > position - window)  # (1, S) vs (T, 1) -> (T, S)


def scaled_dot_product_attention(query, key, value, mask=None, *, dropout=0.0, rng=None):
    """softmax(q k^T / sqrt(D)) v for q (..., T, D), k (..., S, D), v (..., S, Dv).

    `mask` is boolean, True = may attend, broadcastable to (..., T, S).
    Returns (out (..., T, Dv), weights (..., T, S)); fully masked rows give zeros.
    `dropout` > 0 zeroes each weight with that probability before they multiply v
    (the kept ones scaled by 1/(1 - dropout)), drawn with `rng`, a seed: an int or a
    ``keras.random.SeedGenerator``; the weights returned are those before dropout (chapter 9).
    """
    q, k, v = _tensor(query), _tensor(key), _tensor(value)
    dropout = _checks.check_dropout("scaled_dot_product_attention", dropout)
    scores_shape = _checks.check_attention(_shape(q), _shape(k), _shape(v), _dtype(q), _dtype(k), _dtype(v))
    if mask is not None:
        mask = _tensor(mask)
        _checks.check_mask("scaled_dot_product_attention", _shape(mask), _dtype(mask), scores_shape, "(..., T, S)")
    q = q * ops.cast(1.0 / math.sqrt(q.shape[-1]), q.dtype)  # cast: keep float16 float16
    scores = ops.matmul(q, ops.swapaxes(k, -1, -2))  # (..., T, D) @ (..., D, S) -> (..., T, S)
    weights = _normalize(scores if mask is None else _fill_masked(scores, mask), -1)
    if dropout:
        return ops.matmul(_dropout(weights, dropout, rng), v), weights  # (..., T, S) @ (..., S, Dv) -> (..., T, Dv)
    return ops.matmul(weights, v), weights  # (..., T, S) @ (..., S, Dv) -> (..., T, Dv)


def split_heads(x, num_heads: int):
    """(B, T, E) -> (B, H, T, D), einops 'b t (h d) -> b h t d'."""
    x = _tensor(x)
    _checks.check_rank("split_heads", "x", _shape(x), 3, "(B, T, E)")
    _checks.check_positive_int("num_heads", num_heads)
    _checks.check_heads(x.shape[-1], num_heads)
    b, t = ops.shape(x)[0], ops.shape(x)[1]  # sizes, or tensors while Keras traces
    x = ops.reshape(x, (b, t, num_heads, x.shape[-1] // num_heads))  # (B, T, E) -> (B, T, H, D)
    return ops.transpose(x, (0, 2, 1, 3))  # (B, T, H, D) -> (B, H, T, D)


def merge_heads(x):
    """(B, H, T, D) -> (B, T, E), einops 'b h t d -> b t (h d)'; the inverse of split_heads."""
    x = _tensor(x)
    _checks.check_rank("merge_heads", "x", _shape(x), 4, "(B, H, T, D)")
    b, t = ops.shape(x)[0], ops.shape(x)[2]
    h, d = x.shape[1], x.shape[3]
    x = ops.transpose(x, (0, 2, 1, 3))  # (B, H, T, D) -> (B, T, H, D)
    return ops.reshape(x, (b, t, h * d))  # (B, T, H, D) -> (B, T, E)


def repeat_kv(x, n_rep: int):
    """(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D): each key/value head repeated for its group of query heads.

    Query head h reads kv head h // n_rep, torch's ``enable_gqa`` layout and the one
    ``keras.layers.GroupQueryAttention`` builds with ``ops.repeat``, einops 'b g s d -> b (g r) s d'.
    """
    x = _tensor(x)
    _checks.check_repeat_kv(_shape(x), n_rep)
    return ops.repeat(x, n_rep, axis=1)  # (B, Hkv, S, D) -> (B, Hkv * n_rep, S, D)


def _and(a, b):
    return b if a is None else a if b is None else a & b


def _sequence_masks(inputs: dict, sequence_masks: tuple):
    """The Keras sequence masks of query, key and value as one (B, 1, T, S) attention mask, or None.

    As keras.layers.MultiHeadAttention: query i may attend key j when query token i and
    key/value token j are both real (True in their (B, T) / (B, S) masks).
    """
    mask = None
    for (name, x), seq, axis in zip(inputs.items(), sequence_masks, (-1, -2, -2)):
        if seq is not None:
            seq = ops.cast(seq, "bool")  # as Keras: any 0/1 mask counts
            _checks.check_sequence_mask(name, _shape(seq), _shape(x))
            seq = ops.expand_dims(ops.expand_dims(seq, 1), axis)  # (B, T) -> (B, 1, T, 1); (B, S) -> (B, 1, 1, S)
            mask = _and(mask, seq)
    return mask


class MultiHeadAttention(keras.layers.Layer):
    """Multi-head attention as a ``keras.layers.Layer`` holding four (E, E) kernels.

    Called as ``(query, key=None, value=None, mask=None)``: key defaults to
    query and value to key. Returns (out (B, T, E), weights (B, H, T, S)).
    ``get_weights()`` returns an ``mha.Weights`` (not Keras's list of arrays).
    ``num_kv_heads`` (Hkv, dividing H) makes it grouped-query attention: the key and value
    kernels are (E, Hkv * D), shared by groups of H / Hkv query heads (Hkv = 1: multi-query);
    None is plain multi-head attention, the same kernels and config.
    """

    _NAMES = ("q", "k", "v", "o")

    def __init__(self, d_model: int, num_heads: int, bias: bool = True, *, dropout: float = 0.0, seed=None,
                 num_kv_heads: int | None = None, **kwargs):
        super().__init__(**kwargs)
        _checks.check_positive_int("d_model", d_model)
        _checks.check_positive_int("num_heads", num_heads)
        _checks.check_heads(d_model, num_heads)
        self.d_model, self.num_heads, self.bias = d_model, num_heads, bias
        self.num_kv_heads = _checks.check_kv_heads(num_heads, num_kv_heads)  # Hkv; None -> H
        self.dropout, self.seed = _checks.check_dropout("MultiHeadAttention", dropout), seed
        # Dropout draws from the layer's own seed state (a Keras layer must not use the global one while traced).
        self._seed_generator = keras.random.SeedGenerator(seed) if self.dropout else None

    def build(self, query_shape=None):
        e = self.d_model
        kv = self.num_kv_heads * (e // self.num_heads)  # Hkv * D: E for plain multi-head attention
        widths = dict(zip(self._NAMES, (e, kv, kv, e)))  # the output width of each projection
        self.kernels = [
            self.add_weight(name=f"w_{n}", shape=(e, widths[n]), initializer="glorot_uniform") for n in self._NAMES
        ]
        self.biases = [
            self.add_weight(name=f"b_{n}", shape=(widths[n],), initializer="zeros") if self.bias else None
            for n in self._NAMES
        ]

    def _linear(self, x, i: int):
        y = ops.matmul(x, self.kernels[i])  # (B, T, E) @ (E, E or Hkv * D) -> (B, T, E or Hkv * D)
        return y if self.biases[i] is None else y + self.biases[i]

    def __call__(self, query, key=None, value=None, mask=None, **kwargs):
        # Keras fills a `call` argument named `mask` with the inputs' sequence mask (from
        # Embedding(mask_zero=True)) when the caller passes none: `call` names ours attention_mask.
        if mask is not None:
            kwargs["attention_mask"] = mask
        return super().__call__(query, key, value, **kwargs)

    def call(self, query, key=None, value=None, attention_mask=None, training=None):
        key = query if key is None else key
        value = key if value is None else value
        sequence_masks = [get_keras_mask(x) for x in (query, key, value)]  # (B, T) or None each; Keras's
        query, key, value = _tensor(query), _tensor(key), _tensor(value)
        _checks.check_mha_inputs(
            self.d_model, _shape(query), _shape(key), _shape(value), (_dtype(query), _dtype(key), _dtype(value))
        )
        sequence_mask = _sequence_masks({"query": query, "key": key, "value": value}, sequence_masks)
        target = (query.shape[0], self.num_heads, query.shape[1], key.shape[1])
        mask = None
        if attention_mask is not None:
            mask = _tensor(attention_mask)
            _checks.check_mask("MultiHeadAttention", _shape(mask), _dtype(mask), target, "(B, H, T, S)")
        mask = _and(mask, sequence_mask)
        h, g = self.num_heads, self.num_kv_heads
        q = split_heads(self._linear(query, 0), h)  # (B, T, E) -> (B, H, T, D)
        k = split_heads(self._linear(key, 1), g)  # (B, S, E) -> (B, Hkv, S, D)
        v = split_heads(self._linear(value, 2), g)  # (B, S, E) -> (B, Hkv, S, D)
        k, v = repeat_kv(k, h // g), repeat_kv(v, h // g)  # (B, Hkv, S, D) -> (B, H, S, D)
        p = self.dropout if training else 0.0  # Keras passes training=True inside fit(), None or False otherwise
        out, weights = scaled_dot_product_attention(q, k, v, mask, dropout=p, rng=self._seed_generator)
        return self._linear(merge_heads(out), 3), weights  # (B, H, T, D) -> (B, T, E)

    def compute_mask(self, inputs, previous_mask=None):
        # As keras.layers.MultiHeadAttention: `out` keeps the query's sequence mask, the weights none.
        return None if previous_mask is None else (previous_mask, None)

    def decode(self, x, cache: "KVCache | None" = None):
        """Causal self-attention of new tokens x (B, T_new, E) over the cached keys and values and their own.

        The S = len(cache) + T_new keys are masked bottom-right. Returns
        (out (B, T_new, E), weights (B, H, T_new, S), the cache with S keys).
        """
        x = _tensor(x)
        _checks.check_decode_input(self.d_model, _shape(x), _dtype(x))
        if cache is not None:
            _checks.check_cache_type(isinstance(cache, KVCache), cache)
            expected = (x.shape[0], self.num_kv_heads, self.d_model // self.num_heads)  # (B, Hkv, D)
            _checks.check_cache(_shape(cache.k), _shape(cache.v), expected, (_dtype(cache.k), _dtype(cache.v)))
        if not self.built:
            self.build()
        h, g = self.num_heads, self.num_kv_heads
        q = split_heads(self._linear(x, 0), h)  # (B, T_new, E) -> (B, H, T_new, D)
        k = split_heads(self._linear(x, 1), g)  # (B, T_new, E) -> (B, Hkv, T_new, D)
        v = split_heads(self._linear(x, 2), g)  # (B, T_new, E) -> (B, Hkv, T_new, D)
        cache = KVCache(k, v) if cache is None else cache.append(k, v)  # (B, Hkv, S, D): H / Hkv times smaller
        mask = causal_mask(q.shape[2], len(cache), align="bottom-right")  # (T_new, S)
        k, v = repeat_kv(cache.k, h // g), repeat_kv(cache.v, h // g)  # (B, Hkv, S, D) -> (B, H, S, D)
        out, weights = scaled_dot_product_attention(q, k, v, mask)  # (B, H, T_new, D), (B, H, T_new, S)
        return self._linear(merge_heads(out), 3), weights, cache  # (B, H, T_new, D) -> (B, T_new, E)

    def get_config(self) -> dict:
        config = {**super().get_config(), "d_model": self.d_model, "num_heads": self.num_heads, "bias": self.bias,
                  "dropout": self.dropout, "seed": self.seed}
        if self.num_kv_heads != self.num_heads:  # only for GQA: a plain layer's config stays as it was
            config["num_kv_heads"] = self.num_kv_heads
        return config

    def get_weights(self) -> Weights:
        """The layer's parameters as an ``mha.Weights``."""
        if not self.built:
            self.build()
        ws = [_numpy(k) for k in self.kernels]
        bs = [None if b is None else _numpy(b) for b in self.biases]
        return Weights(self.num_heads, *ws, *bs, num_kv_heads=self.num_kv_heads)

    @classmethod
    def from_weights(cls, w: Weights, *, dropout: float = 0.0, seed=None) -> "MultiHeadAttention":
        layer = cls(w.d_model, w.num_heads, bias=w.has_bias, dropout=dropout, seed=seed, num_kv_heads=w.num_kv_heads)
        layer.build()
        for kernel, bias, w_e, b_e in zip(layer.kernels, layer.biases, (w.w_q, w.w_k, w.w_v, w.w_o), w.biases()):
            kernel.assign(w_e)
            if bias is not None:
                bias.assign(b_e)
        return layer


# Chapter 9: dropout on the attention weights.

def _dropout(weights, p: float, rng):
    """Zeroes each entry with probability p and scales the kept ones by 1/(1 - p): unchanged on average."""
    if rng is not None and not isinstance(rng, (int, keras.random.SeedGenerator)) or isinstance(rng, bool):
        raise TypeError(
            f"scaled_dot_product_attention: rng must be a seed (an int or a keras.random.SeedGenerator), "
            f"got {type(rng).__name__}"
        )
    noise = keras.random.uniform(ops.shape(weights), dtype=weights.dtype, seed=rng)  # (..., T, S) in [0, 1)
    return ops.where(noise >= p, weights / (1 - p), ops.zeros_like(weights))  # kept with probability 1 - p


def to_builtin(w: Weights) -> keras.layers.MultiHeadAttention | keras.layers.GroupQueryAttention:
    """A built ``keras.layers.MultiHeadAttention`` carrying exactly `w`.

    Its kernels split the head axis out: query/key/value (E, H, D), output
    (H, D, E). Call it as ``layer(query, value, key, attention_mask=...)``:
    value comes second. For `w` with num_kv_heads < num_heads it is a built
    ``keras.layers.GroupQueryAttention``, called the same way: key/value kernels
    (E, Hkv, D), each kv head repeated for H / Hkv query heads (chapter 12).
    """
    e, h, g, d = w.d_model, w.num_heads, w.num_kv_heads, w.head_dim
    if g == h:
        layer = keras.layers.MultiHeadAttention(num_heads=h, key_dim=d, use_bias=w.has_bias)
    else:
        layer = keras.layers.GroupQueryAttention(head_dim=d, num_query_heads=h, num_key_value_heads=g,
                                                 use_bias=w.has_bias)
    layer.build(query_shape=(None, None, e), value_shape=(None, None, e))
    b_q, b_k, b_v, b_o = w.biases()
    dense = (layer._query_dense, layer._key_dense, layer._value_dense)
    for part, w_e, b_e, heads in zip(dense, (w.w_q, w.w_k, w.w_v), (b_q, b_k, b_v), (h, g, g)):
        part.kernel.assign(w_e.reshape(e, heads, d))  # (E, E) -> (E, H, D); (E, Hkv * D) -> (E, Hkv, D)
        if w.has_bias:
            part.bias.assign(b_e.reshape(heads, d))  # (E,) -> (H, D); (Hkv * D,) -> (Hkv, D)
    layer._output_dense.kernel.assign(w.w_o.reshape(h, d, e))  # (E, E) -> (H, D, E)
    if w.has_bias:
        layer._output_dense.bias.assign(b_o)
    return layer


def to_builtin_mask(mask, batch: int, t: int, s: int):
    """Our mask as ``keras.layers.MultiHeadAttention``'s ``attention_mask``: the same meaning
    (True = may attend) but shaped (B, T, S), shared by every head."""
    mask = _tensor(mask)
    _checks.check_mask("to_builtin_mask", _shape(mask), _dtype(mask), (batch, 1, t, s), "(B, 1, T, S)")
    return ops.broadcast_to(mask, (batch, 1, t, s))[:, 0]  # (B, 1, T, S) -> (B, T, S)


# The encoder block of chapter 8.

class EncoderBlock(keras.layers.Layer):
    """A transformer encoder block: self-attention and a position-wise FFN, each with a residual and LayerNorm.

    post-LN (``norm_first=False``, the original):  x = LN(x + Drop(MHA(x)));  x = LN(x + Drop(FFN(x)))
    pre-LN  (``norm_first=True``):                 x = x + Drop(MHA(LN(x)));  x = x + Drop(FFN(LN(x)))

    FFN(x) = Dense(d_ff) -> ReLU -> Dropout -> Dense(E), dropout in the same places as ``mha.torch.EncoderBlock``.
    Called as ``block(x, mask=None, training=None)``; Keras's ``training`` switches dropout on.
    Returns (out (B, T, E), weights (B, H, T, T)).
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float = 0.0, norm_first: bool = False,
                 eps: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        _checks.check_block_args(d_model, num_heads, d_ff, dropout, norm_first, eps)
        self.d_model, self.num_heads, self.d_ff, self.norm_first = d_model, num_heads, d_ff, norm_first
        self.rate, self.eps = dropout, eps
        self.attn = MultiHeadAttention(d_model, num_heads)
        # Keras's LayerNormalization defaults to epsilon=1e-3, torch's nn.LayerNorm to 1e-5: pass eps on.
        self.norm1 = keras.layers.LayerNormalization(epsilon=eps)
        self.norm2 = keras.layers.LayerNormalization(epsilon=eps)
        self.linear1 = keras.layers.Dense(d_ff)
        self.linear2 = keras.layers.Dense(d_model)
        self.dropout = keras.layers.Dropout(dropout)  # no weights: one layer serves all three places

    def build(self, input_shape=None):
        x_shape, h_shape = (None, None, self.d_model), (None, None, self.d_ff)
        self.attn.build()
        for layer, shape in ((self.norm1, x_shape), (self.norm2, x_shape), (self.linear1, x_shape),
                             (self.linear2, h_shape)):
            layer.build(shape)

    def _ffn(self, x, training=None):
        h = self.dropout(ops.relu(self.linear1(x)), training=training)  # (B, T, E) -> (B, T, d_ff)
        return self.linear2(h)  # (B, T, d_ff) -> (B, T, E)

    def __call__(self, x, mask=None, training=None, **kwargs):
        # As MultiHeadAttention: Keras would fill a `call` argument named `mask` with x's sequence mask.
        if mask is not None:
            kwargs["attention_mask"] = mask
        return super().__call__(x, training=training, **kwargs)

    def call(self, x, attention_mask=None, training=None):
        x = _tensor(x)
        _checks.check_block_input(self.d_model, _shape(x), _dtype(x))
        drop = lambda y: self.dropout(y, training=training)
        if self.norm_first:  # pre-LN: each sublayer sees a normalized copy; the residual path is left alone
            a, weights = self.attn(self.norm1(x), mask=attention_mask)  # (B, T, E), (B, H, T, T)
            x = x + drop(a)
            x = x + drop(self._ffn(self.norm2(x), training))
        else:  # post-LN: normalize each residual sum
            a, weights = self.attn(x, mask=attention_mask)  # (B, T, E), (B, H, T, T)
            x = self.norm1(x + drop(a))
            x = self.norm2(x + drop(self._ffn(x, training)))
        return x, weights

    def compute_mask(self, inputs, previous_mask=None):
        # x's sequence mask stays on the output, as on keras.layers.MultiHeadAttention's.
        return None if previous_mask is None else (previous_mask, None)

    def get_config(self) -> dict:
        return {**super().get_config(), "d_model": self.d_model, "num_heads": self.num_heads, "d_ff": self.d_ff,
                "dropout": self.rate, "norm_first": self.norm_first, "eps": self.eps}

    def _variables(self) -> dict:
        """Each key of ``to_numpy_dict`` and the Keras variable behind it (Dense kernels are already (in, out))."""
        if not self.built:
            self.build()
        attn = self.attn
        return {
            **{f"w_{n}": k for n, k in zip("qkvo", attn.kernels)}, **{f"b_{n}": b for n, b in zip("qkvo", attn.biases)},
            "ln1_gamma": self.norm1.gamma, "ln1_beta": self.norm1.beta,
            "ln2_gamma": self.norm2.gamma, "ln2_beta": self.norm2.beta,
            "w_1": self.linear1.kernel, "b_1": self.linear1.bias, "w_2": self.linear2.kernel, "b_2": self.linear2.bias,
        }

    def to_numpy_dict(self) -> dict[str, np.ndarray]:
        """Every parameter as a float32 NumPy array, applied as ``x @ w``."""
        return {name: np.array(_numpy(v), dtype=np.float32) for name, v in self._variables().items()}

    @classmethod
    def from_numpy_dict(cls, d: dict, num_heads: int, *, dropout: float = 0.0, norm_first: bool = False,
                        eps: float = 1e-5) -> "EncoderBlock":
        """The inverse of ``to_numpy_dict``; d_model and d_ff are read from the shape of ``d['w_1']``."""
        e, f = _checks.check_block_dict(d)
        block = cls(e, num_heads, f, dropout=dropout, norm_first=norm_first, eps=eps)
        for name, variable in block._variables().items():
            variable.assign(np.asarray(d[name], dtype=np.float32))
        return block


# Chapter 11: decoding. The key/value cache and the decoder block.

@dataclasses.dataclass(frozen=True)
class KVCache:
    """The keys and values of every token decoded so far by one attention layer: k, v (B, Hkv, S, D).

    ``len(cache)`` is S. ``append`` returns a new, longer cache and leaves this one as it was.
    """

    k: object
    v: object

    def __len__(self) -> int:
        return self.k.shape[2]

    def append(self, k, v) -> "KVCache":
        """This cache followed by the new tokens' k, v (B, Hkv, T_new, D): (B, Hkv, S + T_new, D)."""
        return KVCache(ops.concatenate([self.k, k], axis=2), ops.concatenate([self.v, v], axis=2))

    @property
    def nbytes(self) -> int:
        itemsize = np.dtype(_dtype(self.k)).itemsize
        return 2 * math.prod(self.k.shape) * itemsize


class DecoderBlock(keras.layers.Layer):
    """A transformer decoder block: masked self-attention, cross-attention over the encoder's output, an FFN.

    post-LN (``norm_first=False``):  x = LN1(x + Drop(SelfMHA(x)));  x = LN2(x + Drop(CrossMHA(x, memory)));
                                     x = LN3(x + Drop(FFN(x)))
    pre-LN  (``norm_first=True``):   x = x + Drop(SelfMHA(LN1(x)));  x = x + Drop(CrossMHA(LN2(x), memory));
                                     x = x + Drop(FFN(LN3(x)))

    Dropout in the same places as ``mha.torch.DecoderBlock``. Called as
    ``block(x, memory, mask=None, memory_mask=None, training=None)``: x (B, T, E), memory (B, S, E),
    `mask` broadcastable to (B, H, T, T), `memory_mask` to (B, H, T, S); the block never reads Keras's
    implicit sequence masks as these (pass them explicitly).
    Returns (out (B, T, E), self_weights (B, H, T, T), cross_weights (B, H, T, S)).
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float = 0.0, norm_first: bool = False,
                 eps: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        _checks.check_decoder_args(d_model, num_heads, d_ff, dropout, norm_first, eps)
        self.d_model, self.num_heads, self.d_ff, self.norm_first = d_model, num_heads, d_ff, norm_first
        self.rate, self.eps = dropout, eps
        self.self_attn = MultiHeadAttention(d_model, num_heads)
        self.cross_attn = MultiHeadAttention(d_model, num_heads)
        # Keras's LayerNormalization defaults to epsilon=1e-3, torch's nn.LayerNorm to 1e-5: pass eps on.
        self.norm1, self.norm2, self.norm3 = (keras.layers.LayerNormalization(epsilon=eps) for _ in range(3))
        self.linear1 = keras.layers.Dense(d_ff)
        self.linear2 = keras.layers.Dense(d_model)
        self.dropout = keras.layers.Dropout(dropout)  # no weights: one layer serves all four places

    def build(self, input_shape=None, memory_shape=None):
        x_shape, h_shape = (None, None, self.d_model), (None, None, self.d_ff)
        self.self_attn.build()
        self.cross_attn.build()
        for layer, shape in ((self.norm1, x_shape), (self.norm2, x_shape), (self.norm3, x_shape),
                             (self.linear1, x_shape), (self.linear2, h_shape)):
            layer.build(shape)

    def _ffn(self, x, training=None):
        h = self.dropout(ops.relu(self.linear1(x)), training=training)  # (B, T, E) -> (B, T, d_ff)
        return self.linear2(h)  # (B, T, d_ff) -> (B, T, E)

    def __call__(self, x, memory, mask=None, memory_mask=None, training=None, **kwargs):
        # Keras fills a call argument named `mask` or `memory_mask` with the inputs' implicit sequence
        # masks (`_keras_mask`, shape (B, T) or (B, S)): hand `call` the attention masks under a name
        # it does not touch, so only the masks the caller passed are ever applied.
        return super().__call__(x, memory, attention_masks=(mask, memory_mask), training=training, **kwargs)

    def call(self, x, memory, attention_masks=(None, None), training=None):
        mask, memory_mask = attention_masks
        _checks.check_decoder_input(self.d_model, _shape(x), _shape(memory), _dtype(x), _dtype(memory))
        drop = lambda y: self.dropout(y, training=training)
        if self.norm_first:  # pre-LN: each sublayer sees a normalized copy of x; the residual path is left alone
            a, self_weights = self.self_attn(self.norm1(x), mask=mask)  # (B, T, E), (B, H, T, T)
            x = x + drop(a)
            c, cross_weights = self.cross_attn(self.norm2(x), memory, mask=memory_mask)  # (B, H, T, S)
            x = x + drop(c)
            x = x + drop(self._ffn(self.norm3(x), training))
        else:  # post-LN: normalize each residual sum
            a, self_weights = self.self_attn(x, mask=mask)  # (B, T, E), (B, H, T, T)
            x = self.norm1(x + drop(a))
            c, cross_weights = self.cross_attn(x, memory, mask=memory_mask)  # queries from x, keys from memory
            x = self.norm2(x + drop(c))
            x = self.norm3(x + drop(self._ffn(x, training)))
        return x, self_weights, cross_weights

    def compute_mask(self, inputs, previous_mask=None):
        # `mask` here is an attention mask, not a Keras sequence mask to hand downstream.
        return None

    def get_config(self) -> dict:
        return {**super().get_config(), "d_model": self.d_model, "num_heads": self.num_heads, "d_ff": self.d_ff,
                "dropout": self.rate, "norm_first": self.norm_first, "eps": self.eps}

    def _variables(self) -> dict:
        """Each key of ``to_numpy_dict`` and the Keras variable behind it (Dense kernels are already (in, out))."""
        if not self.built:
            self.build()
        v = {}
        for prefix, attn in (("self", self.self_attn), ("cross", self.cross_attn)):
            v.update({f"{prefix}_w_{n}": k for n, k in zip("qkvo", attn.kernels)})
            v.update({f"{prefix}_b_{n}": b for n, b in zip("qkvo", attn.biases)})
        for i, norm in enumerate((self.norm1, self.norm2, self.norm3), 1):
            v[f"ln{i}_gamma"], v[f"ln{i}_beta"] = norm.gamma, norm.beta
        v.update({"w_1": self.linear1.kernel, "b_1": self.linear1.bias,
                  "w_2": self.linear2.kernel, "b_2": self.linear2.bias})
        return v

    def to_numpy_dict(self) -> dict[str, np.ndarray]:
        """Every parameter as a float32 NumPy array, applied as ``x @ w``."""
        return {name: np.array(v.numpy(), dtype=np.float32) for name, v in self._variables().items()}

    @classmethod
    def from_numpy_dict(cls, d: dict, num_heads: int, *, dropout: float = 0.0, norm_first: bool = False,
                        eps: float = 1e-5) -> "DecoderBlock":
        """The inverse of ``to_numpy_dict``; d_model and d_ff are read from the shape of ``d['w_1']``."""
        e, f = _checks.check_decoder_dict(d)
        block = cls(e, num_heads, f, dropout=dropout, norm_first=norm_first, eps=eps)
        for name, variable in block._variables().items():
            variable.assign(np.asarray(d[name], dtype=np.float32))
        return block
