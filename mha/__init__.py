"""Multi-head attention in NumPy, PyTorch and Keras, with one API in each.

``mha.numpy`` is the reference; ``mha.torch`` and ``mha.keras`` export the same
names with the same meaning. This module imports no framework: import the
backend you want, ``from mha import numpy as mnp`` or ``import mha.torch``.

Shape legend, used in every signature, comment and chapter of the book:

    B  batch size
    H  number of heads
    T  query length (tokens that ask)
    S  key/value length (tokens that answer); T == S in self-attention
    D  head size, E / H
    E  model width, d_model = H * D

Tensors are laid out as (B, T, E) between layers and (B, H, T, D) inside
attention. Masks are boolean, True = may attend, broadcastable to
(B, H, T, S); they are combined with AND and applied with ``where``.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from mha import _checks

__all__ = ["Weights", "expect_error"]
__version__ = "0.1.0"


@dataclasses.dataclass(eq=False)
class Weights:
    """The parameters of one multi-head attention layer, as float32 NumPy arrays.

    Every projection is applied as ``x @ w`` (+ ``b``), with ``w`` of shape
    (E, E): PyTorch's ``nn.Linear`` stores the transpose, Keras's built-in
    layer a reshaped copy; ``mha.torch.to_builtin`` and
    ``mha.keras.to_builtin`` do the conversions.

    ``num_kv_heads`` (Hkv, keyword only) makes it grouped-query attention: w_k, w_v are
    then (E, Hkv * D) and b_k, b_v (Hkv * D,), one key/value head per group of H / Hkv
    query heads (Hkv = 1 is multi-query attention). None means H: plain multi-head
    attention, with the same fields and shapes as before (chapter 12).
    """

    num_heads: int
    w_q: np.ndarray  # (E, E)
    w_k: np.ndarray  # (E, E)
    w_v: np.ndarray  # (E, E)
    w_o: np.ndarray  # (E, E)
    b_q: np.ndarray | None = None  # (E,)
    b_k: np.ndarray | None = None  # (E,)
    b_v: np.ndarray | None = None  # (E,)
    b_o: np.ndarray | None = None  # (E,)
    _: dataclasses.KW_ONLY
    # Not a field: dataclasses.fields(w) lists the arrays above and num_heads only, as for plain MHA.
    num_kv_heads: dataclasses.InitVar[int | None] = None

    def __post_init__(self, num_kv_heads):
        _checks.check_positive_int("num_heads", self.num_heads)
        self.num_kv_heads = _checks.check_kv_heads(self.num_heads, num_kv_heads)  # Hkv; None -> H
        for name in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.array(value, dtype=np.float32))  # a copy: no aliasing
        d_model = self.w_q.shape[0] if self.w_q.ndim else 0
        _checks.check_heads(d_model, self.num_heads)
        kv = self.num_kv_heads * (d_model // self.num_heads)  # Hkv * D, the width of k and v (E for MHA)
        gqa = f" with Hkv = num_kv_heads = {self.num_kv_heads}" if kv != d_model else ""
        for name in ("w_q", "w_k", "w_v", "w_o"):
            shape = getattr(self, name).shape
            if name in ("w_k", "w_v") and gqa:
                if shape != (d_model, kv):
                    raise ValueError(f"Weights: {name} must have shape (E, Hkv * D) = ({d_model}, {kv}){gqa}, "
                                     f"got {shape}")
            elif shape != (d_model, d_model):
                raise ValueError(
                    f"Weights: {name} must have shape (E, E) = ({d_model}, {d_model}) "
                    f"like w_q, got {shape}"
                )
        for name in ("b_q", "b_k", "b_v", "b_o"):
            value = getattr(self, name)
            if value is None:
                continue
            if name in ("b_k", "b_v") and gqa:
                if value.shape != (kv,):
                    raise ValueError(f"Weights: {name} must have shape (Hkv * D,) = ({kv},){gqa}, got {value.shape}")
            elif value.shape != (d_model,):
                raise ValueError(
                    f"Weights: {name} must have shape (E,) = ({d_model},), got {value.shape}"
                )

    @property
    def d_model(self) -> int:
        """E, the model width."""
        return self.w_q.shape[0]

    @property
    def head_dim(self) -> int:
        """D = E / H, the width of one head."""
        return self.d_model // self.num_heads

    @property
    def has_bias(self) -> bool:
        """True when any projection has a bias (missing ones then count as zeros)."""
        return any(b is not None for b in (self.b_q, self.b_k, self.b_v, self.b_o))

    def biases(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(b_q, b_k, b_v, b_o), with zeros where a bias is None (of width Hkv * D for b_k and b_v)."""
        widths = (self.d_model, self.w_k.shape[1], self.w_v.shape[1], self.d_model)
        biases = (self.b_q, self.b_k, self.b_v, self.b_o)
        return tuple(np.zeros(n, dtype=np.float32) if b is None else b for b, n in zip(biases, widths))

    @classmethod
    def random(cls, d_model: int, num_heads: int, *, bias: bool = True, seed: int = 0,
               num_kv_heads: int | None = None) -> "Weights":
        """Seeded example weights: uniform in +-1/sqrt(E), like ``nn.Linear``'s default.

        With `num_kv_heads`, w_k and w_v are (E, Hkv * D); None draws exactly the plain MHA weights.
        """
        _checks.check_positive_int("d_model", d_model)
        _checks.check_positive_int("num_heads", num_heads)
        _checks.check_heads(d_model, num_heads)
        kv = _checks.check_kv_heads(num_heads, num_kv_heads) * (d_model // num_heads)  # Hkv * D
        rng = np.random.default_rng(seed)
        limit = 1.0 / np.sqrt(d_model)

        def draw(*shape):
            return rng.uniform(-limit, limit, size=shape).astype(np.float32)

        widths = {"q": d_model, "k": kv, "v": kv, "o": d_model}  # the output width of each projection
        w = {f"w_{n}": draw(d_model, widths[n]) for n in "qkvo"}
        b = {f"b_{n}": draw(widths[n]) if bias else None for n in "qkvo"}
        return cls(num_heads=num_heads, **w, **b, num_kv_heads=num_kv_heads)

    def copy(self) -> "Weights":
        """A deep copy: the arrays are copied too."""
        return dataclasses.replace(self, num_kv_heads=self.num_kv_heads)  # not a field: pass it on

    def allclose(self, other: "Weights", atol: float = 0.0) -> bool:
        """True when both carry the same numbers (a missing bias equals zeros)."""
        if (self.num_heads, self.num_kv_heads, self.d_model) != (other.num_heads, other.num_kv_heads, other.d_model):
            return False
        mine = (self.w_q, self.w_k, self.w_v, self.w_o, *self.biases())
        theirs = (other.w_q, other.w_k, other.w_v, other.w_o, *other.biases())
        return all(np.allclose(a, b, rtol=0.0, atol=atol) for a, b in zip(mine, theirs))

    def __repr__(self) -> str:
        bias = "with bias" if self.has_bias else "no bias"
        kv = f", Hkv={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        return f"Weights(E={self.d_model}, H={self.num_heads}{kv}, D={self.head_dim}, {bias})"


@contextlib.contextmanager
def expect_error(*types: type[BaseException]):
    """Runs a block that must fail, and prints its error as one line: ``Type: message``.

    The book shows each bug with it: the cell's output is the sentence a reader
    would see, with no machine paths, and the cell fails if the block raises
    nothing (or raises another type, which then propagates as usual).
    """
    types = types or (Exception,)
    try:
        yield
    except types as e:
        print(f"{type(e).__name__}: {e}")
    else:
        raise AssertionError(f"expected {' or '.join(t.__name__ for t in types)}, but nothing was raised")
