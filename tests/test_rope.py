"""rope: rotary position embeddings, against the maths written out here, in every backend.

The reference answers are independent of the package: the rotation written as a complex
multiplication on the pairs (x_i, x_{i+D/2}) with Python's cmath, and an interleaved RoPE
(pairs (2i, 2i+1), as RoFormer and Meta's LLaMA code) written in this file. Neither
KerasHub nor Hugging Face transformers is installed here, so the maths is the reference.
"""

from __future__ import annotations

import cmath

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends import BACKENDS

OURS = ["numpy", "torch", "keras"]


def positions_for(backend, positions: np.ndarray):
    """An integer position array as the backend's own tensor."""
    return None if positions is None else BACKENDS[backend].tensor(positions)


def run(backend: str, x: np.ndarray, positions=None, base: float = 10000.0) -> np.ndarray:
    b = BACKENDS[backend]
    return b.numpy(b.module.rope(b.tensor(x), positions_for(backend, positions), base))


def complex_formula(x: np.ndarray, positions, base: float = 10000.0) -> np.ndarray:
    """Pair i is the complex number x_i + i x_{i+D/2}, multiplied by e^{i p theta_i}, theta_i = base^(-2i/D)."""
    *lead, t, d = x.shape
    half = d // 2
    flat = x.astype(np.float64).reshape(-1, t, d)
    out = np.empty_like(flat)
    for n in range(flat.shape[0]):
        for row, p in enumerate(positions):
            for i in range(half):
                z = complex(flat[n, row, i], flat[n, row, i + half])
                z *= cmath.exp(1j * int(p) * base ** (-2 * i / d))
                out[n, row, i], out[n, row, i + half] = z.real, z.imag
    return out.reshape(x.shape)


def interleaved_rope(x: np.ndarray, positions, base: float = 10000.0) -> np.ndarray:
    """RoFormer's layout: features 2i and 2i+1 form pair i, turned by p * base^(-2i/D), in float64."""
    d = x.shape[-1]
    theta = base ** (-np.arange(0, d, 2) / d)  # (D/2,)
    angle = np.asarray(positions, np.float64)[:, None] * theta  # (T, D/2)
    even, odd = x[..., 0::2].astype(np.float64), x[..., 1::2].astype(np.float64)  # (..., T, D/2)
    out = np.empty(x.shape)
    out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
    return out


def half_to_interleaved(d: int) -> np.ndarray:
    """The feature permutation: interleaved feature 2i is half-split feature i, 2i+1 is i + D/2."""
    return np.stack([np.arange(d // 2), np.arange(d // 2) + d // 2], axis=-1).reshape(d)  # (D,)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 16).map(lambda n: 2 * n))


@st.composite
def cases(draw):
    b, t, d = draw(shapes)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, t, d)).astype(np.float32)
    positions = draw(st.one_of(st.none(), st.just(rng.integers(0, 5000, t))))
    return x, positions


def test_hand_values():
    # D = 2: one pair, theta_0 = 1, so position p turns (1, 0) by p radians.
    x = np.float32([[1, 0], [1, 0], [0, 1]])  # (T, D) = (3, 2)
    y = run("numpy", x)
    np.testing.assert_allclose(y, [[1, 0], [np.cos(1), np.sin(1)], [-np.sin(2), np.cos(2)]], atol=1e-7)


# The property tests loop over the backends inside, so they stay on TensorFlow's Keras (as in
# test_agreement.py); the parametrized tests below also run on Keras's JAX and torch backends.

@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_property_matches_the_complex_formula(case):
    x, positions = case
    expected = complex_formula(x, np.arange(x.shape[-2]) if positions is None else positions)
    for backend in OURS:
        y = run(backend, x, positions)
        assert y.dtype == np.float32 and y.shape == x.shape
        np.testing.assert_allclose(y, expected, rtol=0, atol=2e-6, err_msg=backend)


@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_property_norm_of_every_token_is_kept(case):
    x, positions = case
    for backend in OURS:
        y = run(backend, x, positions).astype(np.float64)
        np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x.astype(np.float64), axis=-1),
                                   rtol=1e-6, atol=1e-6, err_msg=backend)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 32).map(lambda n: 2 * n), m=st.integers(0, 2000), n=st.integers(0, 2000),
       c=st.integers(-2000, 2000), seed=st.integers(0, 2**16))
def test_property_scores_depend_only_on_the_offset(d, m, n, c, seed):
    """q rotated at m and k at n give the same q.k as at m + c and n + c."""
    c = max(c, -min(m, n))  # keep positions >= 0
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, d)).astype(np.float32)  # (T, D) = (1, D) each
    scale = np.linalg.norm(q) * np.linalg.norm(k)
    expected = complex_formula(q, [m])[0] @ complex_formula(k, [n])[0]
    for backend in OURS:
        turned = lambda a, p: run(backend, a, np.array([p]))[0].astype(np.float64)  # (D,)
        score = lambda pq, pk: float(turned(q, pq) @ turned(k, pk))
        # float32 cos/sin carry ~6e-8 relative error each: the two scores agree to about 1e-6 of |q||k|.
        assert abs(score(m, n) - score(m + c, n + c)) <= 1e-6 * scale + 1e-7, backend
        # and the rotation does something: the score at offset m - n is the complex formula's
        assert abs(score(m, n) - expected) <= 1e-6 * scale + 1e-7, backend


def test_scores_do_change_with_the_offset():
    # The property above cannot hold by accident: moving only one of q, k changes the score.
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 8)).astype(np.float32)
    s = lambda m, n: (run("numpy", q, np.array([m])) @ run("numpy", k, np.array([n])).T)[0, 0]
    assert abs(s(3, 1) - s(3, 2)) > 1e-2


@settings(max_examples=30, deadline=None)
@given(case=cases())
def test_property_half_split_is_interleaved_after_permuting_features(case):
    x, positions = case
    t, d = x.shape[-2:]
    positions = np.arange(t) if positions is None else positions
    perm = half_to_interleaved(d)
    inter = interleaved_rope(x[..., perm], positions)
    for backend in OURS:
        half = run(backend, x, positions)
        np.testing.assert_allclose(half[..., perm], inter, rtol=0, atol=2e-6, err_msg=backend)
        # so the scores are the same in both layouts once w_q and w_k have their columns permuted
        scores_half = half @ np.swapaxes(half, -1, -2)
        np.testing.assert_allclose(scores_half, inter @ np.swapaxes(inter, -1, -2), rtol=0, atol=2e-5, err_msg=backend)


def test_the_layouts_differ_without_the_permutation():
    # Loading interleaved (LLaMA-checkpoint) weights into a half-split RoPE without permuting is a silent bug.
    x = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)
    gap = np.abs(run("numpy", x) - interleaved_rope(x, np.arange(6))).max()
    assert gap > 0.5, gap


@pytest.mark.parametrize("backend", OURS)
def test_position_zero_is_the_identity_and_positions_default_to_arange(backend):
    x = np.random.default_rng(2).standard_normal((2, 3, 5, 8)).astype(np.float32)  # (B, H, T, D)
    np.testing.assert_array_equal(run(backend, x, np.zeros(5, np.int64)), x)
    np.testing.assert_array_equal(run(backend, x), run(backend, x, np.arange(5)))


@pytest.mark.parametrize("backend", OURS)
def test_offset_positions_are_the_tail_of_the_full_sequence(backend):
    # What a decoder with a cache needs: the new tokens at positions S - T_new .. S - 1.
    x = np.random.default_rng(3).standard_normal((1, 2, 10, 6)).astype(np.float32)
    full = run(backend, x)
    np.testing.assert_allclose(run(backend, x[..., 7:, :], np.arange(7, 10)), full[..., 7:, :], rtol=0, atol=1e-7)


@pytest.mark.parametrize("backend", OURS)
def test_base_is_used(backend):
    x = np.random.default_rng(4).standard_normal((4, 6)).astype(np.float32)
    y = run(backend, x, base=500.0)
    np.testing.assert_allclose(y, complex_formula(x, range(4), base=500.0), rtol=0, atol=2e-6)
    assert np.abs(y - run(backend, x)).max() > 1e-3


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_dtype_is_kept(backend, dtype):
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(dtype)
    b = BACKENDS[backend]
    y = b.module.rope(b.tensor(x))
    assert b.numpy(y).dtype == dtype


def test_numpy_torch_keras_equal():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 4, 33, 64)).astype(np.float32)
    positions = rng.integers(0, 8192, 33)
    ref = run("numpy", x, positions)
    exact = complex_formula(x[:1, :1], positions)
    print(f"numpy vs formula: {np.abs(ref[:1, :1] - exact).max():.1e}")
    for backend in OURS[1:]:
        y = run(backend, x, positions)
        print(f"{backend} vs numpy: {np.abs(y - ref).max():.1e}")
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6)


def test_torch_positions_must_be_a_tensor():
    import torch

    import mha.torch

    with pytest.raises(TypeError, match="positions must be a torch.Tensor, got ndarray"):
        mha.torch.rope(torch.zeros(3, 4), np.arange(3))


f32 = lambda *shape: np.zeros(shape, np.float32)
BAD = [
    # (id, x, positions, base, exception, fragments the message must contain)
    ("odd head size", f32(2, 3, 5), None, 10000.0, ValueError, ["rope", "even", "(2, 3, 5)"]),
    ("x of rank 1", f32(4), None, 10000.0, ValueError, ["x", "rank", "(4,)"]),
    ("integer x", np.zeros((3, 4), np.int64), None, 10000.0, TypeError, ["x", "int64", "(3, 4)"]),
    ("positions too long", f32(2, 3, 4), np.arange(4), 10000.0, ValueError, ["positions", "(3,)", "(4,)", "(2, 3, 4)"]),
    ("positions of rank 2", f32(3, 4), np.arange(3)[None], 10000.0, ValueError, ["positions", "(1, 3)"]),
    ("float positions", f32(3, 4), np.arange(3.0), 10000.0, TypeError, ["positions", "integers", "float64"]),
    ("bool positions", f32(2, 4), np.array([True, False]), 10000.0, TypeError, ["positions", "integers", "bool"]),
    ("base zero", f32(3, 4), None, 0.0, ValueError, ["base", "positive", "0"]),
    ("base negative", f32(3, 4), None, -2, ValueError, ["base", "-2"]),
    ("base a string", f32(3, 4), None, "10000", TypeError, ["base", "str"]),
]


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("x, positions, base, exc, fragments", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_raises_clearly(backend, x, positions, base, exc, fragments):
    b = BACKENDS[backend]
    with pytest.raises(Exception) as info:
        b.module.rope(b.tensor(x), positions_for(backend, positions), base)
    assert type(info.value) is exc, f"{backend} raised {type(info.value).__name__}: {info.value}"
    missing = [f for f in fragments if f not in str(info.value)]
    assert not missing, f"{backend}: message lacks {missing}: {info.value}"


def test_keras_rope_needs_a_numpy_table_on_jax():
    """Why mha.keras.rope builds cos/sin from NumPy's float64 angles: Keras 3.15.1's JAX backend
    (JAX_ENABLE_X64 on, as in test_keras_backends.py) computes ops.sin of a float64 tensor in float32."""
    import keras

    angle = keras.ops.convert_to_tensor(np.array([8192.0, 8192.0 * 10000 ** -0.5]))
    assert keras.backend.standardize_dtype(angle.dtype) == "float64" or keras.backend.backend() == "jax"
    got = keras.backend.standardize_dtype(keras.ops.sin(angle).dtype)
    assert got == ("float32" if keras.backend.backend() == "jax" else "float64"), (keras.backend.backend(), got)
    # and the rotation is still right there, at position 8192
    x = np.float32([[1, 0, 0, 0]])
    y = run("keras", x, np.array([8192]))
    np.testing.assert_allclose(y, complex_formula(x, [8192]), rtol=0, atol=1e-7)
