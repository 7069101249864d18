"""Every backend against the NumPy reference, and all three against the frameworks' own layers."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mha
import mha.numpy as mnp
from backends import BACKENDS, keras_builtin_mha, torch_builtin_mha, torch_sdpa_mha

ATOL = 1e-5
OURS = list(BACKENDS)


def inputs(b, t, s, e, seed):
    rng = np.random.default_rng(seed)
    x_q = rng.standard_normal((b, t, e)).astype(np.float32)
    x_kv = rng.standard_normal((b, s, e)).astype(np.float32)
    return x_q, x_kv


def make_mask(kind: str, b: int, t: int, s: int, seed: int = 0):
    """Masks in our convention (True = may attend) with at least one key per query row."""
    lengths = np.random.default_rng(seed).integers(1, s + 1, size=b)
    lengths[0] = s  # one full-length sequence, like a real padded batch
    return {
        "none": None,
        "padding": mnp.padding_mask(lengths, s),  # (B, 1, 1, S)
        "causal": mnp.causal_mask(t, s),  # (T, S); j <= i keeps key 0 for every row
        "combined": mnp.padding_mask(lengths, s) & mnp.causal_mask(t, s),  # (B, 1, T, S)
    }[kind]


def keras_bias_bug_applies(w: mha.Weights) -> bool:
    """Keras 3.15's TensorFlow `ops.add` takes a (H, 1) bias for a channels-first bias when D == 1
    and adds it along the sequence axis whenever that length equals H (see the strict xfail below).
    The JAX and torch backends add it correctly (tests/test_keras_backends.py runs them)."""
    return w.head_dim == 1 and w.has_bias and keras.backend.backend() == "tensorflow"


def check_all(w: mha.Weights, x_q, x_kv, mask, atol=ATOL):
    """Runs one case everywhere; returns {implementation: (max |out diff|, max |weights diff|)}."""
    ref_out, ref_weights = BACKENDS["numpy"].mha(w, x_q, x_kv, x_kv, mask)
    assert ref_out.dtype == np.float32 and ref_weights.dtype == np.float32
    diffs = {}
    for name in ("torch", "keras"):
        out, weights = BACKENDS[name].mha(w, x_q, x_kv, x_kv, mask)
        diffs[f"mha.{name}"] = (np.abs(out - ref_out).max(), np.abs(weights - ref_weights).max())
    diffs["F.scaled_dot_product_attention"] = (np.abs(torch_sdpa_mha(w, x_q, x_kv, x_kv, mask) - ref_out).max(), 0.0)
    out, weights, fast_out = torch_builtin_mha(w, x_q, x_kv, x_kv, mask)
    diffs["nn.MultiheadAttention"] = (np.abs(out - ref_out).max(), np.abs(weights - ref_weights).max())
    diffs["nn.MultiheadAttention fast path"] = (np.abs(fast_out - ref_out).max(), 0.0)
    if not keras_bias_bug_applies(w):
        out, weights = keras_builtin_mha(w, x_q, x_kv, x_kv, mask)
        diffs["keras.layers.MultiHeadAttention"] = (np.abs(out - ref_out).max(), np.abs(weights - ref_weights).max())
    for name, (d_out, d_weights) in diffs.items():
        assert d_out <= atol and d_weights <= atol, f"{name}: out {d_out:.2e}, weights {d_weights:.2e}"
    return diffs


@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal", "combined"])
@pytest.mark.parametrize("num_heads", [1, 4])
@pytest.mark.parametrize("t,s", [(6, 6), (4, 9), (9, 4)], ids=["self", "cross-T<S", "cross-T>S"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_all_implementations_agree(mask_kind, num_heads, t, s, bias):
    b, e = 3, 16
    w = mha.Weights.random(e, num_heads, bias=bias, seed=t * 10 + s)
    x_q, x_kv = inputs(b, t, s, e, seed=num_heads)
    if t == s:
        x_kv = x_q  # self-attention: one input for query, key and value
    check_all(w, x_q, x_kv, make_mask(mask_kind, b, t, s))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 8),
    s=st.integers(1, 8),
    num_heads=st.integers(1, 4),
    head_dim=st.integers(1, 8),
    mask_kind=st.sampled_from(["none", "padding", "causal", "combined"]),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(b, t, s, num_heads, head_dim, mask_kind, seed):
    w = mha.Weights.random(num_heads * head_dim, num_heads, seed=seed)
    x_q, x_kv = inputs(b, t, s, num_heads * head_dim, seed)
    check_all(w, x_q, x_kv, make_mask(mask_kind, b, t, s, seed))


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    t=st.integers(1, 7),
    s=st.integers(1, 7),
    d=st.integers(1, 9),
    dv=st.integers(1, 5),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_sdpa_backends_match_reference(lead, t, s, d, dv, masked, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((*lead, t, d)).astype(np.float32)
    k = rng.standard_normal((*lead, s, d)).astype(np.float32)
    v = rng.standard_normal((*lead, s, dv)).astype(np.float32)
    mask = rng.random((*lead, t, s)) < 0.6 if masked else None  # may fully mask some rows
    ref_out, ref_weights = BACKENDS["numpy"].sdpa(q, k, v, mask)
    # The reference itself, against a direct float64 formula.
    scores = q.astype(np.float64) @ np.swapaxes(k, -1, -2) / np.sqrt(d)
    keep = np.ones(scores.shape, bool) if mask is None else np.broadcast_to(mask, scores.shape)
    row_max = np.where(keep, scores, -np.inf).max(-1, keepdims=True)
    e = np.where(keep, np.exp(scores - np.where(np.isfinite(row_max), row_max, 0)), 0)
    expected = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)  # a fully masked row stays 0
    np.testing.assert_allclose(ref_weights, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(ref_out, expected @ v, atol=ATOL, rtol=0)
    for name in ("torch", "keras"):
        out, weights = BACKENDS[name].sdpa(q, k, v, mask)
        np.testing.assert_allclose(out, ref_out, atol=ATOL, rtol=0, err_msg=name)
        np.testing.assert_allclose(weights, ref_weights, atol=ATOL, rtol=0, err_msg=name)


@pytest.mark.xfail(
    keras.backend.backend() == "tensorflow",
    strict=True,
    reason="Keras 3.15 TF backend: a (H, 1) bias is added along the sequence axis",
)
def test_keras_builtin_with_head_size_one():
    """Upstream bug, kept as a strict xfail so that a fixed Keras turns this red and the skip above can go.

    keras.layers.MultiHeadAttention adds its (H, D) = (2, 1) query/key/value bias with `ops.add`,
    whose TensorFlow version treats any bias that squeezes to one axis as `bias_add`, and picks
    channels-first (axis 1, the sequence axis) when axis 1 has the bias's length. With S = H = 2
    and D = 1 the key bias lands on the wrong axis.
    """
    w = mha.Weights.random(2, 2, seed=0)
    x_q, x_kv = inputs(1, 1, 2, 2, seed=0)
    ref_out, _ = BACKENDS["numpy"].mha(w, x_q, x_kv, x_kv)
    out, _ = keras_builtin_mha(w, x_q, x_kv, x_kv)
    assert np.abs(out - ref_out).max() <= ATOL


def test_largest_differences_stay_within_tolerance():
    """One larger case (B=2, T=S=64, E=128, H=8, combined mask); prints the table of max differences."""
    w = mha.Weights.random(128, 8, seed=7)
    x_q, _ = inputs(2, 64, 64, 128, seed=7)
    diffs = check_all(w, x_q, x_q, make_mask("combined", 2, 64, 64, seed=7))
    print(f"Keras backend {keras.backend.backend()}")
    for name, (d_out, d_weights) in diffs.items():
        print(f"{name:35s} out {d_out:.2e}  weights {d_weights:.2e}")


@pytest.mark.parametrize("backend", OURS)
def test_hand_checkable_case(backend):
    """One token attending to two keys, with values small enough to check on paper.

    q = [1, 0], k = [[1, 0], [0, 1]], v = [[1, 2], [3, 4]], D = 2:
    scores = [1, 0] / sqrt(2); the weight on key 0 is the logistic function
    of the score gap, p = 1 / (1 + exp(-1/sqrt(2))); out = p v0 + (1 - p) v1.
    """
    q = np.array([[1.0, 0.0]], np.float32)
    k = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    v = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    p = 1.0 / (1.0 + np.exp(-1.0 / np.sqrt(2.0)))
    out, weights = BACKENDS[backend].sdpa(q, k, v)
    np.testing.assert_allclose(weights, [[p, 1 - p]], atol=1e-6)
    np.testing.assert_allclose(out, [[3 - 2 * p, 4 - 2 * p]], atol=1e-6)


@pytest.mark.parametrize("backend", OURS)
def test_hand_checkable_layer_with_identity_weights(backend):
    """E = 2, H = 2 (D = 1), identity projections: head h attends on coordinate h alone.

    Tokens x0 = [1, 0] and x1 = [0, 2]. Head 0 sees q = k = v = first coordinate
    [1, 0]; head 1 the second, [0, 2]. With D = 1 the scale is 1.
    """
    eye = np.eye(2, dtype=np.float32)
    w = mha.Weights(num_heads=2, w_q=eye, w_k=eye, w_v=eye, w_o=eye)
    x = np.array([[[1.0, 0.0], [0.0, 2.0]]], np.float32)  # (B=1, T=2, E=2)
    out, weights = BACKENDS[backend].mha(w, x)
    s = lambda a, b: np.exp(a) / (np.exp(a) + np.exp(b))  # two-way softmax, first entry
    # head 0: scores q_i k_j = [[1, 0], [0, 0]]; values [1, 0]
    head0 = np.array([[s(1, 0), s(0, 1)], [0.5, 0.5]])
    # head 1: scores [[0, 0], [0, 4]]; values [0, 2]
    head1 = np.array([[0.5, 0.5], [s(0, 4), s(4, 0)]])
    np.testing.assert_allclose(weights[0], np.stack([head0, head1]), atol=1e-6)
    expected = np.stack([head0 @ [1.0, 0.0], head1 @ [0.0, 2.0]], axis=-1)  # (T, E): head h -> column h
    np.testing.assert_allclose(out[0], expected, atol=1e-6)


# Keras's implicit mask: Embedding(mask_zero=True) puts a (B, T) sequence mask on its output, and Keras
# hands it to a `call` argument named `mask` even when the caller passes none. Our layer must honour it
# as keras.layers.MultiHeadAttention does (query's mask AND value's mask, AND any explicit mask).

IDS = np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0], [1, 1, 1, 1, 1], [2, 0, 0, 0, 0], [3, 3, 3, 3, 0]])
IDS_KV = np.array([[5, 6, 7, 0], [8, 0, 0, 0], [1, 2, 3, 4], [9, 9, 0, 0], [7, 0, 0, 0]])


def embedded(ids, e: int, seed: int = 0):
    """A fresh masked tensor from Embedding(mask_zero=True), and the same numbers as a NumPy array.

    Fresh each time: keras.layers.MultiHeadAttention deletes the sequence masks of the tensors it is given.
    """
    import keras

    table = np.random.default_rng(seed).standard_normal((10, e)).astype(np.float32)
    layer = keras.layers.Embedding(10, e, mask_zero=True, embeddings_initializer=keras.initializers.Constant(table))
    return layer(ids), table[ids]


@pytest.mark.parametrize("batch", [2, 5], ids=["B!=T", "B=T"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("causal", [False, True], ids=["seq-masks", "seq-masks-and-causal"])
def test_keras_layer_honours_the_implicit_sequence_mask(batch, cross, causal):
    import keras

    e, h = 8, 2
    w = mha.Weights.random(e, h, seed=batch)
    ids_q, ids_kv = IDS[:batch], (IDS_KV if cross else IDS)[:batch]
    t, s = ids_q.shape[1], ids_kv.shape[1]
    explicit = mnp.causal_mask(t, s) if causal else None  # (T, S): keeps its meaning even when B = T
    real_q, real_kv = ids_q != 0, ids_kv != 0
    full = real_q[:, None, :, None] & real_kv[:, None, None, :]  # (B, 1, T, S): what Keras's layer builds
    full = full if explicit is None else full & explicit

    def ours():
        x_q, _ = embedded(ids_q, e, 0)
        layer = mha.keras.MultiHeadAttention.from_weights(w)
        if not cross:
            return layer(x_q, mask=explicit)  # one tensor: Keras fills the `mask` argument itself
        return layer(x_q, embedded(ids_kv, e, 1)[0], mask=explicit)

    def builtin(**kwargs):
        x_q, _ = embedded(ids_q, e, 0)
        x_kv = x_q if not cross else embedded(ids_kv, e, 1)[0]
        attention_mask = None if explicit is None else np.broadcast_to(explicit, (batch, t, s))
        return mha.keras.to_builtin(w)(x_q, x_kv, attention_mask=attention_mask, **kwargs)

    out, weights = (keras.ops.convert_to_numpy(a) for a in ours())
    ref_out, ref_weights = mnp.MultiHeadAttention.from_weights(w)(
        embedded(ids_q, e, 0)[1], embedded(ids_kv, e, 1 if cross else 0)[1], mask=full
    )
    np.testing.assert_allclose(out, ref_out, atol=ATOL, rtol=0)
    np.testing.assert_allclose(weights, ref_weights, atol=ATOL, rtol=0)
    # Keras's weights path (return_attention_scores=True) gives padded query rows zero weights, as we do.
    k_out, k_weights = (keras.ops.convert_to_numpy(a) for a in builtin(return_attention_scores=True))
    np.testing.assert_allclose(out, k_out, atol=ATOL, rtol=0)
    np.testing.assert_allclose(weights, k_weights, atol=ATOL, rtol=0)
    # Its fused path agrees on the real query rows; on a padded row (every key blocked) it gives
    # uniform weights, so its output there is not the bias b_o that our zero weights leave.
    fused = keras.ops.convert_to_numpy(builtin())
    np.testing.assert_allclose(out[real_q], fused[real_q], atol=ATOL, rtol=0)
    padded = ~full.any(-1)[:, 0]  # (B, T): query rows that may attend nothing
    assert padded.any()
    np.testing.assert_allclose(out[padded], np.broadcast_to(w.b_o, out[padded].shape), atol=ATOL, rtol=0)
    assert (weights.transpose(0, 2, 1, 3)[padded] == 0).all()
    assert np.abs(fused[padded] - w.b_o).max() > 1e-2


def test_keras_layer_sequence_mask_in_a_functional_model_with_a_fixed_batch():
    """While Keras traces, the batch size is known: a (B, T) mask read as an attention mask would raise."""
    import keras

    w = mha.Weights.random(8, 2, seed=1)
    ids = IDS[:2]
    table = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    inp = keras.Input((5,), batch_size=2, dtype="int32")
    x = keras.layers.Embedding(10, 8, mask_zero=True, embeddings_initializer=keras.initializers.Constant(table))(inp)
    out, _ = mha.keras.MultiHeadAttention.from_weights(w)(x)
    model = keras.Model(inp, out)
    real = ids != 0
    ref, _ = mnp.MultiHeadAttention.from_weights(w)(table[ids], mask=real[:, None, None, :] & real[:, None, :, None])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(ids)), ref, atol=ATOL, rtol=0)


def test_keras_layer_output_keeps_the_query_sequence_mask():
    import keras
    from keras.src.backend import get_keras_mask  # Keras's own accessor (a plain attribute on TensorFlow only)

    x, _ = embedded(IDS[:2], 8)
    out, weights = mha.keras.MultiHeadAttention.from_weights(mha.Weights.random(8, 2))(x)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(get_keras_mask(out)), IDS[:2] != 0)
    assert get_keras_mask(weights) is None
