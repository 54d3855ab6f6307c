"""Gradient checkpointing of the Llama blocks (issue 19): the same gradients as the plain run,
frozen weights still cost no backward products, dropout draws the same masks in the recompute,
and a training step's peak memory drops."""

import tracemalloc

import numpy as np
import pytest

import minift.autograd.functional as F
from minift.autograd import no_grad, op_counts
from minift.autograd.checkpointing import Checkpoint
from minift.backend import to_numpy
from minift.models import KVCache, LlamaConfig, LlamaForCausalLM
from minift.peft import LoraConfig, get_peft_model

SMALL = dict(vocab_size=50, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)
IDS = np.random.default_rng(3).integers(0, 50, (2, 8))


def small_model(dtype=np.float64):
    return LlamaForCausalLM(LlamaConfig(**SMALL), seed=0).to(dtype)


def lora_model(dtype=np.float64, dropout=0.0):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=dropout)
    model = get_peft_model(small_model(dtype), config)
    rng = np.random.default_rng(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; nonzero B makes every LoRA gradient nonzero
            p.data = rng.normal(0, 0.1, p.shape).astype(dtype)
    return model


def step_gradients(model, checkpointing: bool):
    """The trainable parameters' gradients after one loss.backward(), by name."""
    if checkpointing:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    model.zero_grad()
    F.cross_entropy(model(IDS), IDS).backward()
    return {name: to_numpy(p.grad) for name, p in model.named_parameters() if p.requires_grad}


def assert_same_gradients(plain, checkpointed, atol):
    assert plain.keys() == checkpointed.keys()
    for name, g in plain.items():
        assert np.abs(g).max() > 0, name  # a zero gradient would make the comparison empty
        np.testing.assert_allclose(checkpointed[name], g, rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("make", [small_model, lora_model], ids=["full", "lora"])
def test_float64_gradients_equal_the_plain_run(make):
    model = make()
    assert_same_gradients(step_gradients(model, False), step_gradients(model, True), atol=1e-12)


@pytest.mark.parametrize("make", [small_model, lora_model], ids=["full", "lora"])
def test_float32_gradients_are_bitwise_equal(make):
    """The recompute runs the very same ops on the very same arrays, so float32 is exact too."""
    model = make(np.float32)
    plain, checkpointed = step_gradients(model, False), step_gradients(model, True)
    for name, g in plain.items():
        assert np.array_equal(checkpointed[name], g), name


def test_lora_keeps_the_base_frozen_and_skips_its_weight_gradients():
    """The recompute adds one forward per block and nothing else: no dW for a frozen weight."""
    model = lora_model()

    def matmuls(checkpointing: bool) -> tuple[int, int]:
        """(forward, backward) matmul counts of one step."""
        (model.gradient_checkpointing_enable if checkpointing else model.gradient_checkpointing_disable)()
        model.zero_grad()
        op_counts.clear()
        loss = F.cross_entropy(model(IDS), IDS)
        forward = op_counts["matmul"]
        op_counts.clear()
        loss.backward()
        return forward, op_counts["matmul"]

    forward, backward = matmuls(False)
    forward_checkpointed, backward_checkpointed = matmuls(True)
    assert forward_checkpointed == forward
    head = 1  # the tied head's logits product, the only forward matmul outside the blocks
    assert backward_checkpointed == backward + (forward - head)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lora_dropout_draws_the_same_masks_in_the_recompute():
    model = lora_model(dropout=0.3)
    generators = [m._rng for _, m in model.named_modules() if hasattr(m, "_rng")]
    start = [g.bit_generator.state for g in generators]

    def rewind():
        for g, state in zip(generators, start, strict=True):
            g.bit_generator.state = state

    plain = step_gradients(model, False)
    after_plain = [g.bit_generator.state for g in generators]
    other_masks = step_gradients(model, False)  # the generators moved on: different masks
    assert any(not np.allclose(other_masks[n], g) for n, g in plain.items())
    rewind()
    checkpointed = step_gradients(model, True)
    assert_same_gradients(plain, checkpointed, atol=1e-12)
    # The recompute leaves every generator where the forward left it: the next masks are unchanged.
    assert [g.bit_generator.state for g in generators] == after_plain


def test_generation_and_no_grad_forwards_ignore_the_switch():
    model = small_model()
    with no_grad():
        plain = model(IDS).numpy()
        model.gradient_checkpointing_enable()
        assert np.array_equal(model(IDS).numpy(), plain)
        cache = KVCache(model.config, batch=2, max_len=16, dtype=np.float64)
        assert np.array_equal(model(IDS, cache=cache).numpy(), plain)


def test_a_training_step_peaks_lower_with_checkpointing():
    """Memory, not time: tracemalloc sees every NumPy buffer. Measured: 8.0 MiB against 15.2 MiB, 0.53."""
    config = LlamaConfig(vocab_size=256, dim=128, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=352, max_seq_len=128)
    model = LlamaForCausalLM(config, seed=0)
    ids = np.random.default_rng(0).integers(0, 256, (4, 64))

    def peak(checkpointing: bool) -> int:
        (model.gradient_checkpointing_enable if checkpointing else model.gradient_checkpointing_disable)()
        model.zero_grad()
        tracemalloc.start()
        try:
            F.cross_entropy(model(ids), ids).backward()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(False)  # the first step allocates the gradients; measure the second of each
    plain, checkpointed = peak(False), peak(True)
    assert checkpointed < 0.8 * plain, (checkpointed, plain)


@pytest.mark.parametrize("blocks", [0, 1, SMALL["n_layers"] - 1])
@pytest.mark.parametrize("make", [small_model, lora_model], ids=["full", "lora"])
def test_checkpointing_some_blocks_gives_the_plain_gradients(make, blocks, monkeypatch):
    """``gradient_checkpointing_enable(blocks=n)``: n blocks recompute, the rest record, and the
    gradients are the plain run's."""
    model = make()
    plain = step_gradients(model, False)
    recomputed = []
    backward = Checkpoint.backward
    monkeypatch.setattr(Checkpoint, "backward", staticmethod(lambda ctx, g: recomputed.append(1) or backward(ctx, g)))
    model.gradient_checkpointing_enable(blocks)
    model.zero_grad()
    F.cross_entropy(model(IDS), IDS).backward()
    assert len(recomputed) == blocks
    checkpointed = {name: to_numpy(p.grad) for name, p in model.named_parameters() if p.requires_grad}
    assert_same_gradients(plain, checkpointed, atol=1e-12)


@pytest.mark.parametrize("blocks", [-1, SMALL["n_layers"] + 1, True, 1.5])
def test_a_block_count_outside_the_model_is_refused(blocks):
    model = lora_model()
    with pytest.raises(ValueError, match=r"pass a count in 0\.\.3, or None for all"):
        model.gradient_checkpointing_enable(blocks)


def test_the_switch_reads_as_any_block_checkpointed():
    model = small_model()
    assert not model.model.gradient_checkpointing
    model.gradient_checkpointing_enable(1)
    assert model.model.gradient_checkpointing and model.model.checkpointed_blocks == 1
    model.gradient_checkpointing_enable()
    assert model.model.checkpointed_blocks == SMALL["n_layers"]
    model.gradient_checkpointing_disable()
    assert model.model.checkpointed_blocks == 0 and not model.model.gradient_checkpointing
