"""Multi-head attention in PyTorch: the same names and meaning as ``mha.numpy``.

Functions take and return ``torch.Tensor``; ``MultiHeadAttention`` is an
``nn.Module``. ``to_builtin`` loads an ``mha.Weights`` into PyTorch's own
``nn.MultiheadAttention`` (see chapter 5 for why its mask is inverted).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn

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
    "to_builtin_decoder",
]


def _dtype(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


def _shape(x: torch.Tensor) -> tuple:
    return tuple(x.shape)


def _tensor(where: str, name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _normalize(x: torch.Tensor, axis: int) -> torch.Tensor:
    """torch.softmax (stable: it subtracts the row's max), where a row of only -inf gives zeros, not NaN."""
    empty = torch.isneginf(x.amax(dim=axis, keepdim=True))  # (..., 1): rows with no entry left (all masked)
    if not empty.any():
        return torch.softmax(x, dim=axis)
    # softmax would give those rows 0/0 = NaN, and NaN gradients: give them zeros (from finite inputs)
    return torch.softmax(x.masked_fill(empty, 0), dim=axis).masked_fill(empty, 0)


def softmax(x: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Numerically stable softmax: subtracting the row's max changes nothing but the overflow."""
    _tensor("softmax", "x", x)
    _checks.check_float("softmax", "x", _shape(x), _dtype(x))
    _checks.check_axis(axis, x.ndim)
    return _normalize(x, axis)


def masked_softmax(x: torch.Tensor, mask: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Softmax over the entries where `mask` is True; rows with no True entry give zeros."""
    _tensor("masked_softmax", "x", x)
    _tensor("masked_softmax", "mask", mask)
    _checks.check_float("masked_softmax", "x", _shape(x), _dtype(x))
    _checks.check_axis(axis, x.ndim)
    _checks.check_mask("masked_softmax", _shape(mask), _dtype(mask), _shape(x), "x.shape")
    return _normalize(x.masked_fill(~mask, float("-inf")), axis)


def causal_mask(t: int, s: int | None = None, *, align: str = "top-left") -> torch.Tensor:
    """Bool (T, S), True where query i may attend key j: j <= i (top-left, as ``is_causal``).

    ``align="bottom-right"``: j <= i + (S - T), as ``torch.nn.attention.bias.causal_lower_right``.
    """
    s = t if s is None else s
    _checks.check_positive_int("t", t)
    _checks.check_positive_int("s", s)
    _checks.check_align(align)
    offset = s - t if align == "bottom-right" else 0  # where query 0 sits among the keys
    return torch.arange(s)[None, :] <= torch.arange(t)[:, None] + offset  # (1, S) <= (T, 1) -> (T, S)


def padding_mask(lengths, s: int) -> torch.Tensor:
    """Bool (B, 1, 1, S), True on the first lengths[b] keys of sequence b (the real tokens)."""
    _checks.check_positive_int("s", s)
    lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"padding_mask: lengths must be integers, got dtype {_dtype(lengths)}")
    _checks.check_lengths(_shape(lengths), lengths.tolist(), s)
    keep = torch.arange(s, device=lengths.device)[None, :] < lengths[:, None]  # (1, S) < (B, 1) -> (B, S)
    return keep[:, None, None, :]  # (B, S) -> (B, 1, 1, S): broadcasts over heads and queries


def sinusoidal_positions(t: int, d_model: int) -> torch.Tensor:
    """(T, E) float32: the position encoding of Vaswani et al., added to the token embeddings (chapter 10).

    The table is `mha.numpy.sinusoidal_positions`'s, as a tensor: a constant, one formula for the
    three backends.
    """
    return torch.from_numpy(_reference.sinusoidal_positions(t, d_model))


def rope(x: torch.Tensor, positions: torch.Tensor | None = None, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x (..., T, D), D even, in the half-split layout (chapter 12).

    Pair i is (x_i, x_{i+D/2}), turned by the angle p * base^(-2i/D) at position p, as
    Hugging Face's ``rotate_half``. `positions`: an integer tensor (T,), 0..T-1 by default.
    """
    _tensor("rope", "x", x)
    if positions is not None:
        _tensor("rope", "positions", positions)
    pos_shape, pos_dtype = (None, None) if positions is None else (_shape(positions), _dtype(positions))
    _checks.check_rope(_shape(x), _dtype(x), pos_shape, pos_dtype, base)
    t, d = x.shape[-2:]
    pos = torch.arange(t, device=x.device) if positions is None else positions.to(x.device)
    freq = float(base) ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)  # (D/2,)
    angle = pos.to(torch.float64)[:, None] * freq  # (T, 1) * (D/2,) -> (T, D/2); float64, as in NumPy
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)  # (T, D/2), in x's dtype
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]  # (..., T, D/2) each: the two halves of every pair
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (..., T, D)


def sliding_window_mask(t: int, window: int, s: int | None = None) -> torch.Tensor:
    """Bool (T, S), S >= T: query i may attend the `window` most recent keys up to its own position.

    Bottom-right aligned: key j is allowed when i + (S - T) - window < j <= i + (S - T).
    """
    s = t if s is None else s
    _checks.check_window(t, window, s)
    position = torch.arange(t)[:, None] + (s - t)  # (T, 1): where each query sits among the keys
    key = torch.arange(s)[None, :]  # (1, S)
    return (key <= position) & (key > position - window)  # (1, S) vs (T, 1) -> (T, S)


def scaled_dot_product_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None, *,
    dropout: float = 0.0, rng: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(D)) v for q (..., T, D), k (..., S, D), v (..., S, Dv).

    `mask` is boolean, True = may attend, broadcastable to (..., T, S).
    Returns (out (..., T, Dv), weights (..., T, S)); fully masked rows give zeros.
    `dropout` > 0 zeroes each weight with that probability before they multiply v
    (the kept ones scaled by 1/(1 - dropout)), drawn from `rng`, a torch.Generator
    (None: torch's global one); the weights returned are those before dropout (chapter 9).
    """
    where = "scaled_dot_product_attention"
    q, k, v = (_tensor(where, n, x) for n, x in (("query", query), ("key", key), ("value", value)))
    dropout = _checks.check_dropout(where, dropout)
    scores_shape = _checks.check_attention(_shape(q), _shape(k), _shape(v), _dtype(q), _dtype(k), _dtype(v))
    if mask is not None:
        _tensor(where, "mask", mask)
        _checks.check_mask(where, _shape(mask), _dtype(mask), scores_shape, "(..., T, S)")
    q = q * (1.0 / math.sqrt(q.shape[-1]))  # scaling q, not the scores: no half-precision overflow first
    scores = q @ k.transpose(-2, -1)  # (..., T, D) @ (..., D, S) -> (..., T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # blocked keys: exp(-inf) = 0
    weights = _normalize(scores, -1)  # (..., T, S): each query's weights over the keys sum to 1
    if dropout:
        return _dropout(weights, dropout, rng) @ v, weights  # (..., T, S) @ (..., S, Dv) -> (..., T, Dv)
    return weights @ v, weights  # (..., T, S) @ (..., S, Dv) -> (..., T, Dv)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, E) -> (B, H, T, D), einops 'b t (h d) -> b h t d'."""
    _tensor("split_heads", "x", x)
    _checks.check_rank("split_heads", "x", _shape(x), 3, "(B, T, E)")
    _checks.check_positive_int("num_heads", num_heads)
    _checks.check_heads(x.shape[-1], num_heads)
    b, t, e = x.shape
    x = x.reshape(b, t, num_heads, e // num_heads)  # (B, T, E) -> (B, T, H, D)
    return x.transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, E), einops 'b h t d -> b t (h d)'; the inverse of split_heads."""
    _tensor("merge_heads", "x", x)
    _checks.check_rank("merge_heads", "x", _shape(x), 4, "(B, H, T, D)")
    b, h, t, d = x.shape
    # After transpose the memory is no longer in (B, T, H, D) order: `view` would raise, reshape copies.
    return x.transpose(1, 2).reshape(b, t, h * d)  # (B, H, T, D) -> (B, T, H, D) -> (B, T, E)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D): each key/value head repeated for its group of query heads.

    Query head h reads kv head h // n_rep, the layout ``F.scaled_dot_product_attention(enable_gqa=True)``
    uses, einops 'b g s d -> b (g r) s d' (chapter 12).
    """
    _tensor("repeat_kv", "x", x)
    _checks.check_repeat_kv(_shape(x), n_rep)
    return x.repeat_interleave(n_rep, dim=1)  # (B, Hkv, S, D) -> (B, Hkv * n_rep, S, D)


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.ascontiguousarray(a))


class MultiHeadAttention(nn.Module):
    """Multi-head attention as an ``nn.Module`` with four ``nn.Linear`` projections.

    ``nn.Linear`` computes ``x @ weight.T``, so ``weight`` holds the transpose
    of the (E, E) matrix ``w`` in ``mha.Weights``. Called as
    ``(query, key=None, value=None, mask=None)``: key defaults to query and
    value to key. Returns (out (B, T, E), weights (B, H, T, S)).
    ``num_kv_heads`` (Hkv, dividing H) makes it grouped-query attention: ``k_proj`` and
    ``v_proj`` give Hkv * D features, shared by groups of H / Hkv query heads (Hkv = 1:
    multi-query); None is plain multi-head attention, the same modules and shapes.
    """

    def __init__(self, d_model: int, num_heads: int, bias: bool = True, *, dropout: float = 0.0,
                 num_kv_heads: int | None = None):
        super().__init__()
        _checks.check_positive_int("d_model", d_model)
        _checks.check_positive_int("num_heads", num_heads)
        _checks.check_heads(d_model, num_heads)
        self.d_model, self.num_heads = d_model, num_heads
        self.num_kv_heads = _checks.check_kv_heads(num_heads, num_kv_heads)  # Hkv; None -> H
        self.dropout = _checks.check_dropout("MultiHeadAttention", dropout)  # on the weights, in .train() only
        kv = self.num_kv_heads * (d_model // num_heads)  # Hkv * D: E for plain multi-head attention
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, kv, bias=bias)
        self.v_proj = nn.Linear(d_model, kv, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def _projections(self) -> tuple[nn.Linear, ...]:
        return self.q_proj, self.k_proj, self.v_proj, self.out_proj

    def forward(self, query, key=None, value=None, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        key = query if key is None else key
        value = key if value is None else value
        where = "MultiHeadAttention"
        for name, x in (("query", query), ("key", key), ("value", value)):
            _tensor(where, name, x)
        _checks.check_mha_inputs(
            self.d_model, _shape(query), _shape(key), _shape(value), (_dtype(query), _dtype(key), _dtype(value))
        )
        param_dtype = _dtype(self.q_proj.weight)
        if _dtype(query) != param_dtype or _dtype(key) != param_dtype or _dtype(value) != param_dtype:
            raise TypeError(
                f"{where}: inputs must have the layer's dtype {param_dtype}, got query {_dtype(query)}, "
                f"key {_dtype(key)} and value {_dtype(value)} (convert them, or the layer with .to(dtype))"
            )
        b, t, _ = query.shape
        s = key.shape[1]
        if mask is not None:
            _tensor(where, "mask", mask)
            _checks.check_mask(where, _shape(mask), _dtype(mask), (b, self.num_heads, t, s), "(B, H, T, S)")
        h, g = self.num_heads, self.num_kv_heads
        q = split_heads(self.q_proj(query), h)  # (B, T, E) -> (B, H, T, D)
        k = split_heads(self.k_proj(key), g)  # (B, S, E) -> (B, Hkv, S, D)
        v = split_heads(self.v_proj(value), g)  # (B, S, E) -> (B, Hkv, S, D)
        k, v = repeat_kv(k, h // g), repeat_kv(v, h // g)  # (B, Hkv, S, D) -> (B, H, S, D)
        p = self.dropout if self.training else 0.0  # a module must switch dropout off itself in .eval()
        out, weights = scaled_dot_product_attention(q, k, v, mask, dropout=p)  # (B, H, T, D), (B, H, T, S)
        return self.out_proj(merge_heads(out)), weights  # (B, H, T, D) -> (B, T, E)

    def get_weights(self) -> Weights:
        """The layer's parameters as an ``mha.Weights`` (each ``nn.Linear`` weight transposed back)."""
        ws = [p.weight.detach().cpu().float().numpy().T for p in self._projections()]
        bs = [None if p.bias is None else p.bias.detach().cpu().float().numpy() for p in self._projections()]
        return Weights(self.num_heads, *ws, *bs, num_kv_heads=self.num_kv_heads)

    @classmethod
    def from_weights(cls, w: Weights, *, dropout: float = 0.0) -> "MultiHeadAttention":
        layer = cls(w.d_model, w.num_heads, bias=w.has_bias, dropout=dropout, num_kv_heads=w.num_kv_heads)
        with torch.no_grad():
            for proj, w_e, b_e in zip(layer._projections(), (w.w_q, w.w_k, w.w_v, w.w_o), w.biases()):
                proj.weight.copy_(_from_numpy(w_e.T))  # nn.Linear stores (out, in): the transpose
                if proj.bias is not None:
                    proj.bias.copy_(_from_numpy(b_e))
        return layer

    def decode(self, x, cache: "KVCache | None" = None) -> tuple[torch.Tensor, torch.Tensor, "KVCache"]:
        """Causal self-attention of new tokens x (B, T_new, E) over the cached keys and values and their own.

        The S = len(cache) + T_new keys are masked bottom-right. Returns
        (out (B, T_new, E), weights (B, H, T_new, S), the cache with S keys).
        """
        _tensor("MultiHeadAttention.decode", "x", x)
        _checks.check_decode_input(self.d_model, _shape(x), _dtype(x))
        if cache is not None:
            _checks.check_cache_type(isinstance(cache, KVCache), cache)
            expected = (x.shape[0], self.num_kv_heads, self.d_model // self.num_heads)  # (B, Hkv, D)
            _checks.check_cache(_shape(cache.k), _shape(cache.v), expected, (_dtype(cache.k), _dtype(cache.v)))
        h, g = self.num_heads, self.num_kv_heads
        q = split_heads(self.q_proj(x), h)  # (B, T_new, E) -> (B, H, T_new, D)
        k = split_heads(self.k_proj(x), g)  # (B, T_new, E) -> (B, Hkv, T_new, D)
        v = split_heads(self.v_proj(x), g)  # (B, T_new, E) -> (B, Hkv, T_new, D)
        cache = KVCache(k, v) if cache is None else cache.append(k, v)  # (B, Hkv, S, D): H / Hkv times smaller
        mask = causal_mask(q.shape[2], len(cache), align="bottom-right").to(x.device)  # (T_new, S)
        k, v = repeat_kv(cache.k, h // g), repeat_kv(cache.v, h // g)  # (B, Hkv, S, D) -> (B, H, S, D)
        out, weights = scaled_dot_product_attention(q, k, v, mask)  # (B, H, T_new, D), (B, H, T_new, S)
        return self.out_proj(merge_heads(out)), weights, cache  # (B, H, T_new, D) -> (B, T_new, E)

    def extra_repr(self) -> str:
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        return f"d_model={self.d_model}, num_heads={self.num_heads}{kv}"


# Chapter 9: dropout on the attention weights.

def _dropout(weights: torch.Tensor, p: float, rng: torch.Generator | None) -> torch.Tensor:
    """Zeroes each entry with probability p and scales the kept ones by 1/(1 - p): unchanged on average."""
    if rng is not None and not isinstance(rng, torch.Generator):
        raise TypeError(f"scaled_dot_product_attention: rng must be a torch.Generator, got {type(rng).__name__}")
    noise = torch.rand(weights.shape, generator=rng, dtype=weights.dtype, device=weights.device)
    return torch.where(noise >= p, weights / (1 - p), 0.0)  # (..., T, S): kept with probability 1 - p


def to_builtin(w: Weights) -> nn.MultiheadAttention:
    """A ``torch.nn.MultiheadAttention(batch_first=True)`` carrying exactly `w`, in eval mode.

    Its ``in_proj_weight`` (3E, E) stacks the transposes of w_q, w_k, w_v;
    call it with ``attn_mask=to_builtin_mask(mask, ...)``: its boolean masks
    mean True = blocked, the opposite of this package. It has no grouped-query form:
    for `w` with num_kv_heads < num_heads use ``F.scaled_dot_product_attention(enable_gqa=True)``.
    """
    if w.num_kv_heads != w.num_heads:
        raise ValueError(
            f"to_builtin: nn.MultiheadAttention has no grouped-query form, and w has num_kv_heads="
            f"{w.num_kv_heads} < num_heads={w.num_heads}: use F.scaled_dot_product_attention(enable_gqa=True)"
        )
    layer = nn.MultiheadAttention(w.d_model, w.num_heads, bias=w.has_bias, batch_first=True)
    with torch.no_grad():
        layer.in_proj_weight.copy_(_from_numpy(np.concatenate([w.w_q.T, w.w_k.T, w.w_v.T])))  # (3E, E)
        layer.out_proj.weight.copy_(_from_numpy(w.w_o.T))
        if w.has_bias:
            b_q, b_k, b_v, b_o = w.biases()
            layer.in_proj_bias.copy_(_from_numpy(np.concatenate([b_q, b_k, b_v])))  # (3E,)
            layer.out_proj.bias.copy_(_from_numpy(b_o))
    return layer.eval()


def to_builtin_mask(mask: torch.Tensor, batch: int, num_heads: int, t: int, s: int) -> torch.Tensor:
    """Our mask (True = may attend, broadcastable to (B, H, T, S)) as the ``attn_mask`` of
    ``nn.MultiheadAttention``: inverted (True = blocked) and shaped (B * H, T, S)."""
    _tensor("to_builtin_mask", "mask", mask)
    _checks.check_mask("to_builtin_mask", _shape(mask), _dtype(mask), (batch, num_heads, t, s), "(B, H, T, S)")
    return ~mask.expand(batch, num_heads, t, s).reshape(batch * num_heads, t, s)


# The encoder block of chapter 8.

class EncoderBlock(nn.Module):
    """A transformer encoder block: self-attention and a position-wise FFN, each with a residual and LayerNorm.

    post-LN (``norm_first=False``, the original):  x = LN(x + Drop(MHA(x)));  x = LN(x + Drop(FFN(x)))
    pre-LN  (``norm_first=True``):                 x = x + Drop(MHA(LN(x)));  x = x + Drop(FFN(LN(x)))

    FFN(x) = Linear(E, d_ff) -> ReLU -> Dropout -> Linear(d_ff, E), the same places for dropout as
    ``nn.TransformerEncoderLayer`` (which also drops attention weights; this block does not).
    Called as ``block(x, mask=None)``; returns (out (B, T, E), weights (B, H, T, T)).
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float = 0.0, norm_first: bool = False,
                 eps: float = 1e-5):
        super().__init__()
        _checks.check_block_args(d_model, num_heads, d_ff, dropout, norm_first, eps)
        self.d_model, self.num_heads, self.d_ff, self.norm_first = d_model, num_heads, d_ff, norm_first
        self.attn = MultiHeadAttention(d_model, num_heads)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)  # no state: one module serves all three places

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(torch.relu(self.linear1(x)))  # (B, T, E) -> (B, T, d_ff)
        return self.linear2(h)  # (B, T, d_ff) -> (B, T, E)

    def forward(self, x, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        _tensor("EncoderBlock", "x", x)
        _checks.check_block_input(self.d_model, _shape(x), _dtype(x))
        if self.norm_first:  # pre-LN: each sublayer sees a normalized copy; the residual path is left alone
            a, weights = self.attn(self.norm1(x), mask=mask)  # (B, T, E), (B, H, T, T)
            x = x + self.dropout(a)
            x = x + self.dropout(self._ffn(self.norm2(x)))
        else:  # post-LN: normalize each residual sum
            a, weights = self.attn(x, mask=mask)  # (B, T, E), (B, H, T, T)
            x = self.norm1(x + self.dropout(a))
            x = self.norm2(x + self.dropout(self._ffn(x)))
        return x, weights

    def to_numpy_dict(self) -> dict[str, np.ndarray]:
        """Every parameter as a float32 NumPy array, applied as ``x @ w`` (``nn.Linear`` weights transposed)."""
        w = self.attn.get_weights()
        t = lambda p: p.detach().cpu().float().numpy().copy()
        return {
            "w_q": w.w_q, "w_k": w.w_k, "w_v": w.w_v, "w_o": w.w_o,
            "b_q": w.b_q, "b_k": w.b_k, "b_v": w.b_v, "b_o": w.b_o,
            "ln1_gamma": t(self.norm1.weight), "ln1_beta": t(self.norm1.bias),
            "ln2_gamma": t(self.norm2.weight), "ln2_beta": t(self.norm2.bias),
            "w_1": t(self.linear1.weight.T), "b_1": t(self.linear1.bias),  # nn.Linear stores (out, in)
            "w_2": t(self.linear2.weight.T), "b_2": t(self.linear2.bias),
        }

    @classmethod
    def from_numpy_dict(cls, d: dict, num_heads: int, *, dropout: float = 0.0, norm_first: bool = False,
                        eps: float = 1e-5) -> "EncoderBlock":
        """The inverse of ``to_numpy_dict``; d_model and d_ff are read from the shape of ``d['w_1']``."""
        e, f = _checks.check_block_dict(d)
        d = {name: np.asarray(value, dtype=np.float32) for name, value in d.items()}
        block = cls(e, num_heads, f, dropout=dropout, norm_first=norm_first, eps=eps)
        block.attn = MultiHeadAttention.from_weights(Weights(num_heads, *(d[f"w_{n}"] for n in "qkvo"),
                                                             *(d[f"b_{n}"] for n in "qkvo")))
        params = {
            "norm1.weight": d["ln1_gamma"], "norm1.bias": d["ln1_beta"],
            "norm2.weight": d["ln2_gamma"], "norm2.bias": d["ln2_beta"],
            "linear1.weight": d["w_1"].T, "linear1.bias": d["b_1"],
            "linear2.weight": d["w_2"].T, "linear2.bias": d["b_2"],
        }
        with torch.no_grad():
            for name, value in params.items():
                block.get_parameter(name).copy_(_from_numpy(value))
        return block

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, d_ff={self.d_ff}, norm_first={self.norm_first}"


# Chapter 11: decoding. The key/value cache and the decoder block.

@dataclasses.dataclass(frozen=True)
class KVCache:
    """The keys and values of every token decoded so far by one attention layer: k, v (B, Hkv, S, D).

    ``len(cache)`` is S. ``append`` returns a new, longer cache and leaves this one as it was.
    """

    k: torch.Tensor
    v: torch.Tensor

    def __len__(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """This cache followed by the new tokens' k, v (B, Hkv, T_new, D): (B, Hkv, S + T_new, D)."""
        return KVCache(torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2))

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


_ATTENTION_KEYS = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")


def _attention_weights(d: dict, prefix: str, num_heads: int) -> Weights:
    return Weights(num_heads, *(np.asarray(d[f"{prefix}_{n}"], dtype=np.float32) for n in _ATTENTION_KEYS))


class DecoderBlock(nn.Module):
    """A transformer decoder block: masked self-attention, cross-attention over the encoder's output, an FFN.

    post-LN (``norm_first=False``):  x = LN1(x + Drop(SelfMHA(x)));  x = LN2(x + Drop(CrossMHA(x, memory)));
                                     x = LN3(x + Drop(FFN(x)))
    pre-LN  (``norm_first=True``):   x = x + Drop(SelfMHA(LN1(x)));  x = x + Drop(CrossMHA(LN2(x), memory));
                                     x = x + Drop(FFN(LN3(x)))

    The order and dropout places of ``nn.TransformerDecoderLayer`` (which also drops attention weights;
    this block does not). Called as ``block(x, memory, mask=None, memory_mask=None)``: x (B, T, E),
    memory (B, S, E), `mask` broadcastable to (B, H, T, T), `memory_mask` to (B, H, T, S).
    Returns (out (B, T, E), self_weights (B, H, T, T), cross_weights (B, H, T, S)).
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float = 0.0, norm_first: bool = False,
                 eps: float = 1e-5):
        super().__init__()
        _checks.check_decoder_args(d_model, num_heads, d_ff, dropout, norm_first, eps)
        self.d_model, self.num_heads, self.d_ff, self.norm_first = d_model, num_heads, d_ff, norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads)
        self.cross_attn = MultiHeadAttention(d_model, num_heads)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.norm3 = nn.LayerNorm(d_model, eps=eps)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)  # no state: one module serves all four places

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(torch.relu(self.linear1(x)))  # (B, T, E) -> (B, T, d_ff)
        return self.linear2(h)  # (B, T, d_ff) -> (B, T, E)

    def forward(self, x, memory, mask=None, memory_mask=None):
        _tensor("DecoderBlock", "x", x)
        _tensor("DecoderBlock", "memory", memory)
        _checks.check_decoder_input(self.d_model, _shape(x), _shape(memory), _dtype(x), _dtype(memory))
        if self.norm_first:  # pre-LN: each sublayer sees a normalized copy of x; the residual path is left alone
            a, self_weights = self.self_attn(self.norm1(x), mask=mask)  # (B, T, E), (B, H, T, T)
            x = x + self.dropout(a)
            c, cross_weights = self.cross_attn(self.norm2(x), memory, mask=memory_mask)  # (B, H, T, S)
            x = x + self.dropout(c)
            x = x + self.dropout(self._ffn(self.norm3(x)))
        else:  # post-LN: normalize each residual sum
            a, self_weights = self.self_attn(x, mask=mask)  # (B, T, E), (B, H, T, T)
            x = self.norm1(x + self.dropout(a))
            c, cross_weights = self.cross_attn(x, memory, mask=memory_mask)  # queries from x, keys from memory
            x = self.norm2(x + self.dropout(c))
            x = self.norm3(x + self.dropout(self._ffn(x)))
        return x, self_weights, cross_weights

    def to_numpy_dict(self) -> dict[str, np.ndarray]:
        """Every parameter as a float32 NumPy array, applied as ``x @ w`` (``nn.Linear`` weights transposed)."""
        t = lambda p: p.detach().cpu().float().numpy().copy()
        d = {}
        for prefix, attn in (("self", self.self_attn), ("cross", self.cross_attn)):
            w = attn.get_weights()
            d.update({f"{prefix}_{n}": getattr(w, n) for n in _ATTENTION_KEYS})
        for i, norm in enumerate((self.norm1, self.norm2, self.norm3), 1):
            d[f"ln{i}_gamma"], d[f"ln{i}_beta"] = t(norm.weight), t(norm.bias)
        d.update({"w_1": t(self.linear1.weight.T), "b_1": t(self.linear1.bias),  # nn.Linear stores (out, in)
                  "w_2": t(self.linear2.weight.T), "b_2": t(self.linear2.bias)})
        return d

    @classmethod
    def from_numpy_dict(cls, d: dict, num_heads: int, *, dropout: float = 0.0, norm_first: bool = False,
                        eps: float = 1e-5) -> "DecoderBlock":
        """The inverse of ``to_numpy_dict``; d_model and d_ff are read from the shape of ``d['w_1']``."""
        e, f = _checks.check_decoder_dict(d)
        block = cls(e, num_heads, f, dropout=dropout, norm_first=norm_first, eps=eps)
        block.self_attn = MultiHeadAttention.from_weights(_attention_weights(d, "self", num_heads))
        block.cross_attn = MultiHeadAttention.from_weights(_attention_weights(d, "cross", num_heads))
        _copy_norms_and_ffn(block, d)
        return block

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, d_ff={self.d_ff}, norm_first={self.norm_first}"


def _copy_norms_and_ffn(layer: nn.Module, d: dict) -> None:
    """Loads the three LayerNorms and the FFN of a decoder dict into `layer` (ours and torch's share the names)."""
    params = {f"norm{i}.{n}": d[f"ln{i}_{p}"] for i in (1, 2, 3) for n, p in (("weight", "gamma"), ("bias", "beta"))}
    params.update({"linear1.weight": d["w_1"].T, "linear1.bias": d["b_1"],
                   "linear2.weight": d["w_2"].T, "linear2.bias": d["b_2"]})
    with torch.no_grad():
        for name, value in params.items():
            layer.get_parameter(name).copy_(_from_numpy(np.asarray(value, dtype=np.float32)))


def to_builtin_decoder(d: dict, num_heads: int, *, norm_first: bool = False,
                       eps: float = 1e-5) -> nn.TransformerDecoderLayer:
    """The decoder dict ``d`` (``DecoderBlock.to_numpy_dict``'s layout) in an eval-mode
    ``nn.TransformerDecoderLayer(batch_first=True, dropout=0)``.

    Its masks mean True = blocked: pass ``tgt_mask=~mask`` and ``memory_key_padding_mask=~keep``.
    """
    e, f = _checks.check_decoder_dict(d)
    _checks.check_decoder_args(e, num_heads, f, 0.0, norm_first, eps)
    layer = nn.TransformerDecoderLayer(e, num_heads, dim_feedforward=f, dropout=0.0, batch_first=True,
                                       norm_first=norm_first, layer_norm_eps=eps)
    for prefix, attn in (("self", layer.self_attn), ("cross", layer.multihead_attn)):
        attn.load_state_dict(to_builtin(_attention_weights(d, prefix, num_heads)).state_dict())
    _copy_norms_and_ffn(layer, d)
    return layer.eval()
