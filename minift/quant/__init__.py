"""4-bit quantization for QLoRA: the NF4 data type, the 4-bit linear layer, and comparisons.

Reading order: ``nf4.py`` (codebook, blockwise quantization, double quantization), then
``linear4bit.py`` (a frozen NF4 weight in a layer, ``quantize_model``), then ``compare.py``
(NF4 against uniform int4 and GGUF's affine Q4_1).
"""

from minift.quant.linear4bit import Linear4bit, dequantize_model, quantize_model
from minift.quant.nf4 import (
    BLOCK_SIZES,
    NF4_CODE,
    QuantState,
    bits_per_parameter,
    dequantize_nf4,
    dequantize_nf4_by_byte,
    normal_float_codebook,
    quantize_nf4,
)

__all__ = ["BLOCK_SIZES", "Linear4bit", "NF4_CODE", "QuantState", "bits_per_parameter", "dequantize_model",
           "dequantize_nf4", "dequantize_nf4_by_byte",
           "normal_float_codebook", "quantize_model", "quantize_nf4"]
