"""Layers: ``Module`` trees of ``Parameter``s, the layers, freezing helpers, and ``Linear4bit``
(a frozen NF4 weight, the base layer of QLoRA).
"""

from minift.nn.freeze import (
    cast_frozen,
    freeze,
    freeze_layers,
    layer_index,
    train_only_last_layers,
    trainable_report,
    unfreeze,
)
from minift.nn.layers import BASE_DTYPES, Embedding, LayerNorm, Linear, RMSNorm, base_dtype
from minift.nn.linear4bit import Linear4bit, dequantize_model, quantize_model
from minift.nn.module import Module, ModuleDict, ModuleList, Parameter

__all__ = [
    "BASE_DTYPES", "Embedding", "LayerNorm", "Linear", "Linear4bit", "Module", "ModuleDict", "ModuleList", "Parameter",
    "RMSNorm", "base_dtype", "cast_frozen", "dequantize_model", "freeze", "freeze_layers", "layer_index",
    "quantize_model", "train_only_last_layers", "trainable_report", "unfreeze",
]
