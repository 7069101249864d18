"""The encoder block (chapter 8): PyTorch against Keras, against nn.TransformerEncoderLayer, dropout, bad input."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import torch

import mha.keras
import mha.numpy as mnp
import mha.torch

ATOL = 1e-5
B, T, E, H, F = 3, 7, 16, 4, 32
BACKENDS = {"numpy": mnp, "torch": mha.torch, "keras": mha.keras}


def x_input(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, T, E)).astype(np.float32)


def random_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Block parameters with LayerNorm scales and shifts away from 1 and 0, so a swapped pair would show."""
    torch.manual_seed(seed)
    d = mha.torch.EncoderBlock(E, H, F).to_numpy_dict()
    rng = np.random.default_rng(seed)
    for name in ("ln1_gamma", "ln1_beta", "ln2_gamma", "ln2_beta"):
        d[name] = (d[name] + rng.uniform(-0.5, 0.5, E)).astype(np.float32)
    return d


def make_mask(kind: str):
    """Our convention (True = may attend); no query row is fully masked."""
    padding = mnp.padding_mask([T, 4, 2], T)  # (B, 1, 1, T)
    causal = mnp.causal_mask(T)  # (T, T)
    return {"none": None, "padding": padding, "causal": causal, "combined": padding & causal}[kind]


def run_torch(block, x, mask=None):
    with torch.no_grad():
        out, weights = block(torch.from_numpy(x), None if mask is None else torch.from_numpy(mask))
    return out.numpy(), weights.numpy()


def run_keras(block, x, mask=None, training=False):
    out, weights = block(x, mask=mask, training=training)
    return keras.ops.convert_to_numpy(out), keras.ops.convert_to_numpy(weights)


def builtin_layer(d: dict, norm_first: bool) -> torch.nn.TransformerEncoderLayer:
    """nn.TransformerEncoderLayer carrying the same numbers: stacked, transposed (out, in) weights."""
    layer = torch.nn.TransformerEncoderLayer(
        E, H, F, dropout=0.0, activation="relu", batch_first=True, norm_first=norm_first
    )
    state = {
        "self_attn.in_proj_weight": np.concatenate([d["w_q"].T, d["w_k"].T, d["w_v"].T]),  # (3E, E)
        "self_attn.in_proj_bias": np.concatenate([d["b_q"], d["b_k"], d["b_v"]]),  # (3E,)
        "self_attn.out_proj.weight": d["w_o"].T,
        "self_attn.out_proj.bias": d["b_o"],
        "linear1.weight": d["w_1"].T,
        "linear1.bias": d["b_1"],
        "linear2.weight": d["w_2"].T,
        "linear2.bias": d["b_2"],
        "norm1.weight": d["ln1_gamma"],
        "norm1.bias": d["ln1_beta"],
        "norm2.weight": d["ln2_gamma"],
        "norm2.bias": d["ln2_beta"],
    }
    layer.load_state_dict({k: torch.tensor(np.ascontiguousarray(v)) for k, v in state.items()})
    return layer.eval()


@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal", "combined"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_torch_and_keras_agree(norm_first, mask_kind):
    d, x, mask = random_dict(1), x_input(1), make_mask(mask_kind)
    out_t, w_t = run_torch(mha.torch.EncoderBlock.from_numpy_dict(d, H, norm_first=norm_first).eval(), x, mask)
    out_k, w_k = run_keras(mha.keras.EncoderBlock.from_numpy_dict(d, H, norm_first=norm_first), x, mask)
    assert out_t.shape == out_k.shape == (B, T, E) and w_t.shape == w_k.shape == (B, H, T, T)
    np.testing.assert_allclose(out_k, out_t, atol=ATOL, rtol=0)
    np.testing.assert_allclose(w_k, w_t, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal", "combined"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_numpy_reference_matches_torch(norm_first, mask_kind):
    d, x, mask = random_dict(6), x_input(6), make_mask(mask_kind)
    out_n, w_n = mnp.EncoderBlock.from_numpy_dict(d, H, norm_first=norm_first)(x, mask=mask)
    out_t, w_t = run_torch(mha.torch.EncoderBlock.from_numpy_dict(d, H, norm_first=norm_first).eval(), x, mask)
    assert out_n.dtype == np.float32 and out_n.shape == (B, T, E)
    np.testing.assert_allclose(out_n, out_t, atol=ATOL, rtol=0)
    np.testing.assert_allclose(w_n, w_t, atol=ATOL, rtol=0)


def test_numpy_layer_norm_by_hand():
    x = np.array([[[1.0, 3.0]]], np.float32)  # mean 2, biased variance 1
    out = mnp.layer_norm(x, np.array([2.0, 2.0], np.float32), np.array([0.5, 0.5], np.float32), eps=0.0)
    np.testing.assert_allclose(out, [[[-1.5, 2.5]]])  # 2 * (-1, 1) + 0.5
    assert out.dtype == np.float32


def test_post_ln_and_pre_ln_differ():
    d, x = random_dict(2), x_input(2)
    post, _ = run_torch(mha.torch.EncoderBlock.from_numpy_dict(d, H).eval(), x)
    pre, _ = run_torch(mha.torch.EncoderBlock.from_numpy_dict(d, H, norm_first=True).eval(), x)
    assert np.abs(post - pre).max() > 0.1


@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal", "combined"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_torch_matches_transformer_encoder_layer(norm_first, mask_kind):
    d, x, mask = random_dict(3), x_input(3), make_mask(mask_kind)
    ours, _ = run_torch(mha.torch.EncoderBlock.from_numpy_dict(d, H, norm_first=norm_first).eval(), x, mask)
    # nn.TransformerEncoderLayer's boolean masks mean True = blocked: the inverse of ours, as (B * H, T, T).
    src_mask = None if mask is None else mha.torch.to_builtin_mask(torch.from_numpy(mask), B, H, T, T)
    with torch.no_grad():
        theirs = builtin_layer(d, norm_first)(torch.from_numpy(x), src_mask=src_mask).numpy()
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)


def test_torch_padding_mask_as_key_padding_mask():
    d, x = random_dict(4), x_input(4)
    mask = make_mask("padding")  # (B, 1, 1, T)
    ours, _ = run_torch(mha.torch.EncoderBlock.from_numpy_dict(d, H).eval(), x, mask)
    with torch.no_grad():
        theirs = builtin_layer(d, False)(torch.from_numpy(x), src_key_padding_mask=torch.from_numpy(~mask[:, 0, 0])).numpy()
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_numpy_dict_round_trip(backend):
    d = random_dict(5)
    block = BACKENDS[backend].EncoderBlock.from_numpy_dict(d, H)
    back = block.to_numpy_dict()
    assert sorted(back) == sorted(d)
    for name, value in back.items():
        assert value.dtype == np.float32, name
        np.testing.assert_array_equal(value, d[name], err_msg=name)


def test_both_backends_use_the_same_keys_and_shapes():
    torch_dict = mha.torch.EncoderBlock(E, H, F).to_numpy_dict()
    keras_dict = mha.keras.EncoderBlock(E, H, F).to_numpy_dict()
    numpy_dict = mnp.EncoderBlock(E, H, F).to_numpy_dict()
    shapes = lambda d: {k: v.shape for k, v in d.items()}
    assert shapes(torch_dict) == shapes(keras_dict) == shapes(numpy_dict)
    assert torch_dict["w_1"].shape == (E, F) and torch_dict["w_2"].shape == (F, E)


def test_keras_layer_norm_uses_eps():
    block = mha.keras.EncoderBlock(E, H, F)
    assert block.norm1.epsilon == block.norm2.epsilon == 1e-5  # not Keras's default 1e-3
    assert mha.keras.EncoderBlock(E, H, F, eps=1e-6).norm1.epsilon == 1e-6


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_torch_dropout_on_in_training_off_in_eval(norm_first):
    d, x = random_dict(6), torch.from_numpy(x_input(6))
    block = mha.torch.EncoderBlock.from_numpy_dict(d, H, dropout=0.3, norm_first=norm_first)
    plain = mha.torch.EncoderBlock.from_numpy_dict(d, H, norm_first=norm_first)
    torch.manual_seed(0)
    with torch.no_grad():
        first, second = block.train()(x)[0], block(x)[0]
        assert (first - second).abs().max() > 1e-3  # two draws of the dropout mask
        expected = plain(x)[0]
        np.testing.assert_allclose(block.eval()(x)[0], expected, atol=ATOL, rtol=0)
        np.testing.assert_allclose(block(x)[0], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_keras_dropout_follows_training(norm_first):
    keras.utils.set_random_seed(0)
    d, x = random_dict(7), x_input(7)
    block = mha.keras.EncoderBlock.from_numpy_dict(d, H, dropout=0.3, norm_first=norm_first)
    expected, _ = run_keras(mha.keras.EncoderBlock.from_numpy_dict(d, H, norm_first=norm_first), x)
    first, _ = run_keras(block, x, training=True)
    second, _ = run_keras(block, x, training=True)
    assert np.abs(first - second).max() > 1e-3
    for training in (False, None):  # called outside fit(), Keras's default is inference
        np.testing.assert_allclose(run_keras(block, x, training=training)[0], expected, atol=ATOL, rtol=0)


def test_keras_call_with_mask_warns_nothing():
    block = mha.keras.EncoderBlock.from_numpy_dict(random_dict(8), H)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = block(x_input(8), mask=make_mask("combined"))
        inp = keras.Input((T, E))
        keras.Model(inp, block(inp, mask=np.ones((1, 1, T, T), bool))[0])  # and while Keras traces
    assert not caught, [str(w.message) for w in caught]
    assert getattr(out, "_keras_mask", None) is None


BAD_ARGUMENTS = [
    # (id, kwargs, exception, fragments the message must contain)
    ("d_model not divisible", dict(d_model=10, num_heads=3), ValueError, ["d_model=10", "num_heads=3"]),
    ("d_model zero", dict(d_model=0), ValueError, ["d_model", "0"]),
    ("num_heads a float", dict(num_heads=2.0), TypeError, ["num_heads", "float"]),
    ("d_ff negative", dict(d_ff=-1), ValueError, ["d_ff", "-1"]),
    ("d_ff a string", dict(d_ff="32"), TypeError, ["d_ff", "str"]),
    ("dropout one", dict(dropout=1.0), ValueError, ["dropout", "[0, 1)", "1.0"]),
    ("dropout negative", dict(dropout=-0.1), ValueError, ["dropout", "-0.1"]),
    ("dropout a string", dict(dropout="0.1"), TypeError, ["dropout", "str"]),
    ("dropout a bool", dict(dropout=True), TypeError, ["dropout", "bool"]),
    ("norm_first not a bool", dict(norm_first="yes"), TypeError, ["norm_first", "str"]),
    ("eps zero", dict(eps=0.0), ValueError, ["eps", "positive"]),
]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("kwargs,error,fragments", [row[1:] for row in BAD_ARGUMENTS], ids=[r[0] for r in BAD_ARGUMENTS])
def test_bad_arguments(backend, kwargs, error, fragments):
    args = {"d_model": E, "num_heads": H, "d_ff": F, **kwargs}
    with pytest.raises(error) as info:
        BACKENDS[backend].EncoderBlock(**args)
    assert type(info.value) is error
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def _without(name):
    d = random_dict(9)
    del d[name]
    return d


BAD_DICTS = [
    # (id, a function making the dict, num_heads, exception, fragments the message must contain)
    ("not a dict", lambda: list(random_dict(9).values()), H, TypeError, ["dict", "list"]),
    ("missing w_1", lambda: _without("w_1"), H, ValueError, ["w_1", "(E, d_ff)"]),
    ("missing ln2_beta", lambda: _without("ln2_beta"), H, ValueError, ["missing", "ln2_beta"]),
    ("extra key", lambda: {**random_dict(9), "w_3": np.zeros(3)}, H, ValueError, ["unexpected", "w_3"]),
    ("w_2 transposed", lambda: {**random_dict(9), "w_2": random_dict(9)["w_2"].T}, H, ValueError, ["w_2", f"({F}, {E})", f"({E}, {F})"]),
    ("heads do not divide E", lambda: random_dict(9), 3, ValueError, ["d_model=16", "num_heads=3"]),
]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("make,num_heads,error,fragments", [row[1:] for row in BAD_DICTS], ids=[r[0] for r in BAD_DICTS])
def test_bad_numpy_dicts(backend, make, num_heads, error, fragments):
    with pytest.raises(error) as info:
        BACKENDS[backend].EncoderBlock.from_numpy_dict(make(), num_heads)
    assert type(info.value) is error
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_bad_inputs(backend):
    module = BACKENDS[backend]
    block = module.EncoderBlock(E, H, F)
    tensor = {"numpy": np.asarray, "torch": torch.from_numpy, "keras": keras.ops.convert_to_tensor}[backend]
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, E\) with E = d_model = 16, got \(3, 7, 8\)"):
        block(tensor(np.zeros((B, T, 8), np.float32)))
    with pytest.raises(ValueError, match=r"got \(7, 16\)"):
        block(tensor(np.zeros((T, E), np.float32)))
    with pytest.raises(TypeError, match="x must be a float tensor, got dtype int32"):
        block(tensor(np.zeros((B, T, E), np.int32)))
    with pytest.raises(ValueError, match=r"mask of shape \(7, 6\) does not broadcast"):
        block(tensor(x_input()), mask=tensor(np.ones((T, 6), bool)))


# Keras's implicit mask: the block, fed Embedding(mask_zero=True) output and no mask, honours the
# sequence mask as a block built from keras.layers.MultiHeadAttention does.

def keras_builtin_block(d: dict, x, norm_first: bool, scores: bool):
    """The block from Keras's own layers (MultiHeadAttention, LayerNormalization) and the same numbers.

    `scores=True` takes keras.layers.MultiHeadAttention's weights path (return_attention_scores),
    False its fused path.
    """
    w = mha.Weights(H, *(d[f"w_{n}"] for n in "qkvo"), *(d[f"b_{n}"] for n in "qkvo"))
    attn = mha.keras.to_builtin(w)
    norms = []
    for i in (1, 2):
        ln = keras.layers.LayerNormalization(epsilon=1e-5)
        ln.build((None, None, E))
        ln.gamma.assign(d[f"ln{i}_gamma"])
        ln.beta.assign(d[f"ln{i}_beta"])
        norms.append(ln)
    ops = keras.ops
    ffn = lambda y: ops.matmul(ops.relu(ops.matmul(y, d["w_1"]) + d["b_1"]), d["w_2"]) + d["b_2"]
    mhsa = lambda y: attn(y, y, return_attention_scores=True)[0] if scores else attn(y, y)
    if norm_first:
        x = x + mhsa(norms[0](x))  # LayerNormalization passes the sequence mask on to its output
        x = x + ffn(norms[1](x))
    else:
        x = norms[0](x + mhsa(x))
        x = norms[1](x + ffn(x))
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
@pytest.mark.parametrize("ids", [
    np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0]]),  # B = 2, T = 5
    np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0], [1, 1, 1, 1, 1], [2, 0, 0, 0, 0], [3, 3, 3, 3, 0]]),  # B = T = 5
], ids=["B!=T", "B=T"])
def test_keras_block_honours_the_implicit_sequence_mask(norm_first, ids):
    d = random_dict(9)
    table = np.random.default_rng(9).standard_normal((10, E)).astype(np.float32)
    embed = lambda: keras.layers.Embedding(  # a fresh masked tensor: Keras's layer deletes its inputs' masks
        10, E, mask_zero=True, embeddings_initializer=keras.initializers.Constant(table))(ids)
    out, weights = run_keras(mha.keras.EncoderBlock.from_numpy_dict(d, H, norm_first=norm_first), embed())
    real = ids != 0
    mask = real[:, None, None, :] & real[:, None, :, None]  # (B, 1, T, T): query and key both real
    ref, ref_weights = mnp.EncoderBlock.from_numpy_dict(d, H, norm_first=norm_first)(table[ids], mask=mask)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(weights, ref_weights, atol=ATOL, rtol=0)
    # Keras's weights path zeroes the padded query rows' weights as we do: every row agrees.
    np.testing.assert_allclose(out, keras_builtin_block(d, embed(), norm_first, scores=True), atol=ATOL, rtol=0)
    # Its fused path agrees on the real rows only (uniform weights on the padded ones).
    fused = keras_builtin_block(d, embed(), norm_first, scores=False)
    np.testing.assert_allclose(out[real], fused[real], atol=ATOL, rtol=0)
    assert np.abs(out[~real] - fused[~real]).max() > 1e-2
