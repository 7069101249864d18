"""Softmax at the dtype's edge, fully masked rows, half precision, dtypes kept, exact head round trips."""

from __future__ import annotations

import subprocess
import sys
import warnings

import keras
import ml_dtypes
import numpy as np
import pytest
import torch

import mha
from backends import BACKENDS

OURS = list(BACKENDS)
HALF = {  # the low-precision dtypes each backend can compute in
    "numpy": [np.float16],
    "torch": [torch.float16, torch.bfloat16],
    "keras": ["float16", "bfloat16"],
}


def cast(backend: str, a: np.ndarray, dtype):
    if backend == "numpy":
        return a.astype(dtype)
    if backend == "torch":
        return torch.from_numpy(a).to(dtype)
    return keras.ops.cast(a, dtype)


def to_f64(backend: str, x) -> np.ndarray:
    if backend == "torch":
        return x.detach().double().numpy()
    if backend == "keras":
        return keras.ops.convert_to_numpy(keras.ops.cast(x, "float64"))
    return np.asarray(x, np.float64)


@pytest.mark.parametrize(
    "backend,dtype",
    [(b, d) for b in OURS for d in ["float16", "bfloat16", "float32", "float64"] if (b, d) != ("numpy", "bfloat16")],
)  # NumPy has no bfloat16 arithmetic of its own
def test_softmax_survives_the_dtype_max(backend, dtype):
    big = float(ml_dtypes.finfo(dtype).max) if dtype == "bfloat16" else float(np.finfo(dtype).max)
    x = np.array([[big, big / 2, 0.0, -big], [big, big, big, big], [-big, -big, 0.0, 0.0]])
    tdtype = {"torch": getattr(torch, dtype)}.get(backend, dtype)
    xb = cast(backend, x.astype(np.float64), tdtype) if backend != "numpy" else x.astype(dtype)
    if backend == "numpy":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no overflow warning either
            y = BACKENDS[backend].module.softmax(xb)
    else:
        y = BACKENDS[backend].module.softmax(xb)
    y = to_f64(backend, y)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, [[1, 0, 0, 0], [0.25] * 4, [0, 0, 0.5, 0.5]], atol=1e-3)


@pytest.mark.parametrize("backend", OURS)
def test_fully_masked_rows_give_zero_weights_and_zero_output(backend):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, s, 4)).astype(np.float32) for s in (5, 6, 6))
    mask = np.ones((2, 1, 5, 6), bool)
    mask[0, :, 2] = False  # query 2 of sequence 0 may attend nothing
    mask[1] = False  # sequence 1 is all padding
    out, weights = BACKENDS[backend].sdpa(q, k, v, mask)
    assert np.isfinite(out).all() and np.isfinite(weights).all()
    assert (weights[0, :, 2] == 0).all() and (out[0, :, 2] == 0).all()
    assert (weights[1] == 0).all() and (out[1] == 0).all()
    np.testing.assert_allclose(weights[0, :, [0, 1, 3, 4]].sum(-1), 1, atol=1e-6)


@pytest.mark.parametrize("backend", OURS)
def test_layer_with_an_all_padding_sequence(backend):
    w = mha.Weights.random(8, 2, seed=3)
    x = np.random.default_rng(3).standard_normal((2, 4, 8)).astype(np.float32)
    mask = mha.numpy.padding_mask([4, 0], 4)  # sequence 1 has no real token
    out, weights = BACKENDS[backend].mha(w, x, mask=mask)
    assert np.isfinite(out).all() and (weights[1] == 0).all()
    np.testing.assert_allclose(out[1], np.broadcast_to(w.b_o, (4, 8)), atol=1e-6)  # zero attention + output bias


@pytest.mark.parametrize("backend", OURS)
def test_half_precision_masking_never_gives_nan_or_inf(backend):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 2, 6, 8)) * 30  # large scores: exp would overflow float16 without the max trick
    k = rng.standard_normal((2, 2, 7, 8)) * 30
    v = rng.standard_normal((2, 2, 7, 8))
    mask = rng.random((2, 1, 6, 7)) < 0.5
    mask[0, 0, 0] = False  # one fully masked row
    mask[1, 0, 1] = False
    ref_out, ref_weights = BACKENDS["numpy"].sdpa(q, k, v, mask)  # float64 reference
    for dtype in HALF[backend]:
        mod = BACKENDS[backend].module
        out, weights = mod.scaled_dot_product_attention(*(cast(backend, a, dtype) for a in (q, k, v)), BACKENDS[backend].tensor(mask))
        out, weights = to_f64(backend, out), to_f64(backend, weights)
        assert np.isfinite(out).all() and np.isfinite(weights).all(), dtype
        assert (weights[0, :, 0] == 0).all() and (weights[1, :, 1] == 0).all(), dtype
        np.testing.assert_allclose(weights, ref_weights, atol=0.05)  # half precision, rounded scores


@pytest.mark.parametrize("backend", OURS)
def test_float32_in_float32_out(backend):
    b = BACKENDS[backend]
    x = np.random.default_rng(2).standard_normal((2, 3, 8)).astype(np.float32)
    results = {
        "softmax": b.module.softmax(b.tensor(x)),
        "sdpa": b.module.scaled_dot_product_attention(b.tensor(x), b.tensor(x), b.tensor(x))[0],
        "split": b.module.split_heads(b.tensor(x), 2),
        "layer out": b.module.MultiHeadAttention.from_weights(mha.Weights.random(8, 2))(b.tensor(x))[0],
        "layer weights": b.module.MultiHeadAttention.from_weights(mha.Weights.random(8, 2))(b.tensor(x))[1],
    }
    for name, y in results.items():
        assert keras.backend.standardize_dtype(y.dtype) == "float32", (name, y.dtype)


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("shape,heads", [((1, 1, 1), 1), ((2, 5, 12), 3), ((3, 7, 16), 8), ((2, 4, 6), 6)])
def test_split_merge_round_trip_exactly(backend, shape, heads):
    b = BACKENDS[backend]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    split = b.module.split_heads(b.tensor(x), heads)
    bb, t, e = shape
    assert tuple(split.shape) == (bb, heads, t, e // heads)
    np.testing.assert_array_equal(b.numpy(split), x.reshape(bb, t, heads, e // heads).transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(b.numpy(b.module.merge_heads(split)), x)


@pytest.mark.parametrize("backend", OURS)
def test_masks(backend):
    b = BACKENDS[backend]
    causal = b.numpy(b.module.causal_mask(3, 4))
    np.testing.assert_array_equal(causal, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]])
    assert causal.dtype == bool and b.numpy(b.module.causal_mask(2)).shape == (2, 2)
    pad = b.numpy(b.module.padding_mask([3, 1, 0], 4))
    assert pad.shape == (3, 1, 1, 4) and pad.dtype == bool
    np.testing.assert_array_equal(pad[:, 0, 0], [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("backend", OURS)
def test_weights_round_trip(backend):
    w = mha.Weights.random(12, 3, seed=5)
    layer = BACKENDS[backend].module.MultiHeadAttention.from_weights(w)
    assert layer.get_weights().allclose(w)
    w_nobias = mha.Weights.random(12, 3, bias=False, seed=5)
    assert not BACKENDS[backend].module.MultiHeadAttention.from_weights(w_nobias).get_weights().has_bias


def test_weights_copy_does_not_alias():
    w = mha.Weights.random(4, 2)
    layer = mha.numpy.MultiHeadAttention.from_weights(w)
    w.w_q[:] = 0
    assert not np.allclose(layer.get_weights().w_q, 0)


def test_importing_mha_imports_no_framework():
    code = "import sys, mha; print(sorted(m for m in ('torch', 'keras', 'tensorflow', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_keras_layer_takes_a_mask_without_warning():
    import mha.keras

    layer = mha.keras.MultiHeadAttention.from_weights(mha.Weights.random(8, 2))
    x = np.zeros((1, 3, 8), np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x, mask=mha.numpy.causal_mask(3))
        layer(x, x, x, mask=mha.numpy.padding_mask([2], 3))
    assert [str(w.message) for w in caught] == []


def test_the_warning_check_can_fail():
    """A layer with a `mask` argument but no masking support does warn: the check above sees it."""

    class Plain(keras.layers.Layer):
        def call(self, x, mask=None):
            return x

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Plain()(np.zeros((1, 3, 8), np.float32), mask=np.ones((1, 3), bool))
    assert any("destroy the mask" in str(w.message) for w in caught)


def test_plot_accepts_every_backend():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import mha.plot

    w = mha.Weights.random(8, 2)
    x = np.random.default_rng(0).standard_normal((1, 3, 8)).astype(np.float32)
    for backend in OURS:
        _, weights = BACKENDS[backend].module.MultiHeadAttention.from_weights(w)(BACKENDS[backend].tensor(x))
        fig = mha.plot.heads(weights, queries="abc", keys="abc")
        assert len([a for a in fig.axes if a.images]) == 2
        ax = mha.plot.heatmap(weights[0, 0], queries="abc", keys="abc", title=backend)
        assert ax.images[0].get_array().shape == (3, 3)
        plt.close("all")
    t = torch.ones(2, 2, requires_grad=True)
    assert mha.plot.to_numpy(t * 1).shape == (2, 2)
    with pytest.raises(ValueError, match="pick one batch item and head"):
        mha.plot.heatmap(np.zeros((1, 2, 3, 3)))


def test_expect_error_prints_and_insists(capsys):
    with mha.expect_error(ValueError):
        mha.numpy.causal_mask(0)
    assert capsys.readouterr().out == "ValueError: t must be positive, got t=0\n"
    with pytest.raises(AssertionError, match="expected ValueError, but nothing was raised"):
        with mha.expect_error(ValueError):
            mha.numpy.causal_mask(1)
    with pytest.raises(TypeError):
        with mha.expect_error(ValueError):
            mha.numpy.causal_mask(1.5)


def keras_variables(a: np.ndarray) -> list:
    """The same numbers as a keras.Variable, and on TensorFlow as a tf.Variable too (it has no .ndim)."""
    found = [keras.Variable(a, trainable=False)]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        found.append(tf.Variable(a))
    return found


def test_keras_functions_take_variables():
    """Every public mha.keras function converts its inputs on entry: Variables give what arrays give."""
    import mha.keras as mk

    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    q4 = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
    mask = np.tril(np.ones((3, 3), bool))
    lengths = np.array([3, 1], np.int32)
    w = mha.Weights.random(8, 2, seed=4)
    d = mha.numpy.EncoderBlock(8, 2, 16).to_numpy_dict()
    calls = {
        "softmax": lambda v: mk.softmax(v(x)),
        "masked_softmax": lambda v: mk.masked_softmax(v(x[:, :, :3]), v(mask)),
        "padding_mask": lambda v: mk.padding_mask(v(lengths), 3),
        "scaled_dot_product_attention": lambda v: mk.scaled_dot_product_attention(v(q4), v(q4), v(q4), v(mask))[0],
        "split_heads": lambda v: mk.split_heads(v(x), 2),
        "merge_heads": lambda v: mk.merge_heads(v(q4)),
        "MultiHeadAttention": lambda v: mk.MultiHeadAttention.from_weights(w)(v(x), v(x), v(x), mask=v(mask))[0],
        "to_builtin_mask": lambda v: mk.to_builtin_mask(v(mask), 2, 3, 3),
        "EncoderBlock": lambda v: mk.EncoderBlock.from_numpy_dict(d, 2)(v(x), mask=v(mask))[0],
    }
    for name, call in calls.items():
        expected = keras.ops.convert_to_numpy(call(lambda a: a))
        for i in range(len(keras_variables(x))):
            got = keras.ops.convert_to_numpy(call(lambda a: keras_variables(a)[i]))  # no variable comes back
            np.testing.assert_array_equal(got, expected, err_msg=f"{name}, variable {i}")


def test_torch_fully_masked_rows_give_finite_gradients():
    """torch.softmax alone gives an all -inf row 0/0 = NaN and NaN gradients: ours gives zeros."""
    import mha.torch

    x = torch.tensor([[0.0, 1.0], [float("-inf")] * 2], requires_grad=True)
    y = mha.torch.softmax(x)
    y.sum().backward()
    assert torch.isnan(torch.softmax(x.detach(), -1)[1]).all()  # what the fix is for
    assert (y[1] == 0).all() and (x.grad == 0).all()
    q = torch.randn(2, 3, 4, requires_grad=True)
    k, v = (torch.randn(2, 5, 4, requires_grad=True) for _ in range(2))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    out, weights = mha.torch.scaled_dot_product_attention(q, k, v, mask)
    (out.sum() + weights.sum()).backward()
    assert all(t.grad.isfinite().all() for t in (q, k, v))
    assert (weights[:, 1] == 0).all() and (out[:, 1] == 0).all()
