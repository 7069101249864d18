"""The decoder block (chapter 11): all three backends against nn.TransformerDecoderLayer, dropout, bad input."""

from __future__ import annotations

import re
from unittest import mock

import keras
import numpy as np
import pytest
import torch

import mha.keras
import mha.numpy as mnp
import mha.torch

ATOL = 1e-5
B, E, H, F = 3, 16, 4, 32
BACKENDS = ("numpy", "torch", "keras")


def random_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Block parameters with LayerNorm scales and shifts away from 1 and 0, so a swapped pair would show."""
    torch.manual_seed(seed)
    d = mha.torch.DecoderBlock(E, H, F).to_numpy_dict()
    rng = np.random.default_rng(seed)
    for i in (1, 2, 3):
        for p in ("gamma", "beta"):
            d[f"ln{i}_{p}"] = (d[f"ln{i}_{p}"] + rng.uniform(-0.5, 0.5, E)).astype(np.float32)
    return d


def inputs(t: int, s: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, t, E)).astype(np.float32)
    memory = rng.standard_normal((B, s, E)).astype(np.float32)
    return x, memory


def masks(kind: str, t: int, s: int):
    """(mask, memory_mask) in our convention (True = may attend); no query row is fully masked."""
    causal = mnp.causal_mask(t)  # (T, T)
    target_keep = mnp.padding_mask([t, max(1, t - 2), 1], t)  # (B, 1, 1, T)
    memory_keep = mnp.padding_mask([s, max(1, s - 3), 2], s)  # (B, 1, 1, S)
    return {
        "none": (None, None),
        "causal": (causal, None),
        "padding": (target_keep, memory_keep),
        "causal+padding": (causal & target_keep, memory_keep),
    }[kind]


def builtin_kwargs(kind: str, t: int, s: int) -> dict:
    """The same masks for nn.TransformerDecoderLayer, written independently: its booleans mean True = blocked."""
    lengths_t, lengths_s = [t, max(1, t - 2), 1], [s, max(1, s - 3), 2]
    blocked_future = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)  # j > i
    target_pad = torch.arange(t)[None, :] >= torch.tensor(lengths_t)[:, None]  # (B, T)
    memory_pad = torch.arange(s)[None, :] >= torch.tensor(lengths_s)[:, None]  # (B, S)
    return {
        "none": {},
        "causal": {"tgt_mask": blocked_future},
        "padding": {"tgt_key_padding_mask": target_pad, "memory_key_padding_mask": memory_pad},
        "causal+padding": {"tgt_mask": blocked_future, "tgt_key_padding_mask": target_pad,
                           "memory_key_padding_mask": memory_pad},
    }[kind]


def run(backend: str, d: dict, norm_first: bool, x, memory, mask, memory_mask):
    """(out, self_weights, cross_weights) as NumPy arrays, in inference mode."""
    if backend == "numpy":
        return mnp.DecoderBlock.from_numpy_dict(d, H, norm_first=norm_first)(x, memory, mask, memory_mask)
    if backend == "torch":
        block = mha.torch.DecoderBlock.from_numpy_dict(d, H, norm_first=norm_first).eval()
        t = lambda a: None if a is None else torch.from_numpy(a)
        with torch.no_grad():
            return tuple(r.numpy() for r in block(t(x), t(memory), t(mask), t(memory_mask)))
    block = mha.keras.DecoderBlock.from_numpy_dict(d, H, norm_first=norm_first)
    return tuple(keras.ops.convert_to_numpy(r) for r in block(x, memory, mask, memory_mask, training=False))


def hand_built_state(d: dict) -> dict[str, torch.Tensor]:
    """nn.TransformerDecoderLayer's state dict for `d`, written out here, not by to_builtin_decoder."""
    state = {}
    for ours, theirs in (("self", "self_attn"), ("cross", "multihead_attn")):
        state[f"{theirs}.in_proj_weight"] = np.concatenate([d[f"{ours}_w_{n}"].T for n in "qkv"])  # (3E, E)
        state[f"{theirs}.in_proj_bias"] = np.concatenate([d[f"{ours}_b_{n}"] for n in "qkv"])  # (3E,)
        state[f"{theirs}.out_proj.weight"] = d[f"{ours}_w_o"].T
        state[f"{theirs}.out_proj.bias"] = d[f"{ours}_b_o"]
    for i in (1, 2, 3):
        state[f"norm{i}.weight"], state[f"norm{i}.bias"] = d[f"ln{i}_gamma"], d[f"ln{i}_beta"]
    state.update({"linear1.weight": d["w_1"].T, "linear1.bias": d["b_1"],
                  "linear2.weight": d["w_2"].T, "linear2.bias": d["b_2"]})
    return {k: torch.tensor(np.ascontiguousarray(v)) for k, v in state.items()}


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_to_builtin_decoder_carries_exactly_the_dict(norm_first):
    d = random_dict(2)
    layer = mha.torch.to_builtin_decoder(d, H, norm_first=norm_first, eps=1e-6)
    state = layer.state_dict()
    expected = hand_built_state(d)
    assert set(state) == set(expected)
    for name, value in expected.items():
        assert torch.equal(state[name], value), name
    assert not layer.training and layer.norm_first is norm_first and layer.norm1.eps == 1e-6
    assert layer.dropout.p == layer.dropout1.p == layer.self_attn.dropout == 0.0


@pytest.mark.parametrize("kind,t,s", [("none", 5, 7), ("causal", 5, 7), ("padding", 5, 7), ("causal+padding", 5, 7),
                                      ("causal+padding", 6, 3)], ids=["none", "causal", "padding", "both", "both-T>S"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_every_backend_matches_nn_transformer_decoder_layer(norm_first, kind, t, s):
    """Ours against the built-in layer, in its inference path (its fast path) and its training path."""
    d, (x, memory), (mask, memory_mask) = random_dict(1), inputs(t, s, 1), masks(kind, t, s)
    layer = torch.nn.TransformerDecoderLayer(E, H, F, dropout=0.0, batch_first=True, norm_first=norm_first)
    layer.load_state_dict(hand_built_state(d))
    kwargs = builtin_kwargs(kind, t, s)
    tx, tm = torch.from_numpy(x), torch.from_numpy(memory)
    native = mock.patch("torch._native_multi_head_attention", wraps=torch._native_multi_head_attention)
    with torch.no_grad(), native as fast_path:
        inference = layer.eval()(tx, tm, **kwargs).numpy()
    assert fast_path.call_count == 1  # its self-attention took the fused kernel
    with native as fast_path:
        training = layer.train()(tx, tm, **kwargs)
    assert training.requires_grad and fast_path.call_count == 0
    training = training.detach().numpy()
    np.testing.assert_allclose(inference, training, atol=ATOL)
    for backend in BACKENDS:
        out, self_w, cross_w = run(backend, d, norm_first, x, memory, mask, memory_mask)
        assert out.dtype == self_w.dtype == cross_w.dtype == np.float32
        assert self_w.shape == (B, H, t, t) and cross_w.shape == (B, H, t, s)
        np.testing.assert_allclose(out, inference, atol=ATOL, err_msg=backend)
        np.testing.assert_allclose(out, training, atol=ATOL, err_msg=backend)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_to_builtin_decoder_matches_our_torch_block(norm_first):
    d, (x, memory), (mask, memory_mask) = random_dict(3), inputs(4, 9, 3), masks("causal+padding", 4, 9)
    ours = run("torch", d, norm_first, x, memory, mask, memory_mask)[0]
    with torch.no_grad():
        theirs = mha.torch.to_builtin_decoder(d, H, norm_first=norm_first)(
            torch.from_numpy(x), torch.from_numpy(memory), **builtin_kwargs("causal+padding", 4, 9)
        ).numpy()
    np.testing.assert_allclose(ours, theirs, atol=ATOL)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_attention_weights_agree_and_follow_the_masks(norm_first):
    t, s = 5, 7
    d, (x, memory), (mask, memory_mask) = random_dict(4), inputs(t, s, 4), masks("causal+padding", t, s)
    results = {b: run(b, d, norm_first, x, memory, mask, memory_mask) for b in BACKENDS}
    for backend in ("torch", "keras"):
        for ours, ref in zip(results[backend], results["numpy"]):
            np.testing.assert_allclose(ours, ref, atol=ATOL, err_msg=backend)
    _, self_w, cross_w = results["numpy"]
    np.testing.assert_allclose(self_w.sum(-1), 1, atol=ATOL)
    np.testing.assert_allclose(cross_w.sum(-1), 1, atol=ATOL)
    assert np.all(self_w[..., ~mnp.causal_mask(t)] == 0)  # nothing from the future
    assert np.all(cross_w[1, ..., s - 3:] == 0) and np.all(cross_w[2, ..., 2:] == 0)  # nor padded memory


def test_the_decoder_reads_memory_only_through_cross_attention():
    """Changing the memory changes the output; the self-attention weights do not depend on it."""
    d, (x, memory) = random_dict(5), inputs(4, 6, 5)
    block = mnp.DecoderBlock.from_numpy_dict(d, H)
    out, self_w, _ = block(x, memory, mnp.causal_mask(4))
    out2, self_w2, _ = block(x, memory[:, ::-1] + 1, mnp.causal_mask(4))
    assert np.abs(out - out2).max() > 1e-2
    np.testing.assert_array_equal(self_w, self_w2)


def test_dict_round_trips_and_defaults():
    d = random_dict(6)
    for module in (mnp, mha.torch, mha.keras):
        back = module.DecoderBlock.from_numpy_dict(d, H).to_numpy_dict()
        assert set(back) == set(d)
        for name in d:
            np.testing.assert_array_equal(back[name], d[name], err_msg=f"{module.__name__} {name}")
    block = mnp.DecoderBlock(E, H, F, seed=3)
    assert not block.norm_first and block.eps == 1e-5 and block.d_ff == F
    assert all(v.dtype == np.float32 for v in block.to_numpy_dict().values())


def test_dropout_is_on_in_training_mode_only():
    d, (x, memory) = random_dict(7), inputs(4, 6, 7)
    tx, tm = torch.from_numpy(x), torch.from_numpy(memory)
    block = mha.torch.DecoderBlock.from_numpy_dict(d, H, dropout=0.5)
    plain = mha.torch.DecoderBlock.from_numpy_dict(d, H)
    with torch.no_grad():
        torch.manual_seed(0)
        assert (block.train()(tx, tm)[0] - plain(tx, tm)[0]).abs().max() > 1e-2
        torch.testing.assert_close(block.eval()(tx, tm)[0], plain.eval()(tx, tm)[0], atol=ATOL, rtol=0)
    k_block = mha.keras.DecoderBlock.from_numpy_dict(d, H, dropout=0.5)
    k_plain = keras.ops.convert_to_numpy(mha.keras.DecoderBlock.from_numpy_dict(d, H)(x, memory)[0])
    assert np.abs(keras.ops.convert_to_numpy(k_block(x, memory, training=True)[0]) - k_plain).max() > 1e-2
    np.testing.assert_allclose(keras.ops.convert_to_numpy(k_block(x, memory, training=False)[0]), k_plain,
                               atol=ATOL)


def _error(call):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return type(info.value), str(info.value)


BAD_CALLS = {
    "x of the wrong width": lambda x, m: (x[..., :-1], m),
    "memory of the wrong width": lambda x, m: (x, m[..., :-1]),
    "x of rank 2": lambda x, m: (x[0], m),
    "batch sizes differ": lambda x, m: (x, m[:2]),
    "integer x": lambda x, m: (x.astype(np.int32), m),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_gets_one_clear_error_in_every_backend(case):
    d, (x, memory) = random_dict(8), inputs(4, 6, 8)
    bx, bm = BAD_CALLS[case](x, memory)
    blocks = {
        "numpy": (mnp.DecoderBlock.from_numpy_dict(d, H), lambda a: a),
        "torch": (mha.torch.DecoderBlock.from_numpy_dict(d, H), torch.from_numpy),
        "keras": (mha.keras.DecoderBlock.from_numpy_dict(d, H), keras.ops.convert_to_tensor),
    }
    errors = {name: _error(lambda: block(t(bx), t(bm))) for name, (block, t) in blocks.items()}
    kind, message = errors["numpy"]
    for name, (other_kind, other_message) in errors.items():  # Keras adds the call's arguments after ours
        assert other_kind is kind and message in other_message, (name, other_message)
    assert message.startswith("DecoderBlock:") and str(tuple(bx.shape if "x" in case else bm.shape)) in message


@pytest.mark.parametrize("args,kind", [
    ((16, 3, 32), ValueError), ((16, 4, 0), ValueError), ((16, 4, 32, 1.0), ValueError),
    ((16, 4, 32, 0.1, "yes"), TypeError), ((16, 4, 32, 0.1, False, 0.0), ValueError),
])
def test_bad_constructor_arguments(args, kind):
    errors = {m.__name__: _error(lambda: m.DecoderBlock(*args)) for m in (mnp, mha.torch, mha.keras)}
    assert len(set(errors.values())) == 1, errors
    assert errors["mha.numpy"][0] is kind


def test_bad_dicts():
    d = random_dict(9)
    missing = {k: v for k, v in d.items() if k != "ln3_beta"}
    wrong = {**d, "cross_w_k": d["cross_w_k"][:, :-1]}
    for bad, words in ((missing, "missing keys ['ln3_beta']"), (wrong, "cross_w_k must have shape (16, 16)")):
        for call in (lambda: mnp.DecoderBlock.from_numpy_dict(bad, H),
                     lambda: mha.torch.DecoderBlock.from_numpy_dict(bad, H),
                     lambda: mha.keras.DecoderBlock.from_numpy_dict(bad, H),
                     lambda: mha.torch.to_builtin_decoder(bad, H)):
            with pytest.raises(ValueError, match=re.escape(words)):
                call()
