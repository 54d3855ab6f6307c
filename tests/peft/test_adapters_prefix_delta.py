"""Bottleneck adapters, prefix tuning and the ΔW spectrum (issue 5)."""

import numpy as np
import pytest

import minift.autograd.functional as F
from minift.backend import to_numpy
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.optim import AdamW
from minift.peft.adapters import add_bottleneck_adapters
from minift.peft.delta import captured_energy, delta_report, effective_rank, singular_values
from minift.peft.prefix import add_prefix_tuning

SMALL = dict(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)
IDS = np.random.default_rng(0).integers(0, 40, (2, 10))


def model():
    return LlamaForCausalLM(LlamaConfig(**SMALL), seed=0)


def train(m, steps=5, lr=1e-2):
    opt = AdamW(m.parameters(trainable_only=True), lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(m(IDS), IDS)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_bottleneck_adapters_start_as_identity_and_train_alone(backend):
    reference = to_numpy(model()(IDS).data)
    m = add_bottleneck_adapters(model(), bottleneck=4)
    np.testing.assert_array_equal(to_numpy(m(IDS).data), reference)
    trainable = [n for n, _ in m.named_parameters(trainable_only=True)]
    assert len(trainable) == SMALL["n_layers"] * 2 * 4  # 2 places x (down, up) x (weight, bias)
    assert m.num_parameters(trainable_only=True) == SMALL["n_layers"] * 2 * (2 * 32 * 4 + 4 + 32)
    frozen = {n: to_numpy(p.data).copy() for n, p in m.named_parameters() if not p.requires_grad}
    losses = train(m, lr=1e-3)  # the residual stream of this random model is ~0.02 wide
    assert losses[-1] < losses[0]
    for n, p in m.named_parameters():
        if n in frozen:
            np.testing.assert_array_equal(to_numpy(p.data), frozen[n])
    with pytest.raises(ValueError, match="subset"):
        add_bottleneck_adapters(model(), where=("ffn",))


def test_prefix_tuning_trains_only_the_prefix_and_keeps_causality(backend):
    m = add_prefix_tuning(model(), num_virtual_tokens=3)
    assert m.num_parameters(trainable_only=True) == 2 * SMALL["n_layers"] * 2 * 3 * 8
    changed = IDS.copy()
    changed[:, 6:] = (changed[:, 6:] + 1) % 40
    np.testing.assert_array_equal(to_numpy(m(IDS).data)[:, :6], to_numpy(m(changed).data)[:, :6])
    losses = train(m, steps=8)
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)


def test_prefix_tuning_generation_with_cache_equals_without(backend):
    m = add_prefix_tuning(model(), num_virtual_tokens=2)
    np.testing.assert_array_equal(m.generate(IDS[:, :4], 6, use_cache=True), m.generate(IDS[:, :4], 6, use_cache=False))


def test_delta_spectrum_of_a_known_low_rank_change():
    rng = np.random.default_rng(0)
    m = model()
    before = {n: to_numpy(p.data).copy() for n, p in m.named_parameters()}
    q = m.model.layers[0].self_attn.q_proj.weight
    q.data = q.data + (rng.normal(size=(32, 2)) @ rng.normal(size=(2, 32))).astype(np.float32)
    rows = {r["name"]: r for r in delta_report(before, m)}
    row = rows["model.layers.0.self_attn.q_proj.weight"]
    assert row["effective_rank_90"] <= 2
    assert row["captured"][2] == pytest.approx(1.0, abs=1e-6)
    assert rows["model.layers.1.self_attn.q_proj.weight"]["frobenius"] == 0.0


def test_captured_energy_and_effective_rank_closed_forms():
    s = np.array([3.0, 2.0, 1.0])
    assert captured_energy(s, 1) == pytest.approx(9 / 14)
    assert effective_rank(s, 0.9) == 2 and effective_rank(s, 0.99) == 3
    np.testing.assert_allclose(singular_values(np.diag([1.0, 3.0])), [3.0, 1.0])
