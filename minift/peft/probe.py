"""Feature extraction and a linear probe (lecture 004): the pretrained model as a frozen feature
extractor, with only a small new head trained on top.

The cheapest end of the fine-tuning spectrum: the transformer runs once per example under
``no_grad`` (no graph, no gradients, no optimizer state for any of its weights), its final
hidden states are averaged over the real tokens, and a single ``Linear`` layer learns to map
those features to classes. It works when the pretrained features already separate the classes;
it cannot create features the model never learned.
"""

from __future__ import annotations

import numpy

import minift.autograd.functional as F
from minift.autograd import Tensor, no_grad
from minift.backend import to_numpy, xp
from minift.nn import Linear, Module
from minift.optim import AdamW


def extract_features(model, input_ids, attention_mask, batch_size: int = 16) -> numpy.ndarray:
    """Mean final hidden state over each row's real tokens: (N, T) ids -> (N, C) features."""
    features = []
    with no_grad():
        for start in range(0, len(input_ids), batch_size):
            ids = xp.asarray(input_ids[start:start + batch_size])
            keep = xp.asarray(attention_mask[start:start + batch_size], dtype=bool)
            h = model.hidden(ids).data  # (B, T, C)
            summed = (h * keep[..., None]).sum(axis=1)
            features.append(to_numpy(summed / keep.sum(axis=1, keepdims=True)))
    return numpy.concatenate(features)


class LinearProbe(Module):
    """logits = features W^T + b: the only trainable parameters of feature extraction."""

    def __init__(self, n_features: int, n_classes: int, seed: int = 0):
        super().__init__()
        self.head = Linear(n_features, n_classes, bias=True, rng=numpy.random.default_rng(seed))

    def forward(self, features):
        return self.head(features)


def train_probe(features, labels, n_classes: int, steps: int = 300, lr: float = 0.05,
                weight_decay: float = 0.0, seed: int = 0) -> tuple[LinearProbe, list[float]]:
    """Full-batch AdamW on the cross-entropy of the probe; features are standardized first
    (mean 0, std 1 per feature, statistics stored on the probe) so one lr suits any model."""
    x = numpy.asarray(features, dtype=numpy.float32)
    probe = LinearProbe(x.shape[1], n_classes, seed)
    probe.mean, probe.std = x.mean(axis=0), x.std(axis=0) + 1e-6
    inputs = Tensor((x - probe.mean) / probe.std)
    targets = xp.asarray(numpy.asarray(labels, dtype=numpy.int64))
    optimizer = AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(probe(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return probe, losses


def probe_accuracy(probe: LinearProbe, features, labels) -> float:
    x = (numpy.asarray(features, dtype=numpy.float32) - probe.mean) / probe.std
    with no_grad():
        predicted = to_numpy(probe(Tensor(x)).data).argmax(axis=1)
    return float((predicted == numpy.asarray(labels)).mean())
