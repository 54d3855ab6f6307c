"""LoRA: exactness at init, merge/unmerge, several adapters, PEFT files, errors (issue 5)."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minift.autograd.functional as F
from minift.autograd import Tensor
from minift.backend import asarray, to_numpy
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.nn import Linear
from minift.optim import AdamW
from minift.peft import LoraConfig, LoraLinear, PeftModel, get_peft_model

SMALL = dict(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)
IDS = np.random.default_rng(0).integers(0, 40, (2, 10))


def base_model(seed=0):
    return LlamaForCausalLM(LlamaConfig(**SMALL), seed=seed)


def logits(model):
    return to_numpy(model(IDS).data)


def randomize_lora_B(peft_model, seed=1):
    rng = np.random.default_rng(seed)
    for name, p in peft_model.named_parameters():
        if ".lora_B." in name:
            p.data = asarray(rng.normal(0, 0.1, p.shape), dtype=p.dtype)


def train_a_few_steps(model, steps=3):
    opt = AdamW(model.parameters(trainable_only=True), lr=1e-2)
    for _ in range(steps):
        F.cross_entropy(model(IDS), IDS).backward()
        opt.step()
        opt.zero_grad()


def test_at_init_the_lora_model_equals_the_base_model_bitwise(backend):
    reference = logits(base_model())
    peft = get_peft_model(base_model(), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    np.testing.assert_array_equal(logits(peft), reference)


def test_only_lora_parameters_train_and_the_base_stays_bitwise_unchanged(backend):
    peft = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8))
    frozen_before = {n: to_numpy(p.data).copy() for n, p in peft.named_parameters() if not p.requires_grad}
    trainable = [n for n, _ in peft.named_parameters(trainable_only=True)]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    train_a_few_steps(peft)
    for n, p in peft.named_parameters():
        if n in frozen_before:
            assert p.grad is None, n
            np.testing.assert_array_equal(to_numpy(p.data), frozen_before[n], err_msg=n)


def test_parameter_count_per_adapted_matrix_is_r_times_d_plus_k():
    r = 4
    peft = get_peft_model(base_model(), LoraConfig(r=r, target_modules=["q_proj", "k_proj"]))
    c = LlamaConfig(**SMALL)
    per_layer = r * (c.dim + c.n_heads * c.head_dim) + r * (c.dim + c.n_kv_heads * c.head_dim)
    assert peft.num_parameters(trainable_only=True) == c.n_layers * per_layer


def test_merge_unmerge_and_disable(backend):
    peft = get_peft_model(base_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    base_logits = logits(base_model())
    w_before = to_numpy(peft.model.model.layers[0].self_attn.q_proj.weight.data).copy()
    train_a_few_steps(peft)
    randomize_lora_B(peft)
    adapted = logits(peft)
    assert np.abs(adapted - base_logits).max() > 1e-3
    peft.merge_adapter()
    np.testing.assert_allclose(logits(peft), adapted, rtol=1e-4, atol=1e-5)
    peft.unmerge_adapter()
    np.testing.assert_allclose(to_numpy(peft.model.model.layers[0].self_attn.q_proj.weight.data), w_before,
                               rtol=0, atol=1e-6)
    with peft.disable_adapter():
        np.testing.assert_allclose(logits(peft), base_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits(peft), adapted, rtol=1e-5, atol=1e-6)
    plain = peft.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for _, m in plain.named_modules())
    np.testing.assert_allclose(logits(plain), adapted, rtol=1e-4, atol=1e-5)


def test_several_named_adapters(backend):
    peft = get_peft_model(base_model(), LoraConfig(r=2, seed=1))
    randomize_lora_B(peft, seed=1)
    first = logits(peft)
    peft.add_adapter("other", LoraConfig(r=4, seed=2, target_modules=["o_proj"]))
    np.testing.assert_array_equal(logits(peft), first)  # adding does not activate
    peft.set_adapter("other")
    assert {n.split(".lora_")[1].split(".")[1] for n, _ in peft.named_parameters(trainable_only=True)} == {"other"}
    randomize_lora_B(peft, seed=3)
    assert np.abs(logits(peft) - first).max() > 1e-3
    with pytest.raises(KeyError, match="unknown adapter 'nope'"):
        peft.set_adapter("nope")
    peft.delete_adapter("other")
    assert peft.active_adapter == "default"
    assert not any(".other." in n for n, _ in peft.named_parameters())


def test_save_and_load_in_peft_format(tmp_path, backend):
    peft = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(peft)
    expected = logits(peft)
    peft.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    from minift.io import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * SMALL["n_layers"]
    loaded = PeftModel.from_pretrained(base_model(), tmp_path)
    np.testing.assert_array_equal(logits(loaded), expected)


def test_loading_an_adapter_of_the_wrong_shape_is_a_clear_error(tmp_path):
    peft = get_peft_model(base_model(), LoraConfig(r=4))
    peft.save_pretrained(tmp_path)
    bigger = LlamaForCausalLM(LlamaConfig(**{**SMALL, "dim": 64, "ffn_dim": 96}))
    with pytest.raises(ValueError, match="does not fit this model"):
        PeftModel.from_pretrained(bigger, tmp_path)


@pytest.mark.parametrize("config, message", [
    (dict(target_modules=["attn_q"]), "matched no Linear"),
    (dict(r=33), "larger than the matrix"),
    (dict(r=0), "positive integer"),
    (dict(bias="some"), "bias"),
    (dict(target_modules=["mlp"]), "not a Linear"),
])
def test_bad_configs_are_clear_errors(config, message):
    with pytest.raises((ValueError, TypeError), match=message):
        get_peft_model(base_model(), LoraConfig(**config))


def test_regex_targets_layers_to_transform_and_rslora():
    peft = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                   target_modules=r".*\.(q|v)_proj", layers_to_transform=[1]))
    adapted = [n for n, m in peft.named_modules() if isinstance(m, LoraLinear)]
    assert adapted == ["base_model.model.model.layers.1.self_attn.q_proj",
                       "base_model.model.model.layers.1.self_attn.v_proj"]
    assert peft.model.model.layers[1].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 2)


def test_initialisations_follow_peft():
    layer = Linear(256, 64)
    kaiming = LoraLinear(layer)
    kaiming.add_adapter("a", LoraConfig(r=8), np.random.default_rng(0))
    a = kaiming.lora_A["a"].weight.data
    assert np.abs(a).max() <= 1 / np.sqrt(256) and np.abs(a).max() > 0.9 / np.sqrt(256)
    assert not kaiming.lora_B["a"].weight.data.any()
    gauss = LoraLinear(Linear(256, 64))
    gauss.add_adapter("g", LoraConfig(r=8, init_lora_weights="gaussian"), np.random.default_rng(0))
    assert gauss.lora_A["g"].weight.data.std() == pytest.approx(1 / 8, rel=0.05)


def test_modules_to_save_trains_a_copy_and_is_saved_under_the_plain_name(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL, "tie_embeddings": False}))
    peft = get_peft_model(model, LoraConfig(r=2, modules_to_save=["lm_head"]))
    trainable = {n for n, _ in peft.named_parameters(trainable_only=True)}
    assert "base_model.model.lm_head.modules_to_save.default.weight" in trainable
    assert "base_model.model.lm_head.original_module.weight" not in trainable
    assert "base_model.model.lm_head.weight" in peft.adapter_state_dict()


@settings(max_examples=30, deadline=None)
@given(d_in=st.integers(1, 12), d_out=st.integers(1, 12), rows=st.integers(1, 5),
       r=st.integers(1, 12), alpha=st.floats(0.5, 32), seed=st.integers(0, 2**16))
def test_lora_linear_matches_the_dense_formula(d_in, d_out, rows, r, alpha, seed):
    """h = x (W + s B A)^T, and its gradients, for any shapes: LoRA's math written densely."""
    r = min(r, d_in, d_out)
    rng = np.random.default_rng(seed)
    layer = LoraLinear(Linear(d_in, d_out, bias=True, dtype=np.float64))
    layer.add_adapter("a", LoraConfig(r=r, lora_alpha=alpha), rng)
    layer.lora_B["a"].weight.data = rng.normal(size=(d_out, r))
    w, b = layer.base_layer.weight.data, layer.base_layer.bias.data
    a_, b_ = layer.lora_A["a"].weight.data, layer.lora_B["a"].weight.data
    s = alpha / r
    layer.active_adapters = ["a"]
    x = Tensor(rng.normal(size=(rows, d_in)), requires_grad=True)
    g = rng.normal(size=(rows, d_out))
    y = layer(x)
    y.backward(g)
    dense = w + s * b_ @ a_
    np.testing.assert_allclose(y.data, x.data @ dense.T + b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(x.grad, g @ dense, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.lora_B["a"].weight.grad, s * g.T @ (x.data @ a_.T), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.lora_A["a"].weight.grad, s * (g @ b_).T @ x.data, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("targets, r, expected_total", [
    (["q_proj", "v_proj"], 8, 460_800),
    (["q_proj", "k_proj", "v_proj", "o_proj"], 8, 921_600),
    (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 8, 2_442_240),
    (["q_proj", "k_proj", "v_proj", "o_proj"], 64, 7_372_800),
])
def test_smollm2_lora_parameter_counts(targets, r, expected_total):
    """The table in docs/peft.md: one SmolLM2-135M block, built for real, times its 30 blocks."""
    smollm2_block = LlamaConfig(vocab_size=8, dim=576, n_layers=1, n_heads=9, n_kv_heads=3, ffn_dim=1536)
    peft = get_peft_model(LlamaForCausalLM(smollm2_block), LoraConfig(r=r, target_modules=targets))
    assert 30 * peft.num_parameters(trainable_only=True) == expected_total


def test_lora_dropout_acts_in_training_only_and_only_on_the_lora_path(backend):
    peft = get_peft_model(base_model(), LoraConfig(r=4, lora_dropout=0.5))
    randomize_lora_B(peft)
    peft.train()
    a, b = logits(peft), logits(peft)
    assert np.abs(a - b).max() > 1e-4  # a fresh mask each call
    peft.eval()
    np.testing.assert_array_equal(logits(peft), logits(peft))
    with peft.disable_adapter():
        peft.train()
        np.testing.assert_array_equal(logits(peft), logits(base_model()))
