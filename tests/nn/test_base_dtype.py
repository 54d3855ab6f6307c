"""A frozen base stored in 16 bits (``cast_frozen``, ``WidenedLinear``, a 16-bit ``Embedding``;
issue 19): the float32 model with its frozen weights rounded once, bit for bit, in half the bytes;
never a 16-bit weight that trains."""

import ml_dtypes
import numpy as np
import pytest

import minift.autograd.functional as F
from minift.autograd import Tensor
from minift.models import BLOCK_PROJECTIONS, LlamaConfig, LlamaForCausalLM
from minift.nn import Embedding, Linear, cast_frozen, freeze
from minift.peft import LoraConfig, get_peft_model
from minift.studies.memory import BASE_16BIT, Precision, weight_bytes
from minift.training.methods import MethodOptions, prepare_model

SMALL = dict(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
IDS = np.random.default_rng(0).integers(0, 40, (2, 9))
NARROW = {"bf16": ml_dtypes.bfloat16, "f16": np.float16}


def rounded(array, dtype: str):
    """The reference: ``array`` rounded to 16 bits and widened back, by ml_dtypes/NumPy directly."""
    return array.astype(NARROW[dtype]).astype(np.float32)


def linear_pair(dtype: str, bias: bool):
    """(a frozen Linear stored in ``dtype``, a float32 Linear holding the rounded weight), same bias."""
    rng = np.random.default_rng(3)
    narrow, reference = Linear(48, 24, bias=bias, rng=rng), Linear(48, 24, bias=bias)
    if bias:
        narrow.bias.data = rng.normal(0, 0.1, 24).astype(np.float32)
        reference.bias.data = narrow.bias.data.copy()
    reference.weight.data = rounded(narrow.weight.data, dtype)
    freeze(narrow, "weight")
    freeze(reference, "weight")
    assert cast_frozen(narrow, dtype) == ["weight"]
    return narrow, reference


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_input_gradient_equal_float32_on_the_rounded_weight(dtype, bias):
    narrow, reference = linear_pair(dtype, bias)
    assert narrow.weight.dtype == NARROW[dtype]
    x = np.random.default_rng(1).standard_normal((3, 5, 48)).astype(np.float32)
    g = np.random.default_rng(2).standard_normal((3, 5, 24)).astype(np.float32)
    x_narrow, x_reference = Tensor(x, requires_grad=True), Tensor(x, requires_grad=True)
    y_narrow, y_reference = narrow(x_narrow), reference(x_reference)
    assert y_narrow.dtype == np.float32
    np.testing.assert_array_equal(y_narrow.data, y_reference.data)
    y_narrow.backward(g)
    y_reference.backward(g)
    assert x_narrow.grad.dtype == np.float32 and narrow.weight.grad is None
    np.testing.assert_array_equal(x_narrow.grad, x_reference.grad)
    if bias:
        np.testing.assert_array_equal(narrow.bias.grad, reference.bias.grad)


def lora_model(seed: int = 0, tied: bool = True):
    """A small Llama with LoRA on every projection and a nonzero B, so both A and B get gradients."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(BLOCK_PROJECTIONS))
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**SMALL, tie_embeddings=tied), seed=seed), config)
    rng = np.random.default_rng(seed + 1)
    for name, param in model.named_parameters(trainable_only=True):
        if "lora_B" in name:
            param.data = rng.normal(0, 0.1, param.shape).astype(np.float32)
    return model


def rounded_pair(dtype: str, tied: bool = True):
    """(a LoRA model whose frozen base ``cast_frozen`` stored in ``dtype``, the same model in float32
    with those weights rounded to ``dtype``)."""
    narrow, reference = lora_model(tied=tied), lora_model(tied=tied)
    cast = cast_frozen(narrow, dtype)
    for name, param in reference.named_parameters():
        if name in cast:
            param.data = rounded(param.data, dtype)
    return narrow, reference


def loss_of(model):
    logits = model(IDS[:, :-1])
    return F.cross_entropy(logits.reshape(-1, SMALL["vocab_size"]), IDS[:, 1:].reshape(-1))


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("tied", [True, False])
def test_lora_gradients_through_a_16_bit_base_equal_float32_on_the_rounded_base(dtype, tied):
    """Tolerance: none. Widening is exact and both runs multiply the same float32 arrays with the
    same products, so the loss and every LoRA gradient agree bit for bit. The embedding is stored in
    16 bits too, and with it the head: the same matrix when tied, a frozen ``Linear`` when not."""
    narrow, reference = lora_model(tied=tied), lora_model(tied=tied)
    cast = cast_frozen(narrow, dtype)
    heads = [] if tied else ["base_model.model.lm_head.weight"]
    assert [name for name in cast if ".layers." not in name] == ["base_model.model.model.embed_tokens.weight", *heads]
    assert len(cast) == SMALL["n_layers"] * len(BLOCK_PROJECTIONS) + 1 + len(heads)
    base = narrow.model  # the LlamaForCausalLM under the adapters
    assert base.model.embed_tokens.weight.dtype == NARROW[dtype] and narrow.dtype == np.float32
    assert tied or base.lm_head.weight.dtype == NARROW[dtype]
    for name, param in reference.named_parameters():
        if name in cast:
            param.data = rounded(param.data, dtype)
    loss_narrow, loss_reference = loss_of(narrow), loss_of(reference)
    assert loss_narrow.item() == loss_reference.item()
    loss_narrow.backward()
    loss_reference.backward()
    grads = dict(reference.named_parameters(trainable_only=True))
    for name, param in narrow.named_parameters(trainable_only=True):
        assert param.dtype == np.float32 and param.grad.dtype == np.float32
        np.testing.assert_array_equal(param.grad, grads[name].grad, err_msg=name)
    assert all(p.grad is None for p in narrow.parameters() if not p.requires_grad)


@pytest.mark.parametrize("tied", [True, False])
def test_the_trainers_fused_loss_reads_a_16_bit_head_exactly(tied):
    """``model.loss`` (the Trainer's: the head fused with the loss in vocabulary chunks) on the 16-bit
    head, tied or not, = the same on the float32 rounded one, loss and LoRA gradients bit for bit."""
    narrow, reference = rounded_pair("bf16", tied=tied)
    assert narrow.model.head_weight.dtype == NARROW["bf16"]
    losses = [model.loss(IDS[:, :-1], IDS[:, 1:]) for model in (narrow, reference)]
    assert losses[0].item() == losses[1].item()
    for loss in losses:
        loss.backward()
    grads = dict(reference.named_parameters(trainable_only=True))
    for name, param in narrow.named_parameters(trainable_only=True):
        np.testing.assert_array_equal(param.grad, grads[name].grad, err_msg=name)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_generation_on_a_16_bit_tied_base_equals_float32_on_the_rounded_base(dtype):
    """Greedy tokens with the KV cache: the cache is made in ``model.dtype``, float32, not the
    table's 16 bits, and every logit equals the rounded float32 model's."""
    narrow, reference = rounded_pair(dtype)
    prompt = IDS[:, :4]
    tokens = narrow.generate(prompt, 10)
    np.testing.assert_array_equal(tokens, reference.generate(prompt, 10))
    assert len(set(tokens.ravel().tolist())) > 1  # a real sequence, not one token repeated
    np.testing.assert_array_equal(narrow(IDS).data, reference(IDS).data)


def test_a_16_bit_embedding_gathers_rounded_rows_in_half_the_bytes():
    table, reference = Embedding(40, 16, rng=np.random.default_rng(5)), Embedding(40, 16)
    reference.weight.data = rounded(table.weight.data, "f16")
    float32_bytes = table.weight.data.nbytes
    freeze(table)
    table.weight.data = table.weight.data.astype(np.float16)
    assert table.weight.data.nbytes * 2 == float32_bytes and table.compute_dtype == np.float32
    rows = table(IDS)
    assert rows.dtype == np.float32 and rows.shape == (*IDS.shape, 16) and not rows.requires_grad
    np.testing.assert_array_equal(rows.data, reference(IDS).data)


def test_a_trainable_16_bit_embedding_or_tied_head_is_refused():
    table = Embedding(8, 4)
    table.weight.data = table.weight.data.astype(np.float16)
    with pytest.raises(TypeError, match=r"Embedding\(8, 4\): the weight is trainable.*only a frozen weight"):
        table(np.array([[1, 2]]))
    with pytest.raises(TypeError, match=r"Embedding\(8, 4\): the weight is trainable.*AdamW"):
        table.attend(Tensor(np.ones((1, 2, 4), np.float32)))


def test_the_frozen_weights_take_half_the_bytes_and_widen_back_exactly():
    model = lora_model()
    before = {name: p.data.copy() for name, p in model.named_parameters()}
    cast = cast_frozen(model, "bf16")
    params = dict(model.named_parameters())
    assert "base_model.model.model.embed_tokens.weight" in cast  # the tied embedding and head
    for name in cast:
        assert params[name].data.nbytes * 2 == before[name].nbytes
    assert cast_frozen(model, "float32") == cast
    for name, param in model.named_parameters():
        expected = rounded(before[name], "bf16") if name in cast else before[name]
        assert param.dtype == np.float32
        np.testing.assert_array_equal(param.data, expected, err_msg=name)


def test_a_trainable_16_bit_weight_is_refused():
    layer = Linear(8, 4)
    layer.weight.data = layer.weight.data.astype(np.float16)
    with pytest.raises(TypeError, match="only a frozen weight may be 16-bit.*AdamW"):
        layer(Tensor(np.ones((2, 8), np.float32)))


def test_nothing_frozen_or_an_unknown_type_is_refused():
    with pytest.raises(ValueError, match="no frozen Linear weight.*method full"):
        cast_frozen(LlamaForCausalLM(LlamaConfig(**SMALL)), "bf16")
    with pytest.raises(ValueError, match="unknown storage type 'int8'; choose one of float32, bf16, f16"):
        cast_frozen(lora_model(), "int8")
    assert cast_frozen(LlamaForCausalLM(LlamaConfig(**SMALL)), "float32") == []  # widening nothing is fine


@pytest.mark.parametrize("method", ["lora", "freeze", "last"])
def test_the_ledger_predicts_the_weight_bytes_of_a_16_bit_base(method):
    """``weight_bytes`` with a 16-bit base (``BASE_16BIT``: 2-byte frozen Linear weights and frozen
    embedding) = the arrays' nbytes after ``cast_frozen``, and with the Linear weights alone at 2
    bytes = a cast that skips the embedding and head; untied, so the head is a frozen Linear under
    lora and last (cast with the embedding) and trains under freeze."""
    config = LlamaConfig(**SMALL, tie_embeddings=False)
    options = MethodOptions(layers=1, lora_r=4)
    model, _ = prepare_model(LlamaForCausalLM(config), method, options)
    float32_bytes = sum(p.data.nbytes for p in model.parameters())
    cast_frozen(model, "f16", skip=("lm_head", "embed_tokens"))
    linear_only = sum(p.data.nbytes for p in model.parameters())
    cast_frozen(model, "f16")
    stored = sum(p.data.nbytes for p in model.parameters())
    frozen_matrices = 1 if method == "freeze" else 2  # the embedding, and the head unless it trains
    assert stored + frozen_matrices * SMALL["vocab_size"] * SMALL["dim"] * 2 == linear_only < float32_bytes
    assert weight_bytes(config, method, options)["weights fp32"] == float32_bytes
    assert weight_bytes(config, method, options, Precision(frozen_linear=2))["weights fp32"] == linear_only
    assert weight_bytes(config, method, options, BASE_16BIT)["weights fp32"] == stored
