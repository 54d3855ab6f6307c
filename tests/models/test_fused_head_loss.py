"""The model's training loss with the head fused into the cross-entropy (issue 19):
``model.loss`` / ``model.label_logprobs`` give the numbers and gradients of the logits path for
every kind of head (tied, untied; trained or frozen), while the step's peak memory no longer
holds the (B, T, V) logits."""

import copy
import tracemalloc

import numpy as np
import pytest

import minift.autograd.functional as F
from minift.backend import to_numpy
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.peft import LoraConfig, get_peft_model

SMALL = dict(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)
RNG = np.random.default_rng(5)
IDS = RNG.integers(0, 300, (3, 10))
LABELS = np.where(RNG.random((3, 10)) < 0.25, -100, RNG.integers(0, 300, (3, 10)))


def model_of(tie: bool, method: str):
    model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_embeddings=tie), seed=1).to(np.float64)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # nonzero B: every LoRA gradient is nonzero
                p.data = np.random.default_rng(2).normal(0, 0.1, p.shape)
    return model


def gradients(model) -> dict:
    return {name: to_numpy(p.grad) for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_fused_loss_and_gradients_equal_the_logits_path(tie, method):
    fused, plain = model_of(tie, method), None
    plain = copy.deepcopy(fused)
    fused_loss = fused.loss(IDS, LABELS)
    fused_loss.backward()
    plain_loss = F.cross_entropy(plain(IDS), LABELS)
    plain_loss.backward()
    np.testing.assert_allclose(fused_loss.item(), plain_loss.item(), rtol=1e-13)
    got, expected = gradients(fused), gradients(plain)
    assert got.keys() == expected.keys() and got
    for name, g in got.items():
        scale = np.abs(expected[name]).max()
        assert scale > 0, f"{name}: a zero gradient proves nothing"
        np.testing.assert_allclose(g, expected[name], rtol=0, atol=1e-12 * scale, err_msg=name)


def test_lora_on_an_untied_head_is_in_the_logits_the_loss_and_the_gradients():
    """A LoRA adapter on ``lm_head`` makes the head more than one matrix: ``forward`` runs the
    wrapped layer, and ``loss`` / ``label_logprobs`` take its logits instead of the fused head
    (which would read the base weight alone and leave the adapter untrained)."""
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**SMALL, tie_embeddings=False), seed=1).to(np.float64),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
    without = to_numpy(model(IDS).data)
    b = next(p for name, p in model.named_parameters() if "lm_head.lora_B" in name)
    b.data = np.random.default_rng(3).normal(0, 0.1, b.shape)
    logits = model(IDS)
    assert np.abs(to_numpy(logits.data) - without).max() > 1e-3
    loss = model.loss(IDS, LABELS)
    np.testing.assert_allclose(loss.item(), F.cross_entropy(logits, LABELS).item(), rtol=1e-13)
    np.testing.assert_allclose(to_numpy(model.label_logprobs(IDS, LABELS).data),
                               to_numpy(F.token_logprobs(logits, LABELS).data), rtol=1e-13)
    loss.backward()
    assert np.abs(to_numpy(b.grad)).max() > 0


def test_label_logprobs_equal_log_softmax_of_the_logits():
    model = model_of(tie=True, method="full")
    logits = to_numpy(model(IDS).data)
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(log_p, np.maximum(LABELS, 0)[..., None], -1)[..., 0]
    got = to_numpy(model.label_logprobs(IDS, LABELS).data)
    np.testing.assert_allclose(got, np.where(LABELS == -100, 0.0, picked), rtol=1e-12, atol=1e-14)


def peak_mib(step) -> float:
    tracemalloc.start()
    try:
        step()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_a_lora_step_no_longer_holds_the_logits():
    """Vocabulary 8192 x 512 tokens: the logits and the probabilities are 16 MiB each in float32.
    The fused step's peak is at least one such buffer lower (in practice, nearly both)."""
    config = LlamaConfig(vocab_size=8192, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=256)
    model = get_peft_model(LlamaForCausalLM(config, seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    ids = np.random.default_rng(0).integers(0, 8192, (2, 256))
    logits_mib = 2 * 256 * 8192 * 4 / 2**20
    plain = peak_mib(lambda: F.cross_entropy(model(ids), ids).backward())
    fused = peak_mib(lambda: model.loss(ids, ids).backward())
    assert plain - fused > logits_mib, (plain, fused)
