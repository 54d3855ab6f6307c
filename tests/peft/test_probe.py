"""Feature extraction + linear probe (lecture 004): the model stays frozen, only the head learns."""

import numpy as np

from minift.autograd import op_counts
from minift.backend import to_numpy
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.peft import extract_features, probe_accuracy, train_probe


def test_a_probe_separates_classes_the_frozen_features_encode(backend):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                         ffn_dim=48, max_seq_len=16))
    rng = np.random.default_rng(0)
    # class 0 uses tokens 0-9, class 1 tokens 10-19: any decent feature extractor separates them
    labels = rng.integers(0, 2, 40)
    ids = rng.integers(0, 10, (40, 12)) + 10 * labels[:, None]
    mask = np.ones_like(ids, dtype=bool)
    mask[:, 9:] = rng.random((40, 3)) < 0.5
    before = {n: to_numpy(p.data).copy() for n, p in model.named_parameters()}
    op_counts.clear()
    features = extract_features(model, ids, mask, batch_size=16)
    assert features.shape == (40, 32)
    probe, losses = train_probe(features[:30], labels[:30], n_classes=2, steps=100)
    assert losses[-1] < 0.5 * losses[0]
    assert probe_accuracy(probe, features[30:], labels[30:]) >= 0.9
    for n, p in model.named_parameters():
        assert p.grad is None and np.array_equal(to_numpy(p.data), before[n])


def test_padding_does_not_change_a_rows_features():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                         ffn_dim=24, max_seq_len=16))
    ids = np.array([[3, 4, 5, 0, 0], [3, 4, 5, 9, 9]])
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=bool)
    a, b = extract_features(model, ids, mask)
    np.testing.assert_allclose(a, b, rtol=1e-6)
