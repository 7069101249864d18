"""Multi-head attention in PyTorch: the same names and meaning as ``mha.numpy``.

Functions take and return ``torch.Tensor``; ``MultiHeadAttention`` is an
``nn.Module``. ``to_builtin`` loads an ``mha.Weights`` into PyTorch's own
``nn.MultiheadAttention`` (see chapter 5 for why its mask is inverted).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

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
    "to_builtin",
    "to_builtin_mask",
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
    """exp(x - max) / sum, where a row of only -inf (all masked) gives zeros, not NaN."""
    m = x.amax(dim=axis, keepdim=True)
    m = m.masked_fill(torch.isneginf(m), 0)  # all -inf: subtract 0, every exp is 0
    e = torch.exp(x - m)
    total = e.sum(dim=axis, keepdim=True)
    return e / total.masked_fill(total == 0, 1)


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


def causal_mask(t: int, s: int | None = None) -> torch.Tensor:
    """Bool (T, S), True where query i may attend key j, that is j <= i."""
    s = t if s is None else s
    _checks.check_positive_int("t", t)
    _checks.check_positive_int("s", s)
    return torch.arange(s)[None, :] <= torch.arange(t)[:, None]  # (1, S) <= (T, 1) -> (T, S)


def padding_mask(lengths, s: int) -> torch.Tensor:
    """Bool (B, 1, 1, S), True on the first lengths[b] keys of sequence b (the real tokens)."""
    _checks.check_positive_int("s", s)
    lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"padding_mask: lengths must be integers, got dtype {_dtype(lengths)}")
    _checks.check_lengths(_shape(lengths), lengths.tolist(), s)
    keep = torch.arange(s, device=lengths.device)[None, :] < lengths[:, None]  # (1, S) < (B, 1) -> (B, S)
    return keep[:, None, None, :]  # (B, S) -> (B, 1, 1, S): broadcasts over heads and queries


def scaled_dot_product_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(D)) v for q (..., T, D), k (..., S, D), v (..., S, Dv).

    `mask` is boolean, True = may attend, broadcastable to (..., T, S).
    Returns (out (..., T, Dv), weights (..., T, S)); fully masked rows give zeros.
    """
    where = "scaled_dot_product_attention"
    q, k, v = (_tensor(where, n, x) for n, x in (("query", query), ("key", key), ("value", value)))
    scores_shape = _checks.check_attention(_shape(q), _shape(k), _shape(v), _dtype(q), _dtype(k), _dtype(v))
    if mask is not None:
        _tensor(where, "mask", mask)
        _checks.check_mask(where, _shape(mask), _dtype(mask), scores_shape, "(..., T, S)")
    q = q * (1.0 / math.sqrt(q.shape[-1]))
    scores = q @ k.transpose(-2, -1)  # (..., T, D) @ (..., D, S) -> (..., T, S)
    weights = _normalize(scores if mask is None else scores.masked_fill(~mask, float("-inf")), -1)
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


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.ascontiguousarray(a))


class MultiHeadAttention(nn.Module):
    """Multi-head attention as an ``nn.Module`` with four ``nn.Linear`` projections.

    ``nn.Linear`` computes ``x @ weight.T``, so ``weight`` holds the transpose
    of the (E, E) matrix ``w`` in ``mha.Weights``. Called as
    ``(query, key=None, value=None, mask=None)``: key defaults to query and
    value to key. Returns (out (B, T, E), weights (B, H, T, S)).
    """

    def __init__(self, d_model: int, num_heads: int, bias: bool = True):
        super().__init__()
        _checks.check_positive_int("d_model", d_model)
        _checks.check_positive_int("num_heads", num_heads)
        _checks.check_heads(d_model, num_heads)
        self.d_model, self.num_heads = d_model, num_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
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
        h = self.num_heads
        q = split_heads(self.q_proj(query), h)  # (B, T, E) -> (B, H, T, D)
        k = split_heads(self.k_proj(key), h)  # (B, S, E) -> (B, H, S, D)
        v = split_heads(self.v_proj(value), h)  # (B, S, E) -> (B, H, S, D)
        out, weights = scaled_dot_product_attention(q, k, v, mask)  # (B, H, T, D), (B, H, T, S)
        return self.out_proj(merge_heads(out)), weights  # (B, H, T, D) -> (B, T, E)

    def get_weights(self) -> Weights:
        """The layer's parameters as an ``mha.Weights`` (each ``nn.Linear`` weight transposed back)."""
        ws = [p.weight.detach().cpu().float().numpy().T for p in self._projections()]
        bs = [None if p.bias is None else p.bias.detach().cpu().float().numpy() for p in self._projections()]
        return Weights(self.num_heads, *ws, *bs)

    @classmethod
    def from_weights(cls, w: Weights) -> "MultiHeadAttention":
        layer = cls(w.d_model, w.num_heads, bias=w.has_bias)
        with torch.no_grad():
            for proj, w_e, b_e in zip(layer._projections(), (w.w_q, w.w_k, w.w_v, w.w_o), w.biases()):
                proj.weight.copy_(_from_numpy(w_e.T))  # nn.Linear stores (out, in): the transpose
                if proj.bias is not None:
                    proj.bias.copy_(_from_numpy(b_e))
        return layer

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}"


def to_builtin(w: Weights) -> nn.MultiheadAttention:
    """A ``torch.nn.MultiheadAttention(batch_first=True)`` carrying exactly `w`, in eval mode.

    Its ``in_proj_weight`` (3E, E) stacks the transposes of w_q, w_k, w_v;
    call it with ``attn_mask=to_builtin_mask(mask, ...)``: its boolean masks
    mean True = blocked, the opposite of this package.
    """
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
