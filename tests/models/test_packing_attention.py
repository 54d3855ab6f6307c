"""Packed rows in the model (issue 19): attention by segment blocks keeps examples apart, so a packed
batch has the padded batch's loss and gradients, and the reference's (full rows under the
block-diagonal mask); LoRA and gradient checkpointing carry it through, prefix tuning and
generation refuse it."""

from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minift.autograd.attention import segment_mask
from minift.data import IGNORE_INDEX, collate, collate_packed, pack_examples
from minift.models import KVCache, LlamaConfig, LlamaForCausalLM
from minift.peft import LoraConfig, get_peft_model
from minift.training.methods import MethodOptions, prepare_model
from minift.training.trainer import causal_lm_loss

SMALL = dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)


def small_model():
    return LlamaForCausalLM(LlamaConfig(**SMALL), seed=0).to(np.float64)


def examples(lengths, seed=0):
    """Random ids; the first two labels of each example are prompt (ignored), the rest targets."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(0, 50, n + 1)
        labels = ids[1:].copy()
        labels[:2] = IGNORE_INDEX
        out.append({"input_ids": ids[:-1], "labels": labels})
    return out


def loss_and_gradients(model, batch, reference_attention=False):
    """``reference_attention``: full rows under ``segment_mask`` instead of the segment blocks."""
    model.zero_grad()
    if reference_attention:
        reference = segment_mask(batch["segment_ids"])
        with patch.object(LlamaForCausalLM, "_packed_layout", lambda *args: reference):
            loss = causal_lm_loss(model, batch)
    else:
        loss = causal_lm_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.copy() for n, p in model.named_parameters() if p.requires_grad}


def test_segment_mask_is_true_within_a_segment_only_and_padding_sees_nothing():
    mask = segment_mask(np.array([[1, 1, 2, 0]]))
    assert mask[0].astype(int).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_the_segment_path_gives_the_models_reference_attention_outputs_and_gradients():
    """The model with the layout of its packed rows against the same model attending over full
    rows under ``segment_mask`` (the reference), with and without gradient checkpointing."""
    batch = collate_packed(pack_examples(examples([5, 9, 3, 7, 4, 6, 16]), max_len=16), pad_id=0)
    model = small_model()
    want_loss, want_grads = loss_and_gradients(model, batch, reference_attention=True)
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss, grads = loss_and_gradients(model, batch)
        assert abs(loss - want_loss) < 1e-12
        for name, grad in want_grads.items():
            np.testing.assert_allclose(grads[name], grad, rtol=0, atol=1e-12, err_msg=name)


def test_a_packed_batch_has_the_padded_batchs_loss_and_gradients():
    data = examples([5, 9, 3, 7, 4, 6])
    model = small_model()
    plain_loss, plain_grads = loss_and_gradients(model, collate(data, pad_id=0))
    rows = pack_examples(data, max_len=16)
    assert len(rows) < len(data)
    packed_loss, packed_grads = loss_and_gradients(model, collate_packed(rows, pad_id=0))
    assert abs(packed_loss - plain_loss) < 1e-12
    for name, grad in plain_grads.items():
        np.testing.assert_allclose(packed_grads[name], grad, rtol=0, atol=1e-12, err_msg=name)


def test_without_the_mask_the_examples_would_see_each_other():
    """The equality above needs the mask: the same rows without segment ids give another loss."""
    data = examples([5, 9, 3, 7])
    model = small_model()
    batch = collate_packed(pack_examples(data, max_len=16), pad_id=0)
    plain = loss_and_gradients(model, collate(data, pad_id=0))[0]
    unmasked = loss_and_gradients(model, {k: v for k, v in batch.items() if k != "segment_ids"})[0]
    assert abs(unmasked - plain) > 1e-4


def test_changing_one_example_leaves_the_other_examples_logits_bitwise_unchanged():
    data = examples([6, 4, 5])
    batch = collate_packed(pack_examples(data, max_len=15), pad_id=0)
    model = small_model()
    logits = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"]).data
    changed = batch["input_ids"].copy()
    second = batch["segment_ids"] == 2
    changed[second] = (changed[second] + 7) % 50
    again = model(changed, positions=batch["positions"], segment_ids=batch["segment_ids"]).data
    others = ~second
    assert np.array_equal(again[others], logits[others])
    assert not np.allclose(again[second], logits[second])


def test_lora_and_gradient_checkpointing_carry_the_packed_batch_through():
    data = examples([5, 9, 3, 7])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(small_model(), config)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; nonzero B gives every LoRA weight a gradient
            p.data = np.random.default_rng(1).normal(0, 0.1, p.shape)
    plain_loss, plain_grads = loss_and_gradients(model, collate(data, pad_id=0))
    model.gradient_checkpointing_enable()
    packed_loss, packed_grads = loss_and_gradients(model, collate_packed(pack_examples(data, 16), pad_id=0))
    assert abs(packed_loss - plain_loss) < 1e-12
    assert plain_grads.keys() == packed_grads.keys() and all("lora_" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        np.testing.assert_allclose(packed_grads[name], grad, rtol=0, atol=1e-12, err_msg=name)


def test_prefix_tuning_generation_and_missing_positions_are_refused_with_the_reason():
    batch = collate_packed(pack_examples(examples([4, 3]), 8), pad_id=0)
    prefixed, _ = prepare_model(small_model(), "prefix", MethodOptions(prefix_tokens=2))
    with pytest.raises(ValueError, match=r"prefix tuning cannot train on packed rows.*--packing"):
        prefixed(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    model = small_model()
    with pytest.raises(ValueError, match="pass the positions"):
        model(batch["input_ids"], segment_ids=batch["segment_ids"])
    with pytest.raises(ValueError, match="no KV cache"):
        model(batch["input_ids"], cache=KVCache(model.config, 1, 16), positions=batch["positions"],
              segment_ids=batch["segment_ids"])
    with pytest.raises(ValueError, match="must have the shape of input_ids"):
        model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"][:, :-1])
    with pytest.raises(ValueError, match=r"attention_mask must be True exactly where segment_ids is not 0"):
        model(batch["input_ids"], attention_mask=np.zeros(batch["input_ids"].shape, dtype=bool),
              positions=batch["positions"], segment_ids=batch["segment_ids"])


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(3, 12), min_size=1, max_size=6), st.integers(12, 30), st.integers(0, 99))
def test_packed_and_padded_losses_agree_for_random_lengths(lengths, max_len, seed):
    data = examples(lengths, seed)
    model = small_model()
    plain = causal_lm_loss(model, collate(data, pad_id=0)).item()
    packed = causal_lm_loss(model, collate_packed(pack_examples(data, max_len), pad_id=0)).item()
    assert abs(packed - plain) < 1e-12
