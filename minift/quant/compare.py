"""Three 4-bit formats side by side: NF4, uniform int4 with absmax, and GGUF-style affine Q4_1.

All three store 16 levels per weight and one or two scales per block; they differ in *where*
the levels are and what the scales are:

    int4 absmax   x ~ absmax * q / 7,         q in -7..7        (15 evenly spaced levels)
    NF4           x ~ absmax * NF4[q],        q in 0..15        (levels at normal quantiles)
    Q4_1 affine   x ~ d * q + m,              q in 0..15        (d = (max - min)/15, m = min;
                                                                 d and m kept in float16)

int4 and NF4 spend their levels on [-absmax, absmax]; Q4_1 on [min, max] of the block, which fits
a block that is not centred on 0, at the price of a second scale. For normally distributed
weights NF4 puts more levels where most weights are (lecture 004), so at the same block size its
error is lowest of the two absmax formats. ``error_table`` measures it; ``benchmarks/quant_study.py``
prints it for random and real weights.

These are small quantize + dequantize pairs for the study (NumPy, float32); Q4_1 follows
llama.cpp's reference quantizer, so at block size 32 its output equals GGUF's Q4_1 bit for bit.
"""

from __future__ import annotations

import numpy

from minift.backend import to_numpy
from minift.quant.nf4 import BLOCKSIZES, bits_per_parameter, dequantize_nf4, quantize_nf4


def _blocks(x, blocksize: int) -> numpy.ndarray:
    x = numpy.asarray(x, dtype=numpy.float32)
    if x.size % blocksize:
        raise ValueError(f"{x.size} values do not split into whole blocks of {blocksize}")
    return x.reshape(-1, blocksize)


def int4_absmax(x, blocksize: int = 64) -> tuple[numpy.ndarray, float]:
    """Symmetric int4: q = round(x / absmax * 7) in -7..7, x ~ q * absmax / 7 (float32 absmax).
    -> (dequantized x, bits per weight). Error <= absmax / 14 per block."""
    blocks = _blocks(x, blocksize)
    absmax = numpy.abs(blocks).max(axis=1, keepdims=True)
    scale = absmax / numpy.float32(7)
    q = numpy.clip(numpy.rint(blocks / numpy.where(scale == 0, 1, scale)), -7, 7)
    return (q * scale).reshape(numpy.shape(x)), 4 + 32 / blocksize


def q4_1_affine(x, blocksize: int = 32) -> tuple[numpy.ndarray, float]:
    """GGUF's Q4_1 generalized to any block size: d = (max - min)/15, m = min,
    q = min(15, trunc((x - m)/d + 0.5)); d and m are stored as float16 and x ~ d16 * q + m16.
    -> (dequantized x, bits per weight = 4 + 2 * 16 / blocksize)."""
    blocks = _blocks(x, blocksize)
    low, high = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    d = (high - low) / numpy.float32(15)
    inverse = numpy.where(d == 0, numpy.float32(0), numpy.float32(1) / numpy.where(d == 0, 1, d))
    q = numpy.minimum(15, numpy.trunc((blocks - low) * inverse + numpy.float32(0.5)))
    d16, m16 = d.astype(numpy.float16).astype(numpy.float32), low.astype(numpy.float16).astype(numpy.float32)
    return (d16 * q + m16).reshape(numpy.shape(x)), 4 + 32 / blocksize


def nf4_roundtrip(x, blocksize: int = 64, double_quant: bool = False) -> tuple[numpy.ndarray, float]:
    """NF4 (``minift.quant.nf4``) -> (dequantized x, bits per weight measured from the arrays)."""
    packed, state = quantize_nf4(x, blocksize, double_quant)
    return to_numpy(dequantize_nf4(packed, state, numpy.float32)), bits_per_parameter(packed, state)


FORMATS = {
    "int4 absmax": int4_absmax,
    "Q4_1 affine": q4_1_affine,
    "NF4": nf4_roundtrip,
    "NF4 + double quant": lambda x, b: nf4_roundtrip(x, b, double_quant=True),
}


def error_table(x, blocksizes=BLOCKSIZES) -> list[dict]:
    """For each format and block size: bits per weight, RMS error and max |error| of the round
    trip, and the error relative to the weights' RMS (||x' - x|| / ||x||)."""
    x = numpy.asarray(x, dtype=numpy.float32).reshape(-1)
    norm = float(numpy.sqrt(numpy.mean(x.astype(numpy.float64) ** 2)))
    rows = []
    for blocksize in blocksizes:
        for name, roundtrip in FORMATS.items():
            approx, bits = roundtrip(x, blocksize)
            err = approx.astype(numpy.float64) - x
            rms = float(numpy.sqrt(numpy.mean(err**2)))
            rows.append({"format": name, "block": blocksize, "bits": bits, "rmse": rms,
                         "max_abs": float(numpy.abs(err).max()), "relative": rms / norm})
    return rows


def format_error_table(rows: list[dict]) -> str:
    lines = [f"{'format':<20} {'block':>5} {'bits/w':>7} {'rms error':>10} {'max |err|':>10} {'rel. error':>10}"]
    for r in rows:
        lines.append(f"{r['format']:<20} {r['block']:>5} {r['bits']:>7.3f} {r['rmse']:>10.3e} "
                     f"{r['max_abs']:>10.3e} {r['relative']:>10.4f}")
    return "\n".join(lines)
