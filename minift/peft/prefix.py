"""Prefix tuning (Li & Liang 2021; lecture 003): learned keys and values in front of every layer.

Each attention layer gets P "virtual tokens" that exist only as a key and a value — trainable
parameters of shape (Hkv, P, hd) — prepended to the keys and values of the real tokens. Every
real token can attend to them (they lie in everyone's past), so they steer each layer's
attention without changing any weight of the model. It is a learned KV cache.

The real tokens keep their positions 0..T-1; the prefix keys carry no rotary position (they are
learned directly in the rotated space). Trainable numbers: 2 * n_layers * Hkv * P * hd.
"""

from __future__ import annotations

import numpy

import minift.autograd.functional as F
from minift.backend import xp
from minift.nn import Module, Parameter
from minift.nn.module import normal_init


class Prefix(Module):
    """The P learned key/value vectors of one attention layer."""

    def __init__(self, n_kv_heads: int, n_tokens: int, head_dim: int, rng: numpy.random.Generator,
                 std: float = 0.5, dtype=numpy.float32):
        super().__init__()
        if n_tokens <= 0:
            raise ValueError(f"prefix tuning needs at least one virtual token, got {n_tokens}")
        self.keys = Parameter(normal_init((1, n_kv_heads, n_tokens, head_dim), std, rng, dtype))
        self.values = Parameter(normal_init((1, n_kv_heads, n_tokens, head_dim), std, rng, dtype))

    @property
    def n_tokens(self) -> int:
        return self.keys.shape[2]

    def prepend(self, k, v):
        """(B, Hkv, Tk, hd) keys/values -> (B, Hkv, P + Tk, hd), the prefix first."""
        ones = xp.ones((k.shape[0], 1, 1, 1), dtype=k.dtype)  # broadcast the prefix over the batch
        return (F.concatenate([self.keys * ones, k], axis=2), F.concatenate([self.values * ones, v], axis=2))

    def extend_mask(self, mask):
        """A (B, Tk) key mask gains P always-visible columns in front."""
        mask = xp.asarray(mask, dtype=bool)
        return xp.concatenate([xp.ones((mask.shape[0], self.n_tokens), dtype=bool), mask], axis=1)


def add_prefix_tuning(model: Module, num_virtual_tokens: int = 8, seed: int = 0) -> Module:
    """Freeze ``model`` and give every attention layer a trainable prefix."""
    for p in model.parameters():
        p.requires_grad_(False)
    c = model.config
    rng = numpy.random.default_rng(seed)
    for block in model.model.layers:
        block.self_attn.prefix = Prefix(c.n_kv_heads, num_virtual_tokens, c.head_dim, rng, dtype=model.dtype)
    return model
