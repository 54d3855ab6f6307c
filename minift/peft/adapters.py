"""Bottleneck adapters (Houlsby et al. 2019; lecture 003): a small trainable detour per block.

After a frozen sub-layer's output y (attention's ``o_proj``, the MLP's ``down_proj``) an adapter
adds a residual through a narrow bottleneck of width m << d:

    y' = y + up( f( down(y) ) ),     down: d -> m,  up: m -> d,  f = GELU

``up`` starts at zero, so y' = y and the adapted model starts exactly at the pretrained one.
Each adapter costs 2 d m + m + d parameters. Unlike LoRA the detour is *not* linear (f sits in
the middle), so it cannot be merged into the frozen weights: inference pays for it.
"""

from __future__ import annotations

import numpy

import minift.autograd.functional as F
from minift.backend import xp
from minift.nn import Linear, Module

PLACES = {"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}


class BottleneckAdapter(Module):
    """x + up(gelu(down(x))), with ``up`` zero-initialised (an identity map at the start)."""

    def __init__(self, dim: int, bottleneck: int, rng: numpy.random.Generator):
        super().__init__()
        if not 0 < bottleneck <= dim:
            raise ValueError(f"bottleneck width must be in [1, {dim}], got {bottleneck}")
        self.down = Linear(dim, bottleneck, bias=True, rng=rng)
        self.up = Linear(bottleneck, dim, bias=True, rng=rng)
        self.up.weight.data = xp.zeros_like(self.up.weight.data)

    def forward(self, x):
        return x + self.up(F.gelu(self.down(x)))


class WithAdapter(Module):
    """A frozen layer followed by an adapter: ``adapter(base_layer(x))``."""

    def __init__(self, base_layer: Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, x):
        return self.adapter(self.base_layer(x))


def add_bottleneck_adapters(model: Module, bottleneck: int = 16, where=("attn", "mlp"), seed: int = 0) -> Module:
    """Freeze ``model`` and put an adapter after attention and/or the MLP of every block."""
    unknown = set(where) - set(PLACES)
    if unknown or not where:
        raise ValueError(f"adapter places must be a non-empty subset of {sorted(PLACES)}, got {where}")
    for p in model.parameters():
        p.requires_grad_(False)
    rng = numpy.random.default_rng(seed)
    for i in range(len(model.model.layers)):
        for place in where:
            name = f"model.layers.{i}.{PLACES[place]}"
            layer = model.get_submodule(name)
            model.set_submodule(name, WithAdapter(layer, BottleneckAdapter(layer.out_features, bottleneck, rng)))
    return model
