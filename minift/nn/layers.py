"""The layers of a Llama-style transformer: Linear, Embedding, RMSNorm, LayerNorm.

Each layer owns its Parameters and calls one fused op from ``minift.autograd.functional``; the math and
the backward formula live there.
"""

from __future__ import annotations

import numpy

import minift.autograd.functional as F
from minift.backend import xp
from minift.nn.module import Module, Parameter, normal_init


class Linear(Module):
    """y = x W^T + b, W of shape (out_features, in_features) as in PyTorch checkpoints."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 std: float = 0.02, rng: numpy.random.Generator | None = None, dtype=numpy.float32):
        super().__init__()
        rng = rng if rng is not None else numpy.random.default_rng(0)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(normal_init((out_features, in_features), std, rng, dtype))
        self.bias = Parameter(xp.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def __repr__(self) -> str:
        return f"Linear(in={self.in_features}, out={self.out_features}, bias={self.bias is not None})"


class Embedding(Module):
    """A (num_embeddings, dim) table; ``forward(ids)`` picks one row per token id."""

    def __init__(self, num_embeddings: int, dim: int, *, std: float = 0.02,
                 rng: numpy.random.Generator | None = None, dtype=numpy.float32):
        super().__init__()
        rng = rng if rng is not None else numpy.random.default_rng(0)
        self.weight = Parameter(normal_init((num_embeddings, dim), std, rng, dtype))

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    def __repr__(self) -> str:
        return f"Embedding{tuple(self.weight.shape)}"


class RMSNorm(Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019); weight starts at 1."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=numpy.float32):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(xp.ones(dim, dtype=dtype))

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.eps)

    def __repr__(self) -> str:
        return f"RMSNorm({self.weight.shape[0]}, eps={self.eps})"


class LayerNorm(Module):
    """(x - mean) / sqrt(var + eps) * weight + bias (Ba et al. 2016)."""

    def __init__(self, dim: int, eps: float = 1e-5, dtype=numpy.float32):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(xp.ones(dim, dtype=dtype))
        self.bias = Parameter(xp.zeros(dim, dtype=dtype))

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def __repr__(self) -> str:
        return f"LayerNorm({self.weight.shape[0]}, eps={self.eps})"
