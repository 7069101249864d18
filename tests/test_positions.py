"""sinusoidal_positions: Vaswani et al.'s formula, written out here with math.sin, in every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backends import BACKENDS


def formula(t: int, d_model: int) -> np.ndarray:
    """PE[p, 2i] = sin(p / 10000^(2i/E)), PE[p, 2i+1] = cos(p / 10000^(2i/E)), one entry at a time, in float64."""
    pe = np.zeros((t, d_model))
    for p in range(t):
        for j in range(d_model):
            angle = p / 10000 ** ((j - j % 2) / d_model)  # features 2i and 2i+1 share frequency i
            pe[p, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return pe


@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS)
@pytest.mark.parametrize("t, d_model", [(1, 2), (7, 4), (50, 16), (128, 64), (1000, 6)])
def test_matches_the_formula_in_float32(backend, t, d_model):
    pe = backend.numpy(backend.module.sinusoidal_positions(t, d_model))
    assert pe.shape == (t, d_model) and pe.dtype == np.float32
    # Within one float32 rounding of the exact value: the angles are not computed in float32.
    np.testing.assert_allclose(pe, formula(t, d_model), rtol=0, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS)
def test_hand_values(backend):
    pe = backend.numpy(backend.module.sinusoidal_positions(3, 4))
    np.testing.assert_array_equal(pe[0], np.float32([0, 1, 0, 1]))  # position 0: sin 0 = 0, cos 0 = 1
    np.testing.assert_allclose(pe[2, :2], [math.sin(2), math.cos(2)], atol=1e-7)  # frequency 1
    np.testing.assert_allclose(pe[2, 2:], [math.sin(0.02), math.cos(0.02)], atol=1e-7)  # 1/10000^(2/4)


def test_three_backends_equal():
    tables = [b.numpy(b.module.sinusoidal_positions(200, 32)) for b in BACKENDS.values()]
    for other in tables[1:]:
        np.testing.assert_allclose(other, tables[0], rtol=0, atol=1e-7)


def test_dot_products_depend_only_on_the_offset():
    # The property that makes the encoding useful: <pe[p], pe[p + k]> = sum_i cos(k * freq_i).
    pe = BACKENDS["numpy"].module.sinusoidal_positions(40, 16).astype(np.float64)
    gram = pe @ pe.T  # (T, T)
    for k in range(1, 10):
        np.testing.assert_allclose(np.diagonal(gram, k), np.diagonal(gram, k)[0], atol=1e-5)
    np.testing.assert_allclose(np.diagonal(gram), 16 / 2, atol=1e-5)  # sin^2 + cos^2 = 1, E/2 pairs


BAD = [
    ((0, 4), ValueError, ["t", "0"]),
    ((5, -2), ValueError, ["d_model", "-2"]),
    ((5, 7), ValueError, ["d_model", "even", "7"]),
    ((5.0, 4), TypeError, ["t", "float"]),
    ((5, True), TypeError, ["d_model", "bool"]),
]


@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS)
@pytest.mark.parametrize("args, error, fragments", BAD, ids=[str(a) for a, _, _ in BAD])
def test_bad_sizes(backend, args, error, fragments):
    with pytest.raises(error) as info:
        backend.module.sinusoidal_positions(*args)
    assert type(info.value) is error
    for fragment in fragments:
        assert fragment in str(info.value)
