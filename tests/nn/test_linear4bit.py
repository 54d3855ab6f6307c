"""Linear4bit (issue 10): the same forward and input gradient as a dense layer holding the
dequantized weight, no gradient and no float copy for the 4-bit weight, and quantize_model."""

import numpy as np
import pytest

import minift.autograd.functional as F
from minift.autograd import ShapeError, Tensor, op_counts
from minift.backend import to_numpy, xp
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.nn import Linear, Linear4bit, Parameter, dequantize_model, quantize_model
from minift.nn.linear4bit import NF4Linear
from minift.peft import LoraConfig, get_peft_model

SMALL = dict(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
IDS = np.random.default_rng(0).integers(0, 40, (2, 9))


def layer_pair(bias=True, seed=0, double_quant=True):
    """(Linear4bit, dense Linear holding exactly the dequantized weight and the same bias)."""
    rng = np.random.default_rng(seed)
    dense = Linear(128, 48, bias=bias, rng=rng)
    if bias:
        dense.bias.data = xp.asarray(rng.normal(0, 0.1, 48).astype(np.float32))
    q = Linear4bit.from_linear(dense, blocksize=64, double_quant=double_quant)
    dense.weight = Parameter(q.dequantized_weight())
    return q, dense


def inputs(seed=1, shape=(3, 5, 128)):
    return Tensor(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), requires_grad=True)


def test_forward_equals_the_dense_layer_on_the_dequantized_weight(backend):
    for bias in (False, True):
        q, dense = layer_pair(bias=bias)
        x = inputs()
        np.testing.assert_array_equal(to_numpy(q(x).data), to_numpy(dense(x).data))


def test_input_and_bias_gradients_equal_the_dense_layer_and_the_weight_gets_none(backend):
    q, dense = layer_pair()
    dense.weight.requires_grad_(False)
    g = np.random.default_rng(2).standard_normal((3, 5, 48)).astype(np.float32)
    x_q, x_d = inputs(), inputs()
    q(x_q).backward(g)
    dense(x_d).backward(g)
    np.testing.assert_array_equal(to_numpy(x_q.grad), to_numpy(x_d.grad))
    np.testing.assert_array_equal(to_numpy(q.bias.grad), to_numpy(dense.bias.grad))
    assert [name for name, _ in q.named_parameters()] == ["bias"]  # the 4-bit weight is no Parameter


def test_the_weight_is_dequantized_twice_and_no_dw_matmul_runs():
    q, dense = layer_pair(bias=False)
    g = np.ones((3, 5, 48), dtype=np.float32)
    op_counts.clear()
    q(inputs()).backward(g)
    assert op_counts["matmul"] == 2 and op_counts["nf4_dequantize"] == 2  # y = x W^T and dx = g W only
    op_counts.clear()
    dense(inputs()).backward(g)  # a trainable dense weight: dW costs a third product
    assert op_counts["matmul"] == 3


def test_with_a_frozen_input_only_the_forward_dequantizes():
    q, _ = layer_pair()
    op_counts.clear()
    y = q(Tensor(np.ones((2, 128), dtype=np.float32)))  # only the bias is trainable
    y.backward(np.ones((2, 48), dtype=np.float32))
    assert op_counts["nf4_dequantize"] == 1 and op_counts["matmul"] == 1
    np.testing.assert_array_equal(to_numpy(q.bias.grad), np.full(48, 2, np.float32))


def test_no_float_weight_is_kept_between_forward_and_backward():
    q, _ = layer_pair()
    y = q(inputs())
    ctx = y._node.ctx
    assert y._node.function is NF4Linear and ctx.saved == ()
    arrays = [v for v in vars(ctx).values() if isinstance(v, np.ndarray)]
    assert len(arrays) == 1 and arrays[0] is q.packed and arrays[0].dtype == np.uint8
    assert ctx.state is q.quant_state  # the 4-bit codes and their scales, referenced, not copied


def test_backward_leaves_the_codes_bitwise_unchanged():
    q, _ = layer_pair()
    before = (q.packed.copy(), q.quant_state.absmax.copy())
    q(inputs()).backward(np.ones((3, 5, 48), dtype=np.float32))
    np.testing.assert_array_equal(q.packed, before[0])
    np.testing.assert_array_equal(q.quant_state.absmax, before[1])


def test_shape_facts_and_a_mismatched_input():
    q, _ = layer_pair(double_quant=False)
    assert (q.in_features, q.out_features, q.weight_shape) == (128, 48, (48, 128))
    assert not q.double_quant and q.blocksize == 64 and "Linear4bit(in=128, out=48" in repr(q)
    with pytest.raises(ShapeError, match=r"linear4bit: input of shape \(2, 64\) does not fit a weight"):
        q(Tensor(np.ones((2, 64), dtype=np.float32)))


def test_requantize_stores_a_new_weight_and_refuses_a_wrong_shape():
    q, _ = layer_pair()
    w = np.random.default_rng(3).standard_normal((48, 128)).astype(np.float32)
    q.requantize(w)
    assert np.abs(to_numpy(q.dequantized_weight()) - w).max() < 0.2 * np.abs(w).max()
    with pytest.raises(ValueError, match="shape"):
        q.requantize(w.T)


# ---- whole models ----------------------------------------------------------------------------------
def test_quantize_model_replaces_every_block_linear_and_keeps_embedding_and_head():
    model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_embeddings=False))
    names = quantize_model(model)
    assert len(names) == 2 * 7 and all(".layers." in n for n in names)
    assert isinstance(model.lm_head, Linear) and model.model.embed_tokens.weight.dtype == np.float32
    assert not any(isinstance(m, Linear) for n, m in model.named_modules() if ".layers." in n)


def test_a_quantized_model_computes_what_its_dequantized_copy_computes(backend):
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    quantize_model(model, blocksize=32)
    quantized = to_numpy(model(IDS).data)
    dequantize_model(model)
    assert not any(isinstance(m, Linear4bit) for _, m in model.named_modules())
    np.testing.assert_array_equal(to_numpy(model(IDS).data), quantized)


def test_quantize_model_refuses_a_model_that_already_has_lora_adapters():
    peft = get_peft_model(LlamaForCausalLM(LlamaConfig(**SMALL)), LoraConfig(r=2))
    with pytest.raises(ValueError, match="quantize the base model first"):
        quantize_model(peft)


def test_quantized_weights_are_close_to_the_originals():
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    original = model.model.layers[0].mlp.up_proj.weight.data.copy()
    quantize_model(model)
    w = to_numpy(model.model.layers[0].mlp.up_proj.dequantized_weight())
    relative = np.linalg.norm(w - original) / np.linalg.norm(original)
    assert 0.05 < relative < 0.15  # 4 bits: about 10% of the weights' norm, measured


def test_a_loss_backpropagates_through_quantized_layers_to_the_embedding():
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    quantize_model(model)
    F.cross_entropy(model(IDS).reshape(-1, 40), IDS.reshape(-1)).backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert np.isfinite(to_numpy(model.model.embed_tokens.weight.grad)).all()


def test_a_quantized_model_still_counts_its_4bit_weights():
    """trainable % of QLoRA must be measured against the whole model, 4-bit weights included."""
    from minift.models import LlamaConfig, LlamaForCausalLM
    from minift.nn import quantize_model
    from minift.peft import LoraConfig, get_peft_model

    config = LlamaConfig(vocab_size=32, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    total = LlamaForCausalLM(config).num_parameters()
    quantized = LlamaForCausalLM(config)
    assert quantize_model(quantized)  # in place; returns the names of the layers it replaced
    assert quantized.num_parameters() == total
    qlora = get_peft_model(quantized, LoraConfig(r=4))
    assert qlora.num_parameters() == total + qlora.num_parameters(trainable_only=True)


def test_on_a_gpu_the_layer_dequantizes_with_the_cuda_kernel(monkeypatch):
    """With CuPy arrays Linear4bit calls kernels/nf4_dequant.cu. Pretend the codes live on a GPU:
    the kernel then runs on the CPU emulator, and the layer's output must not change a bit."""
    import numpy as np

    from minift.autograd import Tensor
    from minift.cuda import kernels
    from minift.nn import Linear, Linear4bit, linear4bit

    layer = Linear4bit.from_linear(Linear(128, 64, rng=np.random.default_rng(0)))
    x = Tensor(np.random.default_rng(1).normal(size=(3, 128)).astype(np.float32))
    reference = layer(x).data
    launched = []
    real = kernels.dequantize_nf4
    monkeypatch.setattr(linear4bit, "on_gpu", lambda a: True)
    monkeypatch.setattr(kernels, "dequantize_nf4", lambda *a, **k: launched.append(1) or real(*a, **k))
    np.testing.assert_array_equal(layer(x).data, reference)
    assert launched == [1]
