"""The like-for-like table of `make bench`: each of our implementations beside the one that does the same work.

A row pairs one of ours with a reference that computes and returns the same
things, on the same weights and inputs:

| row | ours | reference |
|---|---|---|
| torch | `mha.torch.MultiHeadAttention` | `nn.MultiheadAttention(need_weights=True, average_attn_weights=False)` |
| keras | `mha.keras.MultiHeadAttention` | `keras.layers.MultiHeadAttention(return_attention_scores=True)` |
| numpy | `mha.numpy.MultiHeadAttention` | the same `nn.MultiheadAttention` weights path |
| attention | `mha.numpy.fixed_shift_attention` (no weights) | `F.scaled_dot_product_attention` alone |

The three layer rows run at B=4, T=512 and B=1, T=2048 (E=512, H=8, float32,
self-attention), without a mask and with a causal one; every layer returns
(out (B, T, E), weights (B, H, T, S)). The attention row runs at B=1, H=8, D=64,
T = S = 4096 and 8192, no mask; neither side forms the weights.

Each `make_*` takes the case and returns `call()`, a function of nothing that
runs one forward on inputs prepared beforehand (framework tensors, masks in each
library's convention) and returns the framework's own objects: converting the
(B, H, T, S) weights to NumPy would be a copy that neither library needs.
`to_numpy(result)` converts them afterwards, for the agreement check.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import mha

E, H, D = 512, 8, 64


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    t: int
    causal: bool = False

    @property
    def label(self) -> str:
        return f"B={self.b} T={self.t} {'causal' if self.causal else 'no mask'}"

    def x(self) -> np.ndarray:
        """The (B, T, E) float32 input of a layer case."""
        return np.random.default_rng(self.t + self.b).standard_normal((self.b, self.t, E)).astype(np.float32)

    def qkv(self) -> list[np.ndarray]:
        """The (B, H, T, D) float32 queries, keys and values of an attention case."""
        return [np.random.default_rng(i).standard_normal((self.b, H, self.t, D)).astype(np.float32)
                for i in range(3)]

    def mask(self) -> np.ndarray | None:
        """Bool (T, S), True = may attend (this package's convention), or None."""
        return mha.numpy.causal_mask(self.t) if self.causal else None


LAYER_CASES = [Case(4, 512), Case(4, 512, True), Case(1, 2048), Case(1, 2048, True)]
ATTENTION_CASES = [Case(1, 4096), Case(1, 8192)]


def weights() -> mha.Weights:
    return mha.Weights.random(E, H, seed=0)


def make_mha_torch(case: Case):
    import torch

    import mha.torch

    layer = mha.torch.MultiHeadAttention.from_weights(weights()).eval()
    x = torch.from_numpy(case.x())
    mask = None if case.mask() is None else torch.from_numpy(case.mask())  # True = may attend

    def call():
        with torch.no_grad():
            return layer(x, mask=mask)

    return call


def make_torch_builtin(case: Case):
    """nn.MultiheadAttention asked for the per-head weights, eval mode, no gradients."""
    import torch

    import mha.torch

    layer = mha.torch.to_builtin(weights())
    x = torch.from_numpy(case.x())
    blocked = None if case.mask() is None else torch.from_numpy(~case.mask())  # its convention: True = blocked

    def call():
        with torch.no_grad():
            return layer(x, x, x, attn_mask=blocked, need_weights=True, average_attn_weights=False)

    return call


def make_mha_keras(case: Case):
    import keras

    import mha.keras

    layer = mha.keras.MultiHeadAttention.from_weights(weights())
    x = keras.ops.convert_to_tensor(case.x())
    mask = None if case.mask() is None else keras.ops.convert_to_tensor(case.mask())  # (T, S)
    return lambda: layer(x, mask=mask)


def make_keras_builtin(case: Case):
    """keras.layers.MultiHeadAttention asked for the scores: its explicit (non-fused) path."""
    import keras

    import mha.keras

    layer = mha.keras.to_builtin(weights())
    x = keras.ops.convert_to_tensor(case.x())
    mask = None if case.mask() is None else keras.ops.convert_to_tensor(case.mask()[None])  # (1, T, S)
    return lambda: layer(x, x, attention_mask=mask, return_attention_scores=True)  # (query, value)


def make_mha_numpy(case: Case):
    layer = mha.numpy.MultiHeadAttention.from_weights(weights())
    x, mask = case.x(), case.mask()
    return lambda: layer(x, mask=mask)


def make_numpy_floor(case: Case, exp_and_sum: bool):
    """Not a layer: the least any NumPy forward must do (see contestants.make_numpy_lower_bound)."""
    from contestants import make_numpy_lower_bound

    forward = make_numpy_lower_bound(weights(), exp_and_sum=exp_and_sum)
    x = case.x()
    return lambda: forward(x)


def make_numpy_out_of_place(case: Case):
    """Not a contestant: the layer's formula, each step a new array (see contestants.make_numpy_out_of_place)."""
    from contestants import make_numpy_out_of_place as make

    forward = make(weights())
    x = case.x()
    return lambda: forward(x)


def make_numpy_attention(case: Case):
    q, k, v = case.qkv()
    return lambda: mha.numpy.fixed_shift_attention(q, k, v)


def make_sdpa(case: Case):
    import torch
    import torch.nn.functional as F

    q, k, v = (torch.from_numpy(a) for a in case.qkv())

    def call():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v)

    return call


# name -> (maker, the cases it runs)
IMPLEMENTATIONS = {
    "mha.torch": (make_mha_torch, LAYER_CASES),
    "nn.MultiheadAttention": (make_torch_builtin, LAYER_CASES),
    "mha.keras": (make_mha_keras, LAYER_CASES),
    "keras MultiHeadAttention": (make_keras_builtin, LAYER_CASES),
    "mha.numpy": (make_mha_numpy, LAYER_CASES),
    "floor: NumPy products": (lambda c: make_numpy_floor(c, False), [c for c in LAYER_CASES if not c.causal]),
    "floor: + exp, row sums": (lambda c: make_numpy_floor(c, True), [c for c in LAYER_CASES if not c.causal]),
    "floor: out of place": (make_numpy_out_of_place, [c for c in LAYER_CASES if not c.causal]),
    "mha.numpy.fixed_shift_attention": (make_numpy_attention, ATTENTION_CASES),
    "F.scaled_dot_product_attention": (make_sdpa, ATTENTION_CASES),
}


@dataclasses.dataclass(frozen=True)
class Row:
    ours: str
    reference: str
    time_limit: float
    memory_limit: float  # a ratio of peaks, or MiB beyond the output where `beyond_output`
    beyond_output: bool = False


ROWS = [
    Row("mha.torch", "nn.MultiheadAttention", 1.1, 1.2),
    Row("mha.keras", "keras MultiHeadAttention", 1.1, 1.2),
    Row("mha.numpy", "nn.MultiheadAttention", 1.25, 1.5),
    Row("mha.numpy.fixed_shift_attention", "F.scaled_dot_product_attention", 1.1, 64, beyond_output=True),
]
# Context for the numpy row, with no limit: name -> whether it computes the layer (its output is compared
# with the reference's, max_abs_diff, and its memory measured) or only times its products in buffers
# allocated once.
FLOORS = {"floor: NumPy products": False, "floor: + exp, row sums": False, "floor: out of place": True}


def to_numpy(result) -> list[np.ndarray]:
    """A call's result as NumPy arrays: [out] or [out, weights]."""
    parts = result if isinstance(result, (tuple, list)) else [result]
    return [np.asarray(p.numpy() if hasattr(p, "numpy") else p) for p in parts]


def output_mib(case: Case) -> float:
    """MiB of the attention row's output, (B, H, T, D) float32: what any attention must return."""
    return case.b * H * case.t * D * 4 / 2**20
