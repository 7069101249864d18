"""sliding_window_mask: the rule written out here, Keras's and JAX's own windows, and a rolling KV cache.

Measured off-by-ones (Keras 3.15.1, JAX 0.10.2; read from their sources, asserted below):
- ``keras.layers.MultiHeadAttention(sliding_window=w)`` and ``GroupQueryAttention(sliding_window=w)``
  keep key j for query i when |i - j| < w, a symmetric band; with ``use_causal_mask=True`` a
  query sees itself and the w - 1 keys before it: w keys, our ``sliding_window_mask(t, w)``.
- ``jax.nn.dot_product_attention(local_window_size=(left, right))`` keeps i - left <= j <= i + right;
  with ``is_causal=True`` and ``(left, 0)`` a query sees left + 1 keys: our window w = left + 1.
Both build their masks top-left (query i at position i), so they equal ours when T == S.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import mha
import mha.numpy as ref
from backends import BACKENDS

OURS = ["numpy", "torch", "keras"]


def mask(backend: str, t: int, window: int, s: int | None = None) -> np.ndarray:
    b = BACKENDS[backend]
    return b.numpy(b.module.sliding_window_mask(t, window, s))


def rule(t: int, window: int, s: int) -> np.ndarray:
    """Query i sits at position i + (s - t) and sees the `window` keys up to and including it."""
    out = np.zeros((t, s), bool)
    for i in range(t):
        here = i + s - t
        for j in range(s):
            out[i, j] = here - window < j <= here
    return out


@pytest.mark.parametrize("backend", OURS)
def test_hand_tables(backend):
    np.testing.assert_array_equal(mask(backend, 4, 2), [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
    # T = 2 new queries over S = 5 keys: they are positions 3 and 4.
    np.testing.assert_array_equal(mask(backend, 2, 3, 5), [[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("t, window, s", [(1, 1, 1), (5, 1, 5), (5, 2, 5), (6, 3, 9), (3, 10, 4), (7, 7, 7), (1, 4, 9)])
def test_matches_the_rule(backend, t, window, s):
    m = mask(backend, t, window, s)
    assert m.dtype == np.bool_ and m.shape == (t, s)
    np.testing.assert_array_equal(m, rule(t, window, s))


@pytest.mark.parametrize("backend", OURS)
def test_every_query_sees_min_of_window_and_its_position_keys(backend):
    m = mask(backend, 6, 3, 8)
    np.testing.assert_array_equal(m.sum(axis=1), [3, 3, 3, 3, 3, 3])
    np.testing.assert_array_equal(mask(backend, 6, 3).sum(axis=1), [1, 2, 3, 3, 3, 3])


@pytest.mark.parametrize("backend", OURS)
def test_a_wide_window_is_the_bottom_right_causal_mask(backend):
    b = BACKENDS[backend]
    causal = b.numpy(b.module.causal_mask(4, 9, align="bottom-right"))
    np.testing.assert_array_equal(mask(backend, 4, 9, 9), causal)
    np.testing.assert_array_equal(mask(backend, 4, 100, 9), causal)
    assert not np.array_equal(mask(backend, 4, 5, 9), causal)  # 5 < 6 + 1 keys of the last query: cut


@pytest.mark.parametrize("backend", OURS)
def test_the_last_rows_of_the_square_mask(backend):
    # Bottom-right: T queries over S keys are the last T rows of the (S, S) mask.
    np.testing.assert_array_equal(mask(backend, 3, 4, 10), mask(backend, 10, 4)[-3:])


# Keras's own definition: the built-in layers carrying the same weights as our reference layer.

def keras_gqa(w: mha.Weights, window: int) -> keras.layers.GroupQueryAttention:
    """keras.layers.GroupQueryAttention with one key/value head per query head, carrying `w`."""
    e, h, d = w.d_model, w.num_heads, w.head_dim
    layer = keras.layers.GroupQueryAttention(head_dim=d, num_query_heads=h, num_key_value_heads=h,
                                             sliding_window=window)
    layer.build((None, None, e), (None, None, e))
    b_q, b_k, b_v, b_o = w.biases()
    for part, w_e, b_e in zip((layer._query_dense, layer._key_dense, layer._value_dense),
                              (w.w_q, w.w_k, w.w_v), (b_q, b_k, b_v)):
        part.kernel.assign(w_e.reshape(e, h, d))  # (E, E) -> (E, H, D)
        part.bias.assign(b_e.reshape(h, d))  # (E,) -> (H, D)
    layer._output_dense.kernel.assign(w.w_o.reshape(h, d, e))  # (E, E) -> (H, D, E)
    layer._output_dense.bias.assign(b_o)
    return layer


def keras_mha(w: mha.Weights, window: int) -> keras.layers.MultiHeadAttention:
    """mha.keras.to_builtin(w), rebuilt with sliding_window=window (the constructor's argument)."""
    loaded = mha.keras.to_builtin(w)
    layer = keras.layers.MultiHeadAttention(num_heads=w.num_heads, key_dim=w.head_dim, sliding_window=window)
    layer.build(query_shape=(None, None, w.d_model), value_shape=(None, None, w.d_model))
    for mine, theirs in zip(layer.weights, loaded.weights, strict=True):
        mine.assign(theirs.value)  # the same kernels and biases, in the same order
    return layer


KERAS_LAYERS = pytest.mark.parametrize(
    "builtin", [keras_mha, keras_gqa], ids=["keras_MultiHeadAttention", "keras_GroupQueryAttention"]
)


@KERAS_LAYERS
@pytest.mark.parametrize("t, window", [(6, 1), (6, 3), (9, 4), (5, 5), (5, 8)])
def test_keras_sliding_window_is_ours_with_the_same_window(builtin, t, window):
    """Keras's sliding_window=w with use_causal_mask=True is our sliding_window_mask(t, w): w' = w."""
    w = mha.Weights.random(16, 4, seed=t + window)
    x = np.random.default_rng(window).standard_normal((2, t, 16)).astype(np.float32)
    out, weights = builtin(w, window)(x, x, use_causal_mask=True, return_attention_scores=True)
    ours_out, ours_weights = ref.MultiHeadAttention.from_weights(w)(x, mask=ref.sliding_window_mask(t, window))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(weights), ours_weights, rtol=0, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), ours_out, rtol=0, atol=1e-5)
    if 1 < window < t:  # w' = w - 1 or w + 1 would not do
        for other in (window - 1, window + 1):
            assert np.abs(ref.MultiHeadAttention.from_weights(w)(x, mask=ref.sliding_window_mask(t, other))[1]
                          - ours_weights).max() > 1e-3


@KERAS_LAYERS
def test_keras_sliding_window_alone_is_a_symmetric_band(builtin):
    """Without use_causal_mask, Keras's window also looks w - 1 keys ahead: ours OR its transpose."""
    t, window = 7, 3
    w = mha.Weights.random(8, 2, seed=1)
    x = np.random.default_rng(1).standard_normal((1, t, 8)).astype(np.float32)
    _, weights = builtin(w, window)(x, x, return_attention_scores=True)
    band = ref.sliding_window_mask(t, window) | ref.sliding_window_mask(t, window).T
    np.testing.assert_allclose(keras.ops.convert_to_numpy(weights),
                               ref.MultiHeadAttention.from_weights(w)(x, mask=band)[1], rtol=0, atol=1e-6)


def test_keras_window_is_top_left_when_s_exceeds_t():
    """Cross-attention with S > T: Keras's band sits on query i = key i, ours at key i + (S - T)."""
    t, s, window = 3, 6, 2
    w = mha.Weights.random(8, 2, seed=2)
    rng = np.random.default_rng(2)
    x, memory = rng.standard_normal((1, t, 8)).astype(np.float32), rng.standard_normal((1, s, 8)).astype(np.float32)
    _, weights = keras_mha(w, window)(x, memory, use_causal_mask=True, return_attention_scores=True)
    weights = keras.ops.convert_to_numpy(weights)
    top_left = np.arange(s)[None, :] <= np.arange(t)[:, None]
    top_left &= np.arange(s)[None, :] > np.arange(t)[:, None] - window
    layer = ref.MultiHeadAttention.from_weights(w)
    np.testing.assert_allclose(weights, layer(x, memory, mask=top_left)[1], rtol=0, atol=1e-6)
    assert np.abs(weights - layer(x, memory, mask=ref.sliding_window_mask(t, window, s))[1]).max() > 0.1


# JAX's own definition.

def test_jax_local_window_size_left_is_window_minus_one():
    """jax.nn.dot_product_attention(is_causal=True, local_window_size=(w - 1, 0)) is our window w."""
    jax = pytest.importorskip("jax")
    rng = np.random.default_rng(3)
    b, h, t, d = 2, 3, 9, 8
    q, k, v = (rng.standard_normal((b, h, t, d)).astype(np.float32) for _ in range(3))
    to_jax = lambda a: jax.numpy.asarray(a.transpose(0, 2, 1, 3))  # JAX's layout: (B, T, H, D)
    for window in (1, 2, 4, 9):
        out = jax.nn.dot_product_attention(to_jax(q), to_jax(k), to_jax(v), is_causal=True,
                                           local_window_size=(window - 1, 0))
        out = np.asarray(out).transpose(0, 2, 1, 3)  # (B, T, H, D) -> (B, H, T, D)
        assert out.dtype == np.float32
        ours, _ = ref.scaled_dot_product_attention(q, k, v, ref.sliding_window_mask(t, window))
        np.testing.assert_allclose(out, ours, rtol=0, atol=1e-6)
        if window < t:  # left = w would be one key too many
            wider = jax.nn.dot_product_attention(to_jax(q), to_jax(k), to_jax(v), is_causal=True,
                                                 local_window_size=(window, 0))
            assert np.abs(np.asarray(wider).transpose(0, 2, 1, 3) - ours).max() > 1e-3
            more, _ = ref.scaled_dot_product_attention(q, k, v, ref.sliding_window_mask(t, window + 1))
            np.testing.assert_allclose(np.asarray(wider).transpose(0, 2, 1, 3), more, rtol=0, atol=1e-6)


# Decoding with a rolling cache: only the last keys and values are kept.

def heads(w: mha.Weights, x: np.ndarray, which: str) -> np.ndarray:
    """(B, L, E) -> the layer's projection for `which` in q, k, v, split into (B, H, L, D)."""
    bias = dict(zip("qkvo", w.biases()))[which]
    return ref.split_heads(x @ getattr(w, f"w_{which}") + bias, w.num_heads)


def windowed_decode(w: mha.Weights, x: np.ndarray, window: int, chunks: list[int], keep: int) -> np.ndarray:
    """Feeds x (B, T, E) in `chunks`, keeping only the last `keep` keys/values between chunks."""
    k_cache = v_cache = np.zeros((x.shape[0], w.num_heads, 0, w.head_dim), np.float32)  # (B, H, 0, D)
    outs, start = [], 0
    for n in chunks:
        new = x[:, start:start + n]  # (B, n, E)
        start += n
        k = np.concatenate([k_cache, heads(w, new, "k")], axis=2)  # (B, H, kept + n, D)
        v = np.concatenate([v_cache, heads(w, new, "v")], axis=2)
        m = ref.sliding_window_mask(n, window, k.shape[2])  # (n, kept + n): the new queries are the last n
        out, _ = ref.scaled_dot_product_attention(heads(w, new, "q"), k, v, m)  # (B, H, n, D)
        outs.append(ref.merge_heads(out) @ w.w_o + w.b_o)  # (B, n, E)
        drop = max(k.shape[2] - keep, 0)
        k_cache, v_cache = k[:, :, drop:], v[:, :, drop:]  # drop the older ones
        assert k_cache.shape[2] <= keep
    return np.concatenate(outs, axis=1)  # (B, T, E)


@pytest.mark.parametrize("window", [1, 3, 5])
@pytest.mark.parametrize("chunks", [[1] * 12, [4, 1, 3, 4], [12], [2, 5, 5]])
@pytest.mark.parametrize("slack", [0, 1])
def test_a_rolling_cache_equals_the_full_windowed_forward(window, chunks, slack):
    """A cache of window - 1 keys is enough (the new token brings its own); window keys is one to spare."""
    keep = window - 1 + slack
    w = mha.Weights.random(12, 3, seed=window)
    x = np.random.default_rng(len(chunks)).standard_normal((2, 12, 12)).astype(np.float32)
    full, _ = ref.MultiHeadAttention.from_weights(w)(x, mask=ref.sliding_window_mask(12, window))
    np.testing.assert_allclose(windowed_decode(w, x, window, chunks, keep), full, rtol=0, atol=1e-5)


def test_a_cache_one_key_too_short_is_wrong():
    w = mha.Weights.random(12, 3, seed=0)
    x = np.random.default_rng(0).standard_normal((1, 12, 12)).astype(np.float32)
    full, _ = ref.MultiHeadAttention.from_weights(w)(x, mask=ref.sliding_window_mask(12, 4))
    assert np.abs(windowed_decode(w, x, 4, [1] * 12, keep=2) - full).max() > 1e-3


BAD = [
    # (id, (t, window, s), exception, fragments the message must contain)
    ("window zero", (4, 0, None), ValueError, ["window", "0"]),
    ("window negative", (4, -2, 6), ValueError, ["window", "-2"]),
    ("window a float", (4, 2.0, None), TypeError, ["window", "float"]),
    ("window a bool", (4, True, None), TypeError, ["window", "bool"]),
    ("s shorter than t", (5, 2, 3), ValueError, ["s must be >= t", "t=5", "s=3"]),
    ("t zero", (0, 2, 3), ValueError, ["t", "0"]),
    ("s a float", (2, 2, 3.0), TypeError, ["s", "float"]),
]


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("args, exc, fragments", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_raises_clearly(backend, args, exc, fragments):
    with pytest.raises(Exception) as info:
        BACKENDS[backend].module.sliding_window_mask(*args)
    assert type(info.value) is exc, f"{backend} raised {type(info.value).__name__}: {info.value}"
    missing = [f for f in fragments if f not in str(info.value)]
    assert not missing, f"{backend}: message lacks {missing}: {info.value}"
