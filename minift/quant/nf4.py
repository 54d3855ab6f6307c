"""NF4, QLoRA's 4-bit NormalFloat, with blockwise absmax scaling and double quantization.

QLoRA (Dettmers et al. 2023; lectures 003 and 004) stores a frozen base weight in 4 bits and
trains LoRA adapters in full precision on top. Three ideas make 4 bits enough:

1. **NormalFloat codes.** Pretrained weights are close to normally distributed, so the 16 levels
   are put at quantiles of N(0, 1) (``normal_float_codebook``): each level stands for about the
   same share of the weights, instead of wasting levels in the sparse tails as a uniform grid does.
2. **Blockwise absmax scaling.** Every block of ``blocksize`` consecutive weights (64 by default)
   is divided by its own largest magnitude, so one outlier only coarsens its own block:

       s_i = x_i * (1 / absmax_b)          in [-1, 1]
       q_i = index of the code nearest to s_i          (4 bits)
       x_i ~ NF4[q_i] * absmax_b           (dequantization)

3. **Double quantization.** One float32 absmax per 64 weights costs 32/64 = 0.5 bit per weight.
   QLoRA quantizes the absmax values themselves: their mean (``offset``) is subtracted and the
   rest is stored with 8 bits per value in blocks of 256, using bitsandbytes' 8-bit dynamic map
   (``create_dynamic_map``) and one float32 ``absmax2`` per 256 blocks:

       bits per weight = 4 + 8/64 + 32/(64*256) = 4.127      (instead of 4 + 32/64 = 4.5)

   For a 7B model that is 3.6 GB of base weights instead of 14 GB in 16 bits (lecture 003's
   QLoRA row).

The bytes are those of bitsandbytes' ``quantize_4bit(..., quant_type="nf4")`` on the CPU,
checked bit for bit in ``tests/interop/test_bitsandbytes.py``. The details that decide the bits:

* scaling multiplies by the float32 reciprocal of absmax (``x * (1/absmax)``, not ``x / absmax``;
  the two differ in the last bit for some inputs, and then may pick different codes);
* a value exactly half-way between two codes goes to the lower code;
* an all-zero block has absmax 0; it is scaled with absmax 1e-38 instead (so 1/absmax stays
  finite), every value becomes 0, and 0 is code 7 — bitsandbytes' CPU path stores ``0x77`` bytes;
* two codes share a byte, the first value in the high nibble: ``byte = q[2j] << 4 | q[2j+1]``;
* the 8-bit absmax quantization is bitsandbytes' CPU kernel: the scaled value is rounded to one
  of 65536 evenly spaced points of [-1, 1] and a table gives the code nearest that point
  (``quantize_dynamic_8bit``); an all-zero group of 256 gets code 0.

Where minift differs on purpose: bitsandbytes accepts a tensor whose size is not a multiple of
the block size (its last block is shorter); minift refuses it, so every block holds the same
number of weights and one error bound holds for all of them. The ``offset`` is the mean of the
absmax values; bitsandbytes sums them with PyTorch's vectorized float32 sum, whose rounding
depends on the CPU's vector width and thread count, so its offset can differ from ours in the last
bits. Any offset round-trips exactly (it is stored and added back), and given the same offset
the stored bytes are identical.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy

from minift.autograd.function import op_counts
from minift.autograd.parallel import blas_threads
from minift.backend import xp

#: The 16 NF4 levels, exactly as bitsandbytes ships them (``get_4bit_type("nf4")``).
NF4_CODE = numpy.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=numpy.float32)

#: Block sizes bitsandbytes accepts for 4-bit quantization.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BLOCKSIZE = 64
#: Absmax values per float32 ``absmax2`` in double quantization.
DOUBLE_QUANT_BLOCKSIZE = 256
#: Outermost quantile probability of the NF4 construction (bitsandbytes' ``create_normal_map``).
NF4_QUANTILE_OFFSET = 0.9677083
#: Smallest absmax used for scaling: keeps 1/absmax finite for all-zero (and subnormal) blocks.
TINY_ABSMAX = numpy.float32(1e-38)
#: Points of the grid on [-1, 1] that bitsandbytes' CPU 8-bit quantizer rounds to.
LUT_POINTS = 65536


# ---- the codebooks ----------------------------------------------------------------------------
def linspace_float32(start: float, stop: float, n: int) -> numpy.ndarray:
    """``n`` evenly spaced float32 numbers as ``torch.linspace`` makes them (float32 endpoints and
    step; the first half counted up from ``start``, the second half down from ``stop``; each
    point rounded once). Both codebooks are built on this grid, so its rounding is part of them."""
    a, b = numpy.float32(start), numpy.float32(stop)
    step = numpy.float64((b - a) / numpy.float32(n - 1))
    i = numpy.arange(n, dtype=numpy.float64)
    up, down = numpy.float64(a) + step * i, numpy.float64(b) - step * (n - 1 - i)
    return numpy.where(numpy.arange(n) < n // 2, up, down).astype(numpy.float32)


def normal_float_codebook(offset: float = NF4_QUANTILE_OFFSET, float32_grid: bool = True) -> numpy.ndarray:
    """The NF4 levels built from quantiles of N(0, 1) (Dettmers et al. 2023, section 3).

    Asymmetric so that zero is a level exactly (padding and zeroed weights stay 0): 8 positive
    quantiles Phi^-1(p) for p evenly spaced from ``offset`` down to 0.5 (0.5 itself left out),
    7 negative ones the same way with 7 steps, plus 0; all divided by the largest, so the levels
    span [-1, 1]. ``offset`` = 1 - (1/32 + 1/30)/2 = 0.9677 keeps clear of p = 1, where Phi^-1 is
    infinite; it puts the outermost level at Phi^-1(0.9677) = 1.85 standard deviations.

    With ``float32_grid`` the probabilities and the result are rounded to float32 as
    bitsandbytes did (``torch.linspace`` in float32); that reproduces ``NF4_CODE`` bit for bit.
    In exact float64 arithmetic the levels differ from the table by at most 1.2e-7: rounding the
    probabilities to float32 moves the normalized levels by up to 1.0e-7 (near p = 0.968 the
    inverse CDF is steep, dPhi^-1/dp = 1/phi(1.85) = 14), and the table is itself rounded to float32.
    """
    grid = linspace_float32 if float32_grid else numpy.linspace
    inverse_cdf = NormalDist().inv_cdf
    positive = [inverse_cdf(float(p)) for p in grid(offset, 0.5, 9)[:-1]]
    negative = [-inverse_cdf(float(p)) for p in grid(offset, 0.5, 8)[:-1]]
    levels = numpy.sort(numpy.array(positive + [0.0] + negative))
    if float32_grid:
        levels = levels.astype(numpy.float32)
    return (levels / levels.max()).astype(numpy.float32)


def create_dynamic_map(signed: bool = True) -> numpy.ndarray:
    """bitsandbytes' 8-bit dynamic map (Dettmers 2016): the code of the absmax values, and of
    8-bit AdamW's moments (``minift/optim/adamw8bit.py``).

    A dynamic-exponent format: for e = 0..6, 2^e values spread linearly over [0.1, 1] * 10^(e-6)
    (bin centres of a float32 linspace), each with both signs; plus 0 and 1 — 256 sorted levels.
    Small magnitudes get many levels, large ones few: the relative error stays small at every
    scale, which suits numbers like absmax - mean that may be tiny or large.

    ``signed=False`` is the map for numbers that are never negative (Adam's second moment): the
    sign bit goes to the fraction, so each decade gets twice the levels, 2^(e+1), all positive —
    bitsandbytes' ``create_dynamic_map(signed=False)``, the same 256 levels on [0, 1].
    """
    levels = [numpy.float32([0.0, 1.0])]
    for e in range(7):
        edges = linspace_float32(0.1, 1.0, 2 ** (e if signed else e + 1) + 1)
        centres = numpy.float32(10.0 ** (e - 6)) * ((edges[:-1] + edges[1:]) / numpy.float32(2))
        levels += [centres, -centres] if signed else [centres]
    return numpy.sort(numpy.concatenate(levels)).astype(numpy.float32)


#: The code of double-quantized absmax values (bitsandbytes' ``create_dynamic_map()``).
DYNAMIC_CODE = create_dynamic_map()
#: The unsigned dynamic map (bitsandbytes' ``create_dynamic_map(signed=False)``): 8-bit AdamW's ``v``.
DYNAMIC_CODE_UNSIGNED = create_dynamic_map(signed=False)


# ---- the state --------------------------------------------------------------------------------
@dataclass
class QuantState:
    """Everything besides the packed codes that dequantization needs (bitsandbytes' QuantState).

    ``absmax`` holds one scale per block: float32, or — with double quantization — uint8 codes
    of ``DYNAMIC_CODE`` that decode as ``code2[absmax] * state2.absmax[group] + offset``.
    ``state2`` is the state of that second level (its ``absmax`` is absmax2, its ``code`` the
    dynamic map, its ``blocksize`` 256). ``dtype`` is the dtype of the original tensor.
    """

    shape: tuple[int, ...]
    blocksize: int
    absmax: object
    code: numpy.ndarray = field(default_factory=lambda: NF4_CODE, repr=False)
    dtype: numpy.dtype = numpy.dtype(numpy.float32)
    offset: numpy.float32 | None = None
    state2: QuantState | None = None

    @property
    def nested(self) -> bool:
        """True for double quantization."""
        return self.state2 is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the per-tensor scales: absmax (+ absmax2 and offset when nested). The
        codebooks are shared constants and not counted."""
        size = int(self.absmax.nbytes)
        if self.nested:
            size += int(self.state2.absmax.nbytes) + numpy.float32(self.offset).nbytes
        return size


# ---- packing ----------------------------------------------------------------------------------
def pack_4bit(codes):
    """Two 4-bit codes per byte, the first in the high nibble: byte j = q[2j] << 4 | q[2j+1]."""
    codes = codes.reshape(-1).astype(xp.uint8)
    if codes.size % 2:
        raise ValueError(f"pack_4bit needs an even number of codes, got {codes.size}")
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed):
    """The inverse of ``pack_4bit``: (n/2,) bytes -> (n,) codes 0..15."""
    packed = packed.reshape(-1)
    codes = xp.empty(2 * packed.size, dtype=xp.uint8)
    codes[0::2], codes[1::2] = packed >> 4, packed & 0x0F
    return codes


# ---- 4-bit blockwise quantization --------------------------------------------------------------
def _check_input(x, blocksize: int):
    """x as a float32 array, after the checks that make the error bound hold for every block."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"NF4 block size {blocksize} is not supported; choose one of {BLOCKSIZES}")
    x = xp.asarray(x)
    if not xp.issubdtype(x.dtype, xp.floating):
        raise TypeError(f"NF4 quantizes floating-point weights, got dtype {x.dtype}")
    if x.size == 0 or x.size % blocksize:
        raise ValueError(f"a tensor of shape {x.shape} ({x.size} values) does not split into whole "
                         f"blocks of {blocksize}; choose a block size that divides its size")
    bad = ~xp.isfinite(x) | (xp.abs(x) > numpy.finfo(numpy.float32).max)  # inf once in float32
    if bool(bad.any()):
        first = int(xp.argmax(bad.reshape(-1)))
        raise ValueError(f"cannot quantize a non-finite weight ({x.reshape(-1)[first]} at flat index "
                         f"{first}, as float32): its block's absmax would be inf and every code NaN")
    return x.astype(xp.float32)


def nearest_code(scaled, code):
    """Index of the level of the sorted ``code`` nearest to each ``scaled`` value; a value exactly
    half-way between two levels takes the lower one (the midpoints are float32, like the levels)."""
    code = xp.asarray(code)
    midpoints = (code[:-1] + code[1:]) / xp.float32(2)
    return xp.searchsorted(midpoints, scaled, side="left").astype(xp.uint8)


def nf4_codes(x, blocksize: int = DEFAULT_BLOCKSIZE):
    """Blockwise absmax quantization: -> (codes (n,) uint8 in 0..15, absmax (n/blocksize,) float32).

    s = x * (1/absmax) in float32, clipped to [-1, 1] (x * (1/x) can exceed 1 by an ulp), then
    the nearest NF4 level. See the module docstring for the all-zero block.
    """
    blocks = _check_input(x, blocksize).reshape(-1, blocksize)
    absmax = xp.abs(blocks).max(axis=1)
    inverse = xp.float32(1) / xp.maximum(absmax, TINY_ABSMAX)
    scaled = xp.clip(blocks * inverse[:, None], -1, 1)
    return nearest_code(scaled, NF4_CODE).reshape(-1), absmax


# ---- 8-bit quantization of the absmax values (double quantization) -----------------------------
@functools.cache
def dynamic_lut() -> numpy.ndarray:
    """For each of the 65536 grid points g_i = -1 + 2i/65535 (float32): the nearest dynamic level."""
    i = numpy.arange(LUT_POINTS, dtype=numpy.float32)
    grid = numpy.float32(-1) + (numpy.float32(2) * i) / numpy.float32(LUT_POINTS - 1)
    midpoints = numpy.float32(0.5) * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])
    return numpy.searchsorted(midpoints, grid, side="left").astype(numpy.uint8)


def quantize_dynamic_8bit(x, blocksize: int = DOUBLE_QUANT_BLOCKSIZE):
    """8-bit blockwise quantization with ``DYNAMIC_CODE``, as bitsandbytes' CPU kernel does it.

    Per group of ``blocksize`` values (the last group may be shorter): absmax2 = max |x|,
    s = x * (1/absmax2); s is rounded to the nearest grid point i = trunc((s + 1)/2 * 65535 + 0.5)
    and the code is the level nearest that point (a 64K-entry table). That is not always the
    level nearest s: near 0, where the dynamic levels are closer together than the grid step
    2/65535, and wherever s lies within 1/65535 of a midpoint between two levels. The error stays
    below half the largest gap plus 1/65535 (times absmax2). A group of zeros stores absmax2 = 0
    and code 0. As in the 4-bit path, 1/absmax2 is computed with absmax2 at least 1e-38;
    bitsandbytes has no such floor, and a subnormal absmax2 makes its 1/absmax2 infinite (its
    codes for such a group are then meaningless; minift's are off by at most absmax2 < 1.2e-38).
    -> (codes uint8, absmax2 float32).
    """
    x = xp.asarray(x, dtype=xp.float32).reshape(-1)
    padded = xp.concatenate([x, xp.zeros((-x.size) % blocksize, dtype=xp.float32)])
    groups = padded.reshape(-1, blocksize)
    absmax2 = xp.abs(groups).max(axis=1)
    inverse = xp.float32(1) / xp.maximum(absmax2, TINY_ABSMAX)
    scaled = xp.clip(groups * inverse[:, None], -1, 1)
    point = ((scaled + xp.float32(1)) * xp.float32(0.5) * xp.float32(LUT_POINTS - 1) + xp.float32(0.5))
    codes = xp.asarray(dynamic_lut())[point.astype(xp.uint16)]
    codes[absmax2 == 0] = 0
    return codes.reshape(-1)[: x.size], absmax2


def dequantize_dynamic_8bit(codes, absmax2, blocksize: int = DOUBLE_QUANT_BLOCKSIZE, first: int = 0):
    """x ~ DYNAMIC_CODE[code] * absmax2[group], in float32; ``codes`` may be a slice of all the
    codes that starts at index ``first`` (its groups are counted from there)."""
    values = xp.asarray(DYNAMIC_CODE)[codes.reshape(-1)]
    group = (first + xp.arange(values.size)) // blocksize
    return values * absmax2[group]


def double_quantize(absmax, offset=None):
    """QLoRA's double quantization of the float32 absmax values -> (uint8 codes, offset, state2).

    offset = mean(absmax) (pass ``offset`` to use another, e.g. one read from bitsandbytes);
    absmax - offset is centred on 0, which the symmetric dynamic code needs: absmax values are
    all positive, and without the shift half of the 256 levels would never be used.
    """
    absmax = xp.asarray(absmax, dtype=xp.float32)
    if offset is None:
        offset = float(absmax.astype(xp.float64).mean())
    offset = numpy.float32(offset)
    codes, absmax2 = quantize_dynamic_8bit(absmax - offset)
    state2 = QuantState(shape=tuple(absmax.shape), blocksize=DOUBLE_QUANT_BLOCKSIZE, absmax=absmax2,
                        code=DYNAMIC_CODE)
    return codes, offset, state2


def block_absmax(state: QuantState, start: int = 0, stop: int | None = None):
    """The float32 absmax of blocks ``start:stop`` (all by default), decoded from the 8-bit codes
    when double-quantized; a range lets each thread of the fast decoder decode only its own."""
    codes = state.absmax[start:stop]
    if not state.nested:
        return codes
    second = state.state2
    return dequantize_dynamic_8bit(codes, second.absmax, second.blocksize, first=start) + xp.float32(state.offset)


# ---- the public pair ---------------------------------------------------------------------------
def quantize_nf4(x, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True):
    """x -> (packed codes (x.size/2,) uint8, QuantState): bitsandbytes'
    ``quantize_4bit(x, blocksize, quant_type="nf4", compress_statistics=double_quant)``."""
    codes, absmax = nf4_codes(x, blocksize)
    state = QuantState(shape=tuple(xp.asarray(x).shape), blocksize=blocksize, absmax=absmax,
                       dtype=numpy.dtype(xp.asarray(x).dtype))
    if double_quant:
        state.absmax, state.offset, state.state2 = double_quantize(absmax)
    return pack_4bit(codes), state


def dequantize_nf4(packed, state: QuantState, dtype=None):
    """W = NF4[q] * absmax, block by block, in float32 (then cast to ``dtype``, default the
    original dtype); the shape of the original tensor. Counted in ``op_counts["nf4_dequantize"]``."""
    op_counts["nf4_dequantize"] += 1
    values = xp.asarray(state.code)[unpack_4bit(packed)].reshape(-1, state.blocksize)
    weight = (values * block_absmax(state)[:, None]).reshape(state.shape)
    return weight.astype(dtype or state.dtype, copy=False)


@functools.lru_cache(maxsize=8)
def _byte_pair_table(code_bytes: bytes) -> numpy.ndarray:
    """(256,) uint64 on the host: byte b -> the 8 bytes of the float32 pair
    (code[b >> 4], code[b & 15]), the two weights one byte holds, high nibble first. One uint64
    per byte lets ``numpy.take`` copy both weights with a single 8-byte move; it is a view of
    the float pair's own bytes, so the order in memory is the same on any byte order."""
    levels = numpy.frombuffer(code_bytes, dtype=numpy.float32)
    pairs = numpy.stack([numpy.repeat(levels, 16), numpy.tile(levels, 16)], axis=1)
    return pairs.view(numpy.uint64).reshape(256)


#: Fewest weights worth handing to another thread: a chunk this size (1 MiB of float32) takes
#: 0.1-0.4 ms to decode, well above the tens of microseconds a pool needs to hand over a task
#: and collect it. A matrix under twice this (SmolLM2's 576 x 576 projections) decodes on the
#: calling thread alone.
MIN_WEIGHTS_PER_THREAD = 1 << 18


@functools.cache
def _thread_pool() -> ThreadPoolExecutor:
    """One pool for the whole process, as large as the machine; each call uses what it asks for."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="minift-nf4")


def _decode_blocks(out, packed, state: QuantState, pairs, start: int, stop: int) -> None:
    """Blocks ``start:stop`` of ``out`` (float32, (n_blocks, blocksize)) from their bytes: one
    8-byte gather per byte, then the absmax product in place. ``numpy.take`` and the product
    release the GIL, so threads running this on different row blocks run in parallel."""
    bytes_per_block = state.blocksize // 2
    rows = out[start:stop]
    numpy.take(pairs, packed[start * bytes_per_block:stop * bytes_per_block],
               out=rows.reshape(-1).view(numpy.uint64), mode="clip")  # "clip": no buffered bounds check
    rows *= block_absmax(state, start, stop)[:, None]


def dequantize_nf4_by_byte(packed, state: QuantState, dtype=None, threads: int | None = None):
    """``dequantize_nf4`` on the CPU, fast and bit for bit the same; what ``Linear4bit`` runs.

    The plain version unpacks the bytes into codes, looks every code up in the 16-entry table,
    decodes all the absmax values and then scales: a pass over the weight for each step, all
    on one core. Here a 256-entry table maps a byte straight to its two float levels, so one gather
    writes the weight in order into a preallocated array and one in-place product scales it,
    with the absmax values (double quantization included) decoded block range by block range
    alongside. The weight is cut into ``threads`` row blocks (default ``blas_threads()``; at
    least ``MIN_WEIGHTS_PER_THREAD`` weights each), decoded side by side on a thread pool. The
    arithmetic is the same float32 product per weight, so the result is identical bit for bit
    (tests/quant/test_nf4_fast.py). Host (NumPy) arrays only: on a GPU, ``Linear4bit`` runs the
    CUDA kernel. Counted in ``op_counts["nf4_dequantize"]`` like the plain version.
    """
    if not isinstance(packed, numpy.ndarray):
        raise TypeError(f"dequantize_nf4_by_byte decodes NumPy arrays, got {type(packed).__name__}; "
                        "on a GPU use minift.cuda.kernels.dequantize_nf4, or dequantize_nf4")
    op_counts["nf4_dequantize"] += 1
    pairs = _byte_pair_table(numpy.asarray(state.code, dtype=numpy.float32).tobytes())
    n_blocks = packed.size * 2 // state.blocksize
    out = numpy.empty((n_blocks, state.blocksize), dtype=numpy.float32)
    flat = packed.reshape(-1)
    chunks = max(1, min(threads or blas_threads(), out.size // MIN_WEIGHTS_PER_THREAD, n_blocks))
    edges = [n_blocks * i // chunks for i in range(chunks + 1)]
    others = [_thread_pool().submit(_decode_blocks, out, flat, state, pairs, edges[i], edges[i + 1])
              for i in range(1, chunks)]
    _decode_blocks(out, flat, state, pairs, edges[0], edges[1])  # the calling thread takes the first
    for task in others:
        task.result()
    return out.reshape(state.shape).astype(dtype or state.dtype, copy=False)


def bits_per_parameter(packed, state: QuantState) -> float:
    """Storage of a quantized tensor in bits per weight, measured from the arrays' nbytes."""
    n = 1
    for side in state.shape:
        n *= side
    return 8 * (int(packed.nbytes) + state.nbytes) / n
