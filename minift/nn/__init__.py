"""Layers and models: ``Module`` trees of ``Parameter``s, plus freezing helpers."""

from minift.nn.freeze import (
    freeze,
    freeze_layers,
    layer_index,
    train_only_last_layers,
    trainable_report,
    unfreeze,
)
from minift.nn.layers import Embedding, LayerNorm, Linear, RMSNorm
from minift.nn.module import Module, ModuleDict, ModuleList, Parameter

__all__ = [
    "Embedding", "LayerNorm", "Linear", "Module", "ModuleDict", "ModuleList", "Parameter", "RMSNorm",
    "freeze", "freeze_layers", "layer_index", "train_only_last_layers", "trainable_report", "unfreeze",
]
