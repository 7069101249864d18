"""One adapter per backend, so a test can run the same case in NumPy, PyTorch and Keras."""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Callable

import keras
import numpy as np
import torch
import torch.nn.functional as F

import mha.keras
import mha.numpy
import mha.torch


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    module: ModuleType
    tensor: Callable  # NumPy array -> the backend's tensor
    numpy: Callable  # the backend's tensor -> NumPy array

    def sdpa(self, q, k, v, mask=None):
        out, weights = self.module.scaled_dot_product_attention(
            self.tensor(q), self.tensor(k), self.tensor(v), None if mask is None else self.tensor(mask)
        )
        return self.numpy(out), self.numpy(weights)

    def mha(self, w: mha.Weights, x_q, x_k=None, x_v=None, mask=None):
        layer = self.module.MultiHeadAttention.from_weights(w)
        t = lambda a: None if a is None else self.tensor(a)
        out, weights = layer(t(x_q), t(x_k), t(x_v), mask=t(mask))
        return self.numpy(out), self.numpy(weights)


def _torch_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy() if x.dtype == torch.bfloat16 else x.detach().numpy()


BACKENDS = {
    "numpy": Backend("numpy", mha.numpy, np.asarray, np.asarray),
    "torch": Backend("torch", mha.torch, torch.from_numpy, _torch_numpy),
    "keras": Backend("keras", mha.keras, keras.ops.convert_to_tensor, keras.ops.convert_to_numpy),
}


def project(w: mha.Weights, x: np.ndarray, which: str) -> np.ndarray:
    """x @ w_which + b_which, computed in float64 so it adds no error of its own."""
    weight = getattr(w, f"w_{which}").astype(np.float64)
    bias = dict(zip("qkvo", w.biases()))[which].astype(np.float64)
    return x.astype(np.float64) @ weight + bias


# The three built-in layers, each loaded with the same mha.Weights and fed our mask.

def torch_sdpa_mha(w: mha.Weights, x_q, x_k, x_v, mask=None) -> np.ndarray:
    """Projections by hand, then torch's fused F.scaled_dot_product_attention (bool mask: True = attend).

    Grouped-query weights (num_kv_heads < num_heads) go in as Hkv key/value heads with enable_gqa=True.
    """
    to_heads = lambda a, h: mha.torch.split_heads(torch.from_numpy(a.astype(np.float32)), h)
    q = to_heads(project(w, x_q, "q"), w.num_heads)  # (B, H, T, D)
    k, v = (to_heads(project(w, x, n), w.num_kv_heads) for x, n in ((x_k, "k"), (x_v, "v")))  # (B, Hkv, S, D)
    attn_mask = None if mask is None else torch.from_numpy(np.asarray(mask))
    gqa = w.num_kv_heads != w.num_heads
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)  # (B, H, T, D)
    return project(w, mha.torch.merge_heads(out).numpy(), "o").astype(np.float32)


def torch_builtin_mha(w: mha.Weights, x_q, x_k, x_v, mask=None):
    layer = mha.torch.to_builtin(w)
    b, t, s = x_q.shape[0], x_q.shape[1], x_k.shape[1]
    attn_mask = None if mask is None else mha.torch.to_builtin_mask(torch.from_numpy(np.asarray(mask)), b, w.num_heads, t, s)
    tq, tk, tv = (torch.from_numpy(a) for a in (x_q, x_k, x_v))
    with torch.no_grad():
        out, weights = layer(tq, tk, tv, attn_mask=attn_mask, need_weights=True, average_attn_weights=False)
        fast_out, _ = layer(tq, tk, tv, attn_mask=attn_mask, need_weights=False)
    return out.numpy(), weights.numpy(), fast_out.numpy()


def keras_builtin_mha(w: mha.Weights, x_q, x_k, x_v, mask=None):
    layer = mha.keras.to_builtin(w)
    b, t, s = x_q.shape[0], x_q.shape[1], x_k.shape[1]
    attention_mask = None if mask is None else mha.keras.to_builtin_mask(mask, b, t, s)
    # Keras's order: query, value, key.
    out, weights = layer(x_q, x_v, x_k, attention_mask=attention_mask, return_attention_scores=True)
    return keras.ops.convert_to_numpy(out), keras.ops.convert_to_numpy(weights)
