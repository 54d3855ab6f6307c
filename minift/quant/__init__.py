"""The NF4 number format of QLoRA: how 4-bit weights are stored, quantized and decoded.

Reading order: ``nf4.py`` (codebook, blockwise quantization, double quantization), then
``compare.py`` (NF4 against uniform int4 and GGUF's affine Q4_1). The layer that *uses* a 4-bit
weight is ``minift.nn.linear4bit``, split the way bitsandbytes splits ``functional`` and ``nn``.
Layer 2 of minift (docs/design.md): it imports only the ground floor and autograd's op counter.
"""

from minift.quant.nf4 import (
    BLOCKSIZES,
    NF4_CODE,
    QuantState,
    bits_per_parameter,
    dequantize_nf4,
    dequantize_nf4_by_byte,
    normal_float_codebook,
    quantize_nf4,
)

__all__ = ["BLOCKSIZES", "NF4_CODE", "QuantState", "bits_per_parameter", "dequantize_nf4", "dequantize_nf4_by_byte",
           "normal_float_codebook", "quantize_nf4"]
