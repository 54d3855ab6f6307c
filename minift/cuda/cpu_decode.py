"""The compiled CPU NF4 decoder: ``kernels/nf4_decode_cpu.cpp`` built with g++, called through ctypes.

NumPy's fastest NF4 decode (``dequantize_nf4_by_byte``: a gather per byte, then a product pass)
writes every weight twice and stays at a fraction of a compiled loop's speed (issue 19:
0.2-0.4x bitsandbytes' C++ kernel). The loop in ``kernels/nf4_decode_cpu.cpp`` writes each weight
once, from a 16-entry table of the levels already multiplied by the block's absmax, with the
blocks split over threads in C++. It makes the same float32 product per weight as
``dequantize_nf4``, so the result is equal bit for bit (tests/cuda/test_cpu_decode.py).

The library is built on first use by the emulator's build (``emulator.compile_library``: the
same compiler, ``$CXX``, and the same cache under ``$MINIFT_CACHE/cuda_emu``). A machine without
a compiler raises ``EmulatorBuildError`` here; ``Linear4bit`` then falls back to the NumPy decoder
(minift/nn/linear4bit.py, ``cpu_decoder``).
"""

from __future__ import annotations

import ctypes
import functools
import math

import numpy

from minift.autograd.function import op_counts
from minift.autograd.parallel import blas_threads
from minift.cuda import emulator
from minift.quant import nf4

SOURCE = "nf4_decode_cpu.cpp"
#: The versions of the block loop in kernels/nf4_decode_cpu.cpp (the SIMD ones on x86-64 only).
VERSIONS = ("plain", "avx2", "avx512")
# No -march=native: the cached library may be shared by machines with other CPUs (a home folder
# on a network disk); the AVX2 / AVX-512 loops are compiled as such alone and chosen at run time.
# -ffp-contract=off: no multiply-add is ever fused, as in the emulator's builds.
FLAGS = ("-std=c++20", "-O3", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-Wall", "-Wextra")

_POINTER = ctypes.c_void_p
_WHERE = "dequantize_nf4_compiled (minift/cuda/cpu_decode.py)"  # how error messages name the caller


@functools.cache
def library() -> ctypes.CDLL:
    """The built decoder (compiled on the first call, then loaded from the cache); raises
    ``EmulatorBuildError`` naming the compiler and its message when it cannot be built."""
    path = emulator.KERNEL_DIR / SOURCE
    # Compiler messages point into kernels/; the text hashed is the same in a checkout and a wheel.
    unit = f'#line 1 "kernels/{SOURCE}"\n{path.read_text()}'
    lib = ctypes.CDLL(str(emulator.compile_library(unit, path.stem, FLAGS)))
    lib.nf4_decode_f32.restype = ctypes.c_int
    lib.nf4_decode_f32.argtypes = [_POINTER, _POINTER, _POINTER, ctypes.c_int64, ctypes.c_int32, _POINTER,
                                   ctypes.c_int32, ctypes.c_char_p]
    lib.nf4_decode_best_version.restype = ctypes.c_char_p
    lib.nf4_decode_best_version.argtypes = [ctypes.c_int32]
    return lib


def best_version(blocksize: int) -> str:
    """The version ``dequantize_nf4_compiled`` runs for ``blocksize`` on this CPU (see ``VERSIONS``)."""
    return library().nf4_decode_best_version(blocksize).decode()


def thread_count(n_weights: int, n_blocks: int, threads: int | None) -> int:
    """How many threads to split a decode over: ``threads`` (default the BLAS's, what ``minift
    --threads`` sets), but at least ``nf4.MIN_WEIGHTS_PER_THREAD`` weights each and whole blocks —
    the same rule as ``dequantize_nf4_by_byte``, so the two decoders are compared like for like."""
    wanted = threads or blas_threads()
    return max(1, min(wanted, n_weights // nf4.MIN_WEIGHTS_PER_THREAD, n_blocks))


def _float32_out(out, shape: tuple[int, ...]) -> numpy.ndarray:
    if out is None:
        return numpy.empty(shape, dtype=numpy.float32)
    if out.dtype != numpy.float32 or tuple(out.shape) != tuple(shape) or not out.flags.c_contiguous:
        raise ValueError(f"{_WHERE}: out must be a C-contiguous float32 array of shape {shape}, "
                         f"got {out.dtype} {tuple(out.shape)}; pass out=None to get a new array")
    return out


def dequantize_nf4_compiled(packed, state: nf4.QuantState, dtype=None, threads: int | None = None, out=None,
                            version: str | None = None):
    """``dequantize_nf4`` by the compiled loop, bit for bit the same; what ``Linear4bit`` runs on the CPU.

    The absmax values are decoded here (``block_absmax``, double quantization included: one value
    per block) and handed to C++ with the codes; the C++ side does the per-weight product. The
    float32 result goes into ``out`` when given (a caller's reused buffer; the decoder keeps
    nothing between calls, so no float copy of W outlives the caller's use), else into a new
    array, and is then cast to ``dtype`` (default the original dtype), as the reference does.
    ``version`` forces one loop of ``VERSIONS`` (default: the best this CPU has, ``best_version``).
    Host (NumPy) arrays only. Counted in ``op_counts["nf4_dequantize"]``.
    """
    if not isinstance(packed, numpy.ndarray) or packed.dtype != numpy.uint8:
        raise TypeError(f"{_WHERE} decodes a NumPy uint8 array of packed codes, got "
                        f"{type(packed).__name__} {getattr(packed, 'dtype', '')}; on a GPU use "
                        "minift.cuda.kernels.dequantize_nf4")
    code = numpy.ascontiguousarray(state.code, dtype=numpy.float32)
    if code.size != 16:
        raise ValueError(f"{_WHERE}: an NF4 code has 16 levels, this state's has {code.size}")
    n_weights = math.prod(state.shape)
    if packed.size * 2 != n_weights or n_weights % state.blocksize:
        raise ValueError(f"{_WHERE}: {packed.size} bytes hold {packed.size * 2} codes, the QuantState "
                         f"describes {n_weights} weights of shape {state.shape} in blocks of {state.blocksize}; "
                         "pass the packed codes and the state that quantize_nf4 returned together")
    op_counts["nf4_dequantize"] += 1
    packed = numpy.ascontiguousarray(packed)
    n_blocks = n_weights // state.blocksize
    absmax = numpy.ascontiguousarray(nf4.block_absmax(state), dtype=numpy.float32)
    weight = _float32_out(out, tuple(state.shape))
    threads = thread_count(weight.size, n_blocks, threads)
    status = library().nf4_decode_f32(packed.ctypes.data, absmax.ctypes.data, code.ctypes.data, n_blocks,
                                      state.blocksize, weight.ctypes.data, threads, (version or "").encode())
    if status == -2:
        raise ValueError(f"kernels/{SOURCE}: this CPU has no {version!r} version for blocks of {state.blocksize} "
                         f"(versions: {VERSIONS}); leave version=None for the best it has")
    if status != 0:
        raise ValueError(f"kernels/{SOURCE}: nf4_decode_f32 refused {n_blocks} blocks of {state.blocksize} on "
                         f"{threads} threads; the QuantState does not describe these codes")
    return weight.astype(dtype or state.dtype, copy=False)
