"""Input checks shared by every backend, written on shapes and dtype names only.

Each backend turns its tensors into plain tuples and dtype names and calls
these, so a bad input gets the same exception and the same sentence in NumPy,
PyTorch and Keras, raised before any framework op can fail three frames down.
"""

from __future__ import annotations

import numbers

import numpy as np

FLOATS = ("float16", "bfloat16", "float32", "float64")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {name}={value}")


def check_heads(d_model: int, num_heads: int) -> None:
    if d_model % num_heads:
        raise ValueError(
            f"d_model={d_model} is not divisible by num_heads={num_heads}: "
            f"every head needs the same size D = E / H"
        )


def check_positions(t, d_model) -> None:
    """sinusoidal_positions(t, d_model): positive sizes, and an even width for the (sin, cos) pairs."""
    check_positive_int("t", t)
    check_positive_int("d_model", d_model)
    if d_model % 2:
        raise ValueError(
            f"sinusoidal_positions: d_model must be even, got d_model={d_model}: the features "
            f"come in (sin, cos) pairs, one pair per frequency"
        )


def check_float(where: str, name: str, shape: tuple, dtype: str) -> None:
    if dtype not in FLOATS:
        raise TypeError(f"{where}: {name} must be a float tensor, got dtype {dtype} with shape {shape}")


def check_rank(where: str, name: str, shape: tuple, rank: int, legend: str) -> None:
    if len(shape) != rank:
        raise ValueError(f"{where}: {name} must have rank {rank} {legend}, got shape {shape}")


def check_axis(axis, ndim: int) -> None:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"softmax: axis must be an int, got {type(axis).__name__} {axis!r}")
    if not -ndim <= axis < max(ndim, 1):
        raise ValueError(f"softmax: axis={axis} is out of range for an input of rank {ndim}")


def same(a, b) -> bool:
    """Two sizes agree; None (a size Keras does not know while tracing) agrees with any."""
    return a is None or b is None or a == b


def broadcasts_to(shape: tuple, target: tuple) -> bool:
    """True when an array of `shape` broadcasts to `target` without changing it."""
    if len(shape) > len(target):
        return False
    return all(s == 1 or same(s, t) for s, t in zip(reversed(shape), reversed(target)))


def broadcast_shapes(*shapes: tuple) -> tuple | None:
    """NumPy's broadcasting of several shapes, or None where they clash."""
    ndim = max(len(s) for s in shapes)
    out = []
    for dims in zip(*[(1,) * (ndim - len(s)) + tuple(s) for s in shapes]):
        sizes = {d for d in dims if d != 1 and d is not None}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def check_attention(q_shape, k_shape, v_shape, q_dtype, k_dtype, v_dtype,
                    where: str = "scaled_dot_product_attention") -> tuple:
    """Checks q (..., T, D), k (..., S, D), v (..., S, Dv); returns the scores' shape (..., T, S)."""
    for name, shape, dtype in (("query", q_shape, q_dtype), ("key", k_shape, k_dtype), ("value", v_shape, v_dtype)):
        check_float(where, name, shape, dtype)
        if len(shape) < 2:
            raise ValueError(f"{where}: {name} must have rank >= 2 (..., length, size), got shape {shape}")
    if len({q_dtype, k_dtype, v_dtype}) > 1:
        raise TypeError(
            f"{where}: query, key and value must share one dtype, got {q_dtype}, {k_dtype} and {v_dtype}"
        )
    if not same(q_shape[-1], k_shape[-1]):
        raise ValueError(
            f"{where}: query and key must have the same head size D (last axis), "
            f"got query {q_shape} and key {k_shape}"
        )
    if not same(k_shape[-2], v_shape[-2]):
        raise ValueError(
            f"{where}: key and value must have the same length S (axis -2), "
            f"got key {k_shape} and value {v_shape}"
        )
    batch = broadcast_shapes(q_shape[:-2], k_shape[:-2], v_shape[:-2])
    if batch is None:
        raise ValueError(
            f"{where}: the leading (batch, head) axes of query {q_shape}, key {k_shape} "
            f"and value {v_shape} do not broadcast together"
        )
    return (*batch, q_shape[-2], k_shape[-2])


def check_mask(where: str, shape: tuple, dtype: str, target: tuple, legend: str) -> None:
    if dtype != "bool":
        raise TypeError(
            f"{where}: mask must be boolean (True = may attend), got dtype {dtype} with shape {shape}"
        )
    if not broadcasts_to(shape, target):
        raise ValueError(
            f"{where}: mask of shape {shape} does not broadcast to the scores' shape {legend} = {target}"
        )


def check_lengths(shape: tuple, values: list, s: int) -> None:
    if len(shape) != 1:
        raise ValueError(f"padding_mask: lengths must be a 1-D sequence of B ints, got shape {shape}")
    bad = [n for n in values if not 0 <= n <= s]
    if bad:
        raise ValueError(f"padding_mask: every length must lie in [0, s={s}], got lengths {values}")


def check_mha_inputs(d_model: int, q_shape, k_shape, v_shape, dtypes=("float32",) * 3) -> None:
    """Checks the (B, T, E) / (B, S, E) inputs of a MultiHeadAttention layer."""
    where = "MultiHeadAttention"
    for name, shape, dtype in zip(("query", "key", "value"), (q_shape, k_shape, v_shape), dtypes):
        check_float(where, name, shape, dtype)
        if len(shape) != 3 or not same(shape[-1], d_model):
            raise ValueError(
                f"{where}: {name} must have shape (B, length, E) with E = d_model = {d_model}, got {shape}"
            )
    if not (same(q_shape[0], k_shape[0]) and same(q_shape[0], v_shape[0])):
        raise ValueError(
            f"{where}: query, key and value must have the same batch size B, "
            f"got query {q_shape}, key {k_shape} and value {v_shape}"
        )
    if not same(k_shape[1], v_shape[1]):
        raise ValueError(
            f"{where}: key and value must have the same length S, got key {k_shape} and value {v_shape}"
        )


# The encoder block of chapter 8 (mha.torch.EncoderBlock, mha.keras.EncoderBlock).

def check_block_args(d_model, num_heads, d_ff, dropout, norm_first, eps) -> None:
    for name, value in (("d_model", d_model), ("num_heads", num_heads), ("d_ff", d_ff)):
        check_positive_int(name, value)
    check_heads(d_model, num_heads)
    for name, value in (("dropout", dropout), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"EncoderBlock: {name} must be a float, got {type(value).__name__} {value!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"EncoderBlock: dropout must lie in [0, 1), got dropout={dropout}")
    if not eps > 0:
        raise ValueError(f"EncoderBlock: eps must be positive, got eps={eps}")
    if not isinstance(norm_first, bool):
        raise TypeError(f"EncoderBlock: norm_first must be a bool, got {type(norm_first).__name__} {norm_first!r}")


def check_block_input(d_model: int, shape: tuple, dtype: str) -> None:
    """Checks the (B, T, E) input of an EncoderBlock."""
    check_float("EncoderBlock", "x", shape, dtype)
    if len(shape) != 3 or not same(shape[-1], d_model):
        raise ValueError(f"EncoderBlock: x must have shape (B, T, E) with E = d_model = {d_model}, got {shape}")


def block_shapes(e: int, f: int) -> dict[str, tuple]:
    """The keys and shapes of ``EncoderBlock.to_numpy_dict()``; every weight is applied as ``x @ w``."""
    return {
        **{f"w_{n}": (e, e) for n in "qkvo"}, **{f"b_{n}": (e,) for n in "qkvo"},  # attention, as mha.Weights
        "ln1_gamma": (e,), "ln1_beta": (e,), "ln2_gamma": (e,), "ln2_beta": (e,),  # LayerNorm scale, shift
        "w_1": (e, f), "b_1": (f,), "w_2": (f, e), "b_2": (e,),  # FFN: (E -> d_ff) then (d_ff -> E)
    }


def check_block_dict(d, where: str = "EncoderBlock.from_numpy_dict", layout=block_shapes) -> tuple[int, int]:
    """Checks a dict laid out like ``to_numpy_dict()`` (keys and shapes from `layout`); returns (d_model, d_ff)."""
    if not isinstance(d, dict):
        raise TypeError(f"{where}: d must be a dict of NumPy arrays, got {type(d).__name__}")
    if np.ndim(d.get("w_1")) != 2:
        raise ValueError(f"{where}: d needs 'w_1' of shape (E, d_ff), got {np.shape(d.get('w_1'))}")
    expected = layout(*np.shape(d["w_1"]))
    if set(d) != set(expected):
        raise ValueError(
            f"{where}: missing keys {sorted(set(expected) - set(d))}, unexpected keys {sorted(set(d) - set(expected))}"
        )
    for name, shape in expected.items():
        if np.shape(d[name]) != shape:
            raise ValueError(f"{where}: {name} must have shape {shape} (from w_1), got {np.shape(d[name])}")
    return np.shape(d["w_1"])


def check_sequence_mask(name: str, shape: tuple, input_shape: tuple) -> None:
    """A Keras sequence mask (``_keras_mask``) of a (B, length, E) input must be (B, length)."""
    if len(shape) != 2 or not (same(shape[0], input_shape[0]) and same(shape[1], input_shape[1])):
        raise ValueError(
            f"MultiHeadAttention: the Keras mask of {name} must have shape (B, length) = {tuple(input_shape[:2])}, "
            f"got {shape}"
        )


# Chapter 11: decoding (causal_mask's align, MultiHeadAttention.decode and KVCache, DecoderBlock).

ALIGNS = ("top-left", "bottom-right")


def check_align(align) -> None:
    if not isinstance(align, str) or align not in ALIGNS:
        raise ValueError(f"causal_mask: align must be one of {ALIGNS}, got align={align!r}")


def check_decode_input(d_model: int, shape: tuple, dtype: str) -> None:
    """Checks the new tokens x (B, T_new, E) handed to ``MultiHeadAttention.decode``."""
    check_float("MultiHeadAttention.decode", "x", shape, dtype)
    if len(shape) != 3 or not same(shape[-1], d_model):
        raise ValueError(
            f"MultiHeadAttention.decode: x must have shape (B, T_new, E) with E = d_model = {d_model}, got {shape}"
        )


def check_cache(k_shape: tuple, v_shape: tuple, expected: tuple, dtypes: tuple) -> None:
    """Checks a KVCache against the layer and batch it is used with.

    `expected` is (B, Hkv, D): the batch of x, the layer's number of key/value heads and head size.
    """
    where = "MultiHeadAttention.decode"
    if len(k_shape) != 4 or k_shape != v_shape:
        raise ValueError(f"{where}: cache.k and cache.v must share one shape (B, Hkv, S, D), got {k_shape} and {v_shape}")
    b, h, d = expected
    if not (same(k_shape[0], b) and k_shape[1] == h and k_shape[3] == d):
        raise ValueError(
            f"{where}: the cache holds keys of shape {k_shape} (B, Hkv, S, D), but this layer and x need "
            f"(B, Hkv, S, D) = ({b}, {h}, S, {d}): a cache from another layer or another batch"
        )
    if dtypes[0] != dtypes[1]:
        raise TypeError(f"{where}: the cache's k and v must share the layer's dtype, got {dtypes[0]} and {dtypes[1]}")


def check_decoder_args(d_model, num_heads, d_ff, dropout, norm_first, eps) -> None:
    """check_block_args, with the messages naming DecoderBlock."""
    try:
        check_block_args(d_model, num_heads, d_ff, dropout, norm_first, eps)
    except (TypeError, ValueError) as error:
        raise type(error)(str(error).replace("EncoderBlock", "DecoderBlock")) from None


def check_decoder_input(d_model: int, x_shape: tuple, m_shape: tuple, x_dtype: str, m_dtype: str) -> None:
    """Checks the target x (B, T, E) and the encoder's output memory (B, S, E) of a DecoderBlock."""
    for name, shape, dtype, legend in (("x", x_shape, x_dtype, "(B, T, E)"), ("memory", m_shape, m_dtype, "(B, S, E)")):
        check_float("DecoderBlock", name, shape, dtype)
        if len(shape) != 3 or not same(shape[-1], d_model):
            raise ValueError(f"DecoderBlock: {name} must have shape {legend} with E = d_model = {d_model}, got {shape}")
    if not same(x_shape[0], m_shape[0]):
        raise ValueError(f"DecoderBlock: x and memory must have the same batch size B, got x {x_shape}, memory {m_shape}")


def decoder_shapes(e: int, f: int) -> dict[str, tuple]:
    """The keys and shapes of ``DecoderBlock.to_numpy_dict()``; every weight is applied as ``x @ w``."""
    return {
        **{f"self_w_{n}": (e, e) for n in "qkvo"}, **{f"self_b_{n}": (e,) for n in "qkvo"},  # masked self-attention
        **{f"cross_w_{n}": (e, e) for n in "qkvo"}, **{f"cross_b_{n}": (e,) for n in "qkvo"},  # cross-attention
        **{f"ln{i}_{p}": (e,) for i in (1, 2, 3) for p in ("gamma", "beta")},  # after (or before) each sublayer
        "w_1": (e, f), "b_1": (f,), "w_2": (f, e), "b_2": (e,),  # FFN: (E -> d_ff) then (d_ff -> E)
    }


def check_decoder_dict(d) -> tuple[int, int]:
    """Checks a dict laid out like ``DecoderBlock.to_numpy_dict()``; returns (d_model, d_ff)."""
    return check_block_dict(d, "DecoderBlock.from_numpy_dict", decoder_shapes)


def check_cache_type(is_cache: bool, cache) -> None:
    if not is_cache:
        raise TypeError(
            f"MultiHeadAttention.decode: cache must be None or a KVCache returned by decode, got {type(cache).__name__}"
        )


# Chapter 9: gradients and dropout.

def check_dropout(where: str, dropout) -> float:
    """Checks a dropout probability p in [0, 1); returns it as a Python float (which keeps float32 float32)."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"{where}: dropout must be a float in [0, 1), got {type(dropout).__name__} {dropout!r}")
    if not 0 <= dropout < 1:  # also False for NaN
        raise ValueError(f"{where}: dropout must lie in [0, 1), got dropout={dropout}")
    return float(dropout)


def check_grad(where: str, name: str, shape: tuple, dtype: str, expected: tuple, legend: str) -> None:
    """Checks an incoming gradient: a float array with exactly the shape of what it is the gradient of."""
    check_float(where, name, shape, dtype)
    if tuple(shape) != tuple(expected):
        raise ValueError(f"{where}: {name} must have the output's shape {legend} = {tuple(expected)}, got {shape}")


# Chapter 12: rotary position embeddings and sliding-window masks.

def check_rope(x_shape: tuple, x_dtype: str, pos_shape: tuple | None, pos_dtype: str | None, base) -> None:
    """rope(x, positions, base): x (..., T, D) float with D even, positions (T,) integers, base > 0."""
    check_float("rope", "x", x_shape, x_dtype)
    if len(x_shape) < 2:
        raise ValueError(f"rope: x must have rank >= 2 (..., T, D), got shape {x_shape}")
    if x_shape[-1] is not None and x_shape[-1] % 2:
        raise ValueError(
            f"rope: the head size D (last axis of x) must be even, got x of shape {x_shape}: "
            f"feature i turns together with feature i + D/2"
        )
    if pos_shape is not None:
        if pos_dtype not in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
            raise TypeError(f"rope: positions must be integers, got dtype {pos_dtype} with shape {pos_shape}")
        if len(pos_shape) != 1 or not same(pos_shape[0], x_shape[-2]):
            raise ValueError(
                f"rope: positions must have shape (T,) = ({x_shape[-2]},), one per token of x {x_shape}, "
                f"got shape {pos_shape}"
            )
    if isinstance(base, bool) or not isinstance(base, numbers.Real):
        raise TypeError(f"rope: base must be a float, got {type(base).__name__} {base!r}")
    if not base > 0:  # also False for NaN
        raise ValueError(f"rope: base must be positive, got base={base}")


def check_window(t, window, s) -> None:
    """sliding_window_mask(t, window, s): positive ints, and S >= T (the queries are the last T positions)."""
    check_positive_int("t", t)
    check_positive_int("window", window)
    check_positive_int("s", s)
    if s < t:
        raise ValueError(
            f"sliding_window_mask: s must be >= t (the T queries are the last T of the S positions), "
            f"got t={t}, s={s}"
        )


# Chapter 12: grouped-query and multi-query attention (num_kv_heads, repeat_kv).

def check_kv_heads(num_heads: int, num_kv_heads) -> int:
    """Checks num_kv_heads (Hkv) against num_heads (H); returns Hkv, with None meaning H (plain multi-head)."""
    if num_kv_heads is None:
        return num_heads
    check_positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_kv_heads={num_kv_heads} does not divide num_heads={num_heads}: every key/value head "
            f"serves a group of H / Hkv query heads, so Hkv must divide H"
        )
    return int(num_kv_heads)


def check_repeat_kv(shape: tuple, n_rep) -> None:
    """repeat_kv(x, n_rep): x (B, Hkv, S, D) and a positive int n_rep."""
    check_rank("repeat_kv", "x", shape, 4, "(B, Hkv, S, D)")
    try:
        check_positive_int("n_rep", n_rep)
    except (TypeError, ValueError) as error:
        raise type(error)(f"repeat_kv: {error}") from None
