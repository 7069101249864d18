"""tiled_attention, threaded_attention and fixed_shift_attention give scaled_dot_product_attention's
output without ever holding the (T, S) weights.

Property tests over random shapes (T != S, broadcast batch axes, block sizes
that do and do not divide S), masks (padding, causal, random, fully masked
rows), dtypes and bad inputs; then a tracemalloc check that its peak memory
stays far below the naive path's (T, S) arrays. fixed_shift_attention's
fallback (a bound so loose that the exps underflow) is counted and checked, and
the thread pools' matrix products are checked to run on one BLAS thread each.
"""

from __future__ import annotations

import threading
import tracemalloc
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_info, threadpool_limits

from mha import numpy as mnp

MASK_KINDS = ["none", "random", "causal", "padding", "fully masked rows"]


def make_mask(kind: str, rng, lead: tuple, t: int, s: int):
    """A boolean mask broadcastable to (*lead, T, S), or None."""
    if kind == "none":
        return None
    if kind == "causal":
        return mnp.causal_mask(t, s)  # (T, S): broadcasts over every leading axis
    if kind == "padding":
        return np.arange(s) < rng.integers(0, s + 1, size=(*lead, 1, 1))  # (*lead, 1, S), some rows empty
    mask = rng.random((*lead, t, s)) < 0.6  # (*lead, T, S)
    if kind == "fully masked rows":
        mask[..., rng.integers(0, t), :] = False  # one query may attend nothing
    return mask


@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    t=st.integers(1, 40),
    s=st.integers(1, 40),
    d=st.integers(1, 9),
    dv=st.integers(1, 6),
    block_size=st.integers(1, 48),
    mask_kind=st.sampled_from(MASK_KINDS),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_tiled_equals_naive(lead, t, s, d, dv, block_size, mask_kind, dtype, seed):
    rng = np.random.default_rng(seed)
    lead = tuple(lead)
    q = (3 * rng.standard_normal((*lead, t, d))).astype(dtype)  # large scores: the running max moves
    k = rng.standard_normal((*lead, s, d)).astype(dtype)
    v = rng.standard_normal((*lead, s, dv)).astype(dtype)
    mask = make_mask(mask_kind, rng, lead, t, s)
    naive, weights = mnp.scaled_dot_product_attention(q, k, v, mask)
    empty = ~weights.any(axis=-1)  # (*lead, T): rows that may attend nothing
    for tiled in (mnp.tiled_attention(q, k, v, mask, block_size=block_size),
                  mnp.threaded_attention(q, k, v, mask, block_size=block_size, key_block_size=block_size + 2, workers=3),
                  mnp.fixed_shift_attention(q, k, v, mask, block_size=block_size, key_block_size=block_size + 2,
                                            workers=3)):
        assert tiled.dtype == dtype and tiled.shape == naive.shape == (*lead, t, dv)
        np.testing.assert_allclose(tiled, naive, rtol=0, atol=1e-5)
        assert (tiled[empty] == 0).all() and np.isfinite(tiled).all()


@pytest.mark.parametrize("block_size", [1, 3, 4, 5, 8, 100])
def test_block_sizes_that_do_and_do_not_divide_s(block_size):
    rng = np.random.default_rng(block_size)
    q, k, v = (rng.standard_normal((2, 3, n, 4)).astype(np.float32) for n in (6, 8, 8))
    mask = mnp.causal_mask(6, 8)
    naive, _ = mnp.scaled_dot_product_attention(q, k, v, mask)
    np.testing.assert_allclose(mnp.tiled_attention(q, k, v, mask, block_size=block_size), naive, atol=1e-6)


@pytest.mark.parametrize("attention", [mnp.tiled_attention, mnp.threaded_attention, mnp.fixed_shift_attention])
def test_broadcast_batch_axes_and_inputs_left_untouched(attention):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    k, v = (rng.standard_normal((1, 3, 7, 4)).astype(np.float32) for _ in range(2))  # shared over B
    before = [a.copy() for a in (q, k, v)]
    naive, _ = mnp.scaled_dot_product_attention(q, k, v)
    np.testing.assert_allclose(attention(q, k, v, block_size=3), naive, atol=1e-6)
    np.testing.assert_allclose(mnp.threaded_attention(q, k, v, key_block_size=2), naive, atol=1e-6)
    np.testing.assert_allclose(mnp.fixed_shift_attention(q, k, v, key_block_size=2), naive, atol=1e-6)
    for a, b in zip((q, k, v), before):
        np.testing.assert_array_equal(a, b)


def test_no_keys_gives_zeros():
    q, k, v = np.ones((2, 3, 4), np.float32), np.ones((2, 0, 4), np.float32), np.ones((2, 0, 5), np.float32)
    for attention in (mnp.tiled_attention, mnp.threaded_attention, mnp.fixed_shift_attention):
        np.testing.assert_array_equal(attention(q, k, v), np.zeros((2, 3, 5), np.float32))


def test_every_row_masked_gives_zeros_not_nan():
    q, k, v = (np.ones((2, n, 4), np.float32) for n in (3, 5, 5))
    for attention in (mnp.tiled_attention, mnp.threaded_attention, mnp.fixed_shift_attention):
        out = attention(q, k, v, np.zeros((3, 5), bool), block_size=2)
        assert (out == 0).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtype_in_is_dtype_out(dtype):
    q = np.ones((1, 2, 3, 4), dtype)
    for attention in (mnp.tiled_attention, mnp.threaded_attention, mnp.fixed_shift_attention):
        out = attention(q, q, q, block_size=2)
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, q)  # equal keys, equal weights: the mean of equal values


f32 = lambda *shape: np.zeros(shape, np.float32)
BAD_INPUTS = [  # (id, (query, key, value, mask)): each one a bad call of scaled_dot_product_attention
    ("q/k head sizes differ", (f32(2, 3, 8), f32(2, 4, 4), f32(2, 4, 4), None)),
    ("k/v lengths differ", (f32(2, 3, 8), f32(2, 4, 8), f32(2, 5, 8), None)),
    ("query of rank 1", (f32(8), f32(4, 8), f32(4, 8), None)),
    ("batch axes do not broadcast", (f32(2, 3, 8), f32(3, 4, 8), f32(3, 4, 8), None)),
    ("integer query", (np.zeros((2, 3, 8), np.int64), f32(2, 4, 8), f32(2, 4, 8), None)),
    ("mixed dtypes", (f32(2, 3, 8), np.zeros((2, 4, 8)), f32(2, 4, 8), None)),
    ("float mask", (f32(2, 3, 8), f32(2, 4, 8), f32(2, 4, 8), np.ones((3, 4), np.float32))),
    ("mask (S, T) instead of (T, S)", (f32(2, 3, 8), f32(2, 4, 8), f32(2, 4, 8), np.ones((4, 3), bool))),
    ("mask of higher rank", (f32(3, 8), f32(4, 8), f32(4, 8), np.ones((2, 3, 4), bool))),
]


@pytest.mark.parametrize("args", [a for _, a in BAD_INPUTS], ids=[i for i, _ in BAD_INPUTS])
def test_bad_input_raises_what_sdpa_raises(args):
    """The same exception type and the same sentence as scaled_dot_product_attention (naming itself), on entry."""
    with pytest.raises((TypeError, ValueError)) as naive:
        mnp.scaled_dot_product_attention(*args)
    for name in ("tiled_attention", "threaded_attention", "fixed_shift_attention"):
        with pytest.raises((TypeError, ValueError)) as tiled:
            getattr(mnp, name)(*args)
        assert type(tiled.value) is type(naive.value)
        assert str(tiled.value) == str(naive.value).replace("scaled_dot_product_attention", name)
        assert str(tiled.value).startswith(f"{name}: ")


@pytest.mark.parametrize("block_size, error", [(0, ValueError), (-4, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bad_block_size(block_size, error):
    q = np.ones((3, 4), np.float32)
    for attention in (mnp.tiled_attention, mnp.threaded_attention, mnp.fixed_shift_attention):
        with pytest.raises(error, match="block_size"):
            attention(q, q, q, block_size=block_size)
    for attention in (mnp.threaded_attention, mnp.fixed_shift_attention):
        with pytest.raises(error, match="key_block_size"):
            attention(q, q, q, key_block_size=block_size)


def peak_bytes(fn) -> int:
    """Peak bytes NumPy allocated while `fn` ran (NumPy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_tiled_memory_stays_far_below_the_naive_scores():
    b, h, t, d, block = 1, 2, 1024, 16, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, h, t, d)).astype(np.float32) for _ in range(3))
    scores_bytes = b * h * t * t * 4  # one float32 (T, S) matrix per head: 8 MiB here
    out_bytes = b * h * t * d * 4
    naive = peak_bytes(lambda: mnp.scaled_dot_product_attention(q, k, v))
    tiled = peak_bytes(lambda: mnp.tiled_attention(q, k, v, block_size=block))
    assert naive >= scores_bytes  # the naive path holds at least the whole (T, S) matrix
    assert tiled - out_bytes < scores_bytes / 16  # the tiled one, a few (block, block) tiles


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    t=st.integers(1, 24),
    s=st.integers(1, 24),
    d=st.integers(1, 9),
    mask_kind=st.sampled_from(MASK_KINDS),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_fast_sdpa_equals_the_reference(lead, t, s, d, mask_kind, dtype, seed):
    """Chapter 13's in-place SDPA returns the reference's output and weights, in the input's dtype."""
    rng = np.random.default_rng(seed)
    lead = tuple(lead)
    q = (3 * rng.standard_normal((*lead, t, d))).astype(dtype)
    k = rng.standard_normal((*lead, s, d)).astype(dtype)
    v = rng.standard_normal((*lead, s, d)).astype(dtype)
    q_strided = np.swapaxes(np.swapaxes(q, -1, -2).copy(), -1, -2)  # a non-contiguous view, like split heads
    mask = make_mask(mask_kind, rng, lead, t, s)
    out, weights = mnp.scaled_dot_product_attention(q, k, v, mask)
    fast_out, fast_weights = mnp.fast_scaled_dot_product_attention(q_strided, k, v, mask)
    assert fast_out.dtype == fast_weights.dtype == dtype
    np.testing.assert_allclose(fast_out, out, rtol=0, atol=1e-5)
    np.testing.assert_allclose(fast_weights, weights, rtol=0, atol=1e-6)
    assert np.array_equal(q_strided, q)  # the caller's input is left alone


@pytest.mark.parametrize("attention", [mnp.threaded_attention, mnp.fixed_shift_attention])
def test_threaded_memory_is_a_few_blocks_per_worker(attention):
    """Two workers, each one (128, 256) block of scores at a time: far below one head's (T, S) scores."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 1024, 16)).astype(np.float32) for _ in range(3))
    out_bytes = q.nbytes
    peak = peak_bytes(lambda: attention(q, k, v, block_size=128, key_block_size=256, workers=2))
    block_bytes = 128 * 256 * 4
    with_ones = (k.nbytes + v.nbytes) * 17 // 16  # fixed_shift_attention's (k, 1) and (v, 1): one more column
    extra = with_ones if attention is mnp.fixed_shift_attention else 0
    assert peak - out_bytes - extra < 2 * 2 * block_bytes  # per worker: its block and its exp, with room to spare
    assert peak - out_bytes < 1024 * 1024 * 4 / 4  # a quarter of one head's scores


def test_keys_shared_by_every_head_are_not_copied_per_head():
    """One (S, D) key and value matrix for 16 x 8 heads: fixed_shift_attention's (k, 1) and (v, 1) are built
    once, like threaded_attention's contiguous keys, not once per head."""
    rng = np.random.default_rng(4)
    q = rng.standard_normal((16, 8, 64, 64)).astype(np.float32)
    k, v = (rng.standard_normal((2048, 64)).astype(np.float32) for _ in range(2))
    per_head_copy = 16 * 8 * k.nbytes  # 64 MiB: what copying the keys for each head would take
    for attention in (mnp.threaded_attention, mnp.fixed_shift_attention):
        assert peak_bytes(lambda: attention(q, k, v, workers=2)) - q.nbytes < per_head_copy / 8


def test_fixed_shift_falls_back_to_the_running_max_where_the_bound_is_loose():
    """Long queries: |q| max|k| / sqrt(D) is hundreds above their best score (no key points their way), exp2 underflows.

    Those rows, and only those, go through _attend_query_tile, and the result is still the reference's.
    """
    rng = np.random.default_rng(5)
    t, d = 64, 16
    q = rng.standard_normal((2, t, d)).astype(np.float32)
    q[:, : t // 2] *= 60  # the first half of the queries: bounds near 340 for best scores near 140
    k, v = (rng.standard_normal((2, t, d)).astype(np.float32) for _ in range(2))
    naive, _ = mnp.scaled_dot_product_attention(q, k, v)
    redone = []  # rows per call; list.append is atomic, where a Mock's call count is not across threads
    real_tile = mnp._attend_query_tile

    def recording_tile(q, *args):
        redone.append(len(q))
        return real_tile(q, *args)

    with mock.patch.object(mnp, "_attend_query_tile", recording_tile):
        out = mnp.fixed_shift_attention(q, k, v, block_size=t, key_block_size=16, workers=2)
        np.testing.assert_allclose(out, naive, rtol=0, atol=1e-5)
        assert redone == [t // 2, t // 2]  # one call per head, for its long queries only
        redone.clear()
        short = q[:, t // 2:]
        np.testing.assert_allclose(mnp.fixed_shift_attention(short, k, v, workers=2),
                                   mnp.scaled_dot_product_attention(short, k, v)[0], rtol=0, atol=1e-5)
        assert redone == []  # a tight bound: no row falls back


@pytest.mark.parametrize("attention", [mnp.tiled_attention, mnp.threaded_attention, mnp.fixed_shift_attention])
def test_values_of_width_zero_give_an_empty_output(attention):
    """Dv = 0, as the reference allows: (..., T, 0), not an error (fixed_shift's (v, 1) must still get its 1)."""
    rng = np.random.default_rng(5)
    q, k = (rng.standard_normal((2, 7, 4)).astype(np.float32) for _ in range(2))
    v = np.zeros((2, 7, 0), np.float32)
    out = attention(q, k, v)
    assert out.shape == mnp.scaled_dot_product_attention(q, k, v)[0].shape == (2, 7, 0)


def test_fixed_shift_float16_is_computed_in_float32():
    """float16 cannot hold the sums: |k|^2 = 160000 overflows to inf (a zero query's shift: 0 * inf = NaN),
    and float16's sqrt(tiny) = 2**-7 is no guard against underflow. Computed in float32 and cast back, every
    output is the float64 reference rounded to float16 (relative error 2**-11), up to float32's rounding."""
    rng = np.random.default_rng(6)
    zero_q, big_k = np.zeros((1, 4, 16), np.float16), np.full((1, 8, 16), 100, np.float16)
    v = rng.standard_normal((1, 8, 16)).astype(np.float16)
    equal_weights = np.broadcast_to(v.mean(axis=1, keepdims=True), (1, 4, 16))  # equal scores: the mean value
    np.testing.assert_array_equal(mnp.fixed_shift_attention(zero_q, big_k, v), equal_weights)
    q = (2 * rng.standard_normal((2, 32, 64))).astype(np.float16)
    k, v = (rng.standard_normal((2, 8192, 64)).astype(np.float16) for _ in range(2))
    reference = mnp.scaled_dot_product_attention(*(a.astype(np.float64) for a in (q, k, v)))[0]
    out = mnp.fixed_shift_attention(q, k, v)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out, reference, rtol=2**-11, atol=1e-6)


def blas_threads() -> list[int]:
    """OpenBLAS's thread count, one entry per BLAS library loaded."""
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_overlapping_calls_give_openblas_its_thread_count_back():
    """Call A's tile starts call B and waits (up to 1 s) for B's tiles to run. Without the lock, B would save
    A's limit of 1 as its "before", A would restore the real count, and B would then restore 1."""
    with threadpool_limits(2, user_api="blas"):  # a count the pool must change, even on one core
        before = blas_threads()
        assert before and 1 not in before
        overlap_two_calls()
        assert blas_threads() == before


def overlap_two_calls():
    b_running, a_done = threading.Event(), threading.Event()
    real_tile = mnp._attend_with_shift
    qa, qb = (np.ones((1, 4, d), np.float32) for d in (4, 8))  # A's tiles get 5 columns, B's get 9
    call_b = threading.Thread(target=lambda: mnp.fixed_shift_attention(qb, qb, qb, workers=1))

    def tile(q1, *args):
        if q1.shape[-1] == 5 and not call_b.is_alive() and not a_done.is_set():
            call_b.start()
            b_running.wait(timeout=1)  # with the lock, B waits for A: this times out
        elif q1.shape[-1] == 9:
            b_running.set()
            a_done.wait(timeout=1)
        return real_tile(q1, *args)

    with mock.patch.object(mnp, "_attend_with_shift", tile):
        mnp.fixed_shift_attention(qa, qa, qa, workers=1)
        a_done.set()
        call_b.join()
    assert b_running.is_set()  # B ran


@pytest.mark.parametrize("attention", [mnp.threaded_attention, mnp.fixed_shift_attention])
def test_each_worker_runs_its_products_on_one_blas_thread(attention):
    """Inside the pool, OpenBLAS runs one thread per call (no contention with the other workers).

    After the call, OpenBLAS has its own count back.
    """
    seen = []

    def counting_tile(*args):
        seen.append(blas_threads())
        return real_tile(*args)

    name = "_attend_query_tile" if attention is mnp.threaded_attention else "_attend_with_shift"
    real_tile = getattr(mnp, name)
    q = np.random.default_rng(0).standard_normal((2, 3, 8, 4)).astype(np.float32)
    with threadpool_limits(2, user_api="blas"), mock.patch.object(mnp, name, counting_tile):
        before = blas_threads()  # 2, even on one core: the pool must change it
        attention(q, q, q, block_size=4, workers=2)
        after = blas_threads()
    assert 1 not in before and after == before
    assert len(seen) == 2 * 3 * 2  # one call per tile: 6 heads x 2 tiles of 4 queries
    assert all(threads == [1] * len(before) for threads in seen) and before
