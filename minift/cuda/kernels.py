"""The CUDA kernels of ``kernels/*.cu`` behind one Python API, on a GPU or on the CPU emulator.

Where a launch runs is decided by the arrays: CuPy arrays go to the GPU (``cupy.RawModule``,
compiled by NVRTC), NumPy arrays to the CPU emulator (``minift.cuda.emulator``: g++ builds the *same*
.cu file). Everything else is shared by both paths and lives once, here:

* the argument checks — dtype, shape, contiguity, index ranges — raise ``KernelArgumentError``
  before anything is launched (a GPU kernel handed a float64 array reads garbage, silently);
* the grid and block of each kernel, computed from the tile sizes the .cu file ``#define``s
  (``kernel_constants``), so a tile size is written once, in the kernel;
* the argument packing: arrays, and NumPy scalars (``numpy.int32``, ``numpy.float32``) for numbers.

Each public function states its math; ``minift/cuda/reference.py`` holds the NumPy
definition it is tested against. Shapes: M rows (tokens), K = d_in, N = d_out, R = LoRA rank.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from pathlib import Path

import numpy

from minift.autograd.function import op_counts
from minift.cuda import emulator

KERNEL_DIR = emulator.KERNEL_DIR
LORA = "lora_shrink_expand.cu"
BGMV = "bgmv.cu"
NF4 = "nf4_dequant.cu"
NF4_GEMV = "nf4_gemv.cu"
F32 = numpy.dtype(numpy.float32)
MAX_DYNAMIC_SHARED = 48 * 1024  # bytes a launch may use without a per-kernel opt-in
INT32_LIMIT = 2**31  # kernels index with int: every array must have fewer elements


class KernelArgumentError(ValueError):
    """Arguments a kernel cannot take; raised before any launch, naming the op and the argument."""


# ---- kernel files, constants and the launch -------------------------------------------------
@functools.cache
def kernel_constants(filename: str) -> dict[str, int]:
    """The ``#define NAME <integer>`` lines of a kernel file (tile sizes, threads per block)."""
    text = (KERNEL_DIR / filename).read_text()
    return {name: int(value) for name, value in re.findall(r"^#define\s+(\w+)\s+(\d+)\b", text, re.MULTILINE)}


def is_cupy_array(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def launch(filename: str, kernel: str, grid, block, args: tuple, shared_mem: int = 0) -> None:
    """Launch ``kernel`` of ``filename`` on the device holding the array arguments."""
    grid, block = tuple(int(g) for g in grid), tuple(int(b) for b in block)
    if math.prod(grid) == 0:
        return  # nothing to compute (an empty batch)
    if math.prod(block) > 1024 or grid[1] > 65535 or grid[2] > 65535 or shared_mem > MAX_DYNAMIC_SHARED:
        raise KernelArgumentError(f"{kernel}: launch grid={grid} block={block} smem={shared_mem} exceeds CUDA's limits")
    op_counts[f"kernel:{kernel}"] += 1
    if any(is_cupy_array(a) for a in args):
        _cupy_module(filename).get_function(kernel)(grid, block, args, shared_mem=shared_mem)
    else:
        emulator.load(KERNEL_DIR / filename).launch(kernel, grid, block, args, shared_mem)


@functools.cache
def _cupy_module(filename: str):
    import cupy

    options = ["-std=c++17", f"-I{KERNEL_DIR}"]
    cuda = cupy.cuda.get_cuda_path()
    if cuda and (Path(cuda) / "include").is_dir():  # cuda_fp16.h for the NF4 kernels
        options.append(f"-I{Path(cuda) / 'include'}")
    return cupy.RawModule(code=(KERNEL_DIR / filename).read_text(), options=tuple(options))


def _blocks(n: int, per_block: int) -> int:
    return -(-n // per_block)


# ---- argument checks, shared by both paths ----------------------------------------------------
def _expect(op: str, name: str, a, dtype, shape: tuple) -> tuple[int, ...]:
    """Check one array argument; ``shape`` entries are sizes or None (any). Returns a.shape."""
    if not (hasattr(a, "dtype") and hasattr(a, "flags")):
        raise KernelArgumentError(f"{op}: {name} must be a NumPy or CuPy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise KernelArgumentError(f"{op}: {name} must be {numpy.dtype(dtype).name}, got {a.dtype}")
    if a.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, a.shape)):
        wanted = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise KernelArgumentError(f"{op}: {name} has shape {a.shape}, expected {wanted}")
    if not a.flags.c_contiguous:
        raise KernelArgumentError(f"{op}: {name} must be C-contiguous (pass xp.ascontiguousarray({name}))")
    if a.size >= INT32_LIMIT:
        raise KernelArgumentError(f"{op}: {name} has {a.size} elements; the kernels index with 32-bit ints")
    return a.shape


def _same_device(op: str, *arrays) -> None:
    if len({is_cupy_array(a) for a in arrays}) > 1:
        raise KernelArgumentError(f"{op}: the arrays mix NumPy (CPU) and CuPy (GPU); put them on one device")


def array_module(a):
    """numpy or cupy: the module of array ``a``."""
    if is_cupy_array(a):
        import cupy

        return cupy
    return numpy


def _output(op: str, name: str, out, like, shape: tuple, dtype=F32):
    """``out`` checked (shape, dtype, no overlap with ``like``), or a new array next to ``like``."""
    if out is None:
        return array_module(like).empty(shape, dtype=dtype)
    _expect(op, name, out, dtype, shape)
    _same_device(op, out, like)
    return out


def _no_overlap(op: str, out, *inputs) -> None:
    """A kernel reads its inputs while it writes ``out``: they must not share memory."""
    module = array_module(out)
    if any(module.may_share_memory(out, a) for a in inputs):
        raise KernelArgumentError(f"{op}: the output shares memory with an input")


def _rank_fits(op: str, R: int, rows: int) -> None:
    if rows * R * 4 > MAX_DYNAMIC_SHARED:
        raise KernelArgumentError(f"{op}: rank R={R} needs {rows * R * 4} bytes of shared memory per block, "
                                  f"more than the {MAX_DYNAMIC_SHARED} a launch gets")


# ---- LoRA: shrink, expand, fused, backward (kernels/lora_shrink_expand.cu) --------------------
def lora_shrink(x, A, out=None, version: int = 2):
    """t = x A^T: x (M, K), A (R, K) -> t (M, R). ``version`` 1 is the naive kernel, 2 the chosen one."""
    M, K = _expect("lora_shrink", "x", x, F32, (None, None))
    R, _ = _expect("lora_shrink", "A", A, F32, (None, K))
    _same_device("lora_shrink", x, A)
    t = _output("lora_shrink", "out", out, x, (M, R))
    _no_overlap("lora_shrink", t, x, A)
    c = kernel_constants(LORA)
    if version == 1:
        threads, grid = c["SHRINK_V1_THREADS"], _blocks(M * R, c["SHRINK_V1_THREADS"])
    elif version == 2:
        threads, grid = c["SHRINK_THREADS"], _blocks(M * R, c["SHRINK_THREADS"] // c["WARP"])
    else:
        raise KernelArgumentError(f"lora_shrink: version must be 1 or 2, got {version}")
    launch(LORA, f"lora_shrink_v{version}", (grid, 1, 1), (threads, 1, 1),
           (x, A, t, numpy.int32(M), numpy.int32(K), numpy.int32(R)))
    return t


def lora_expand(t, B, y, scale: float, accumulate: bool = True):
    """y += s t B^T (or y = s t B^T with ``accumulate=False``; y may then be None).
    t (M, R), B (N, R), y (M, N). Returns y."""
    M, R = _expect("lora_expand", "t", t, F32, (None, None))
    N, _ = _expect("lora_expand", "B", B, F32, (None, R))
    _same_device("lora_expand", t, B)
    if y is None and accumulate:
        raise KernelArgumentError("lora_expand: accumulate=True needs the array y to add to")
    y = _output("lora_expand", "y", y, t, (M, N))
    _no_overlap("lora_expand", y, t, B)
    c = kernel_constants(LORA)
    _rank_fits("lora_expand", R, c["TILE_M"])
    grid = (_blocks(N, c["EXPAND_THREADS"]), _blocks(M, c["TILE_M"]), 1)
    launch(LORA, "lora_expand", grid, (c["EXPAND_THREADS"], 1, 1),
           (t, B, y, numpy.int32(M), numpy.int32(N), numpy.int32(R), numpy.float32(scale),
            numpy.int32(bool(accumulate))),
           shared_mem=c["TILE_M"] * R * 4)
    return y


def lora_fused(x, A, B, scale: float, y):
    """y += s (x A^T) B^T in one launch, the tile of t kept in shared memory.
    x (M, K), A (R, K), B (N, R), y (M, N). Returns y."""
    M, K = _expect("lora_fused", "x", x, F32, (None, None))
    R, _ = _expect("lora_fused", "A", A, F32, (None, K))
    N, _ = _expect("lora_fused", "B", B, F32, (None, R))
    _expect("lora_fused", "y", y, F32, (M, N))
    _same_device("lora_fused", x, A, B, y)
    _no_overlap("lora_fused", y, x, A, B)
    c = kernel_constants(LORA)
    _rank_fits("lora_fused", R, c["TILE_M"])
    launch(LORA, "lora_fused", (_blocks(M, c["TILE_M"]), 1, 1), (c["SHRINK_THREADS"], 1, 1),
           (x, A, B, y, numpy.int32(M), numpy.int32(K), numpy.int32(N), numpy.int32(R), numpy.float32(scale)),
           shared_mem=c["TILE_M"] * R * 4)
    return y


def lora_grad_weight(U, V, scale: float, out=None):
    """C = s U^T V: U (M, P), V (M, Q) -> C (P, Q), summed over the M rows."""
    M, P = _expect("lora_grad_weight", "U", U, F32, (None, None))
    _, Q = _expect("lora_grad_weight", "V", V, F32, (M, None))
    _same_device("lora_grad_weight", U, V)
    C = _output("lora_grad_weight", "out", out, U, (P, Q))
    _no_overlap("lora_grad_weight", C, U, V)
    tile = kernel_constants(LORA)["GW_TILE"]
    launch(LORA, "lora_grad_weight", (_blocks(Q, tile), _blocks(P, tile), 1), (tile, tile, 1),
           (U, V, C, numpy.int32(M), numpy.int32(P), numpy.int32(Q), numpy.float32(scale)))
    return C


def lora_backward(x, A, B, t, g, scale: float, needs=(True, True, True)):
    """Gradients of y = y0 + s t B^T, t = x A^T, for dL/dy = g (M, N), with u = g B:

        dx = s u A    dA = s u^T x    dB = s g^T t

    Returns (dx, dA, dB); an entry whose ``needs`` flag is False is None and is not computed
    (a frozen A costs no dA kernel). u = g B is a shrink with B^T as its "A"; dx an expand with
    A^T as its "B" (both transposes are small R x d copies).
    """
    need_dx, need_dA, need_dB = needs
    xp = array_module(g)
    dx = dA = dB = None
    if need_dx or need_dA:
        u = lora_shrink(g, xp.ascontiguousarray(B.T))
        if need_dx:
            dx = lora_expand(u, xp.ascontiguousarray(A.T), None, scale, accumulate=False)
        if need_dA:
            dA = lora_grad_weight(u, x, scale)
    if need_dB:
        dB = lora_grad_weight(g, t, scale)
    return dx, dA, dB


# ---- multi-LoRA: BGMV (kernels/bgmv.cu) -------------------------------------------------------
def bgmv(x, A_stack, B_stack, idx, scale, y):
    """y[i] += scale[a] B[a] (A[a] x[i]) for each row i with a = idx[i] >= 0; rows with -1 keep y[i].

    x (M, K), A_stack (n_adapters, R, K), B_stack (n_adapters, N, R), idx (M,) int32,
    scale one float or (n_adapters,) float32, y (M, N). Adapters of smaller rank are zero-padded
    to R (exact: the padding adds zeros). Checking idx reads it on the host (a sync on a GPU).
    """
    M, K = _expect("bgmv", "x", x, F32, (None, None))
    n_adapters, R, _ = _expect("bgmv", "A_stack", A_stack, F32, (None, None, K))
    N = _expect("bgmv", "B_stack", B_stack, F32, (n_adapters, None, R))[1]
    _expect("bgmv", "idx", idx, numpy.int32, (M,))
    _expect("bgmv", "y", y, F32, (M, N))
    xp = array_module(x)
    if numpy.ndim(scale) == 0:
        scale = xp.full(n_adapters, scale, dtype=F32)
    _expect("bgmv", "scale", scale, F32, (n_adapters,))
    _same_device("bgmv", x, A_stack, B_stack, idx, scale, y)
    _no_overlap("bgmv", y, x, A_stack, B_stack)
    if M and (int(idx.min()) < -1 or int(idx.max()) >= n_adapters):
        raise KernelArgumentError(f"bgmv: adapter indices must be in [-1, {n_adapters}), "
                                  f"got values from {int(idx.min())} to {int(idx.max())}")
    _rank_fits("bgmv", R, 1)
    threads = kernel_constants(BGMV)["BGMV_THREADS"]
    launch(BGMV, "bgmv", (M, 1, 1), (threads, 1, 1),
           (x, A_stack, B_stack, idx, scale, y, numpy.int32(K), numpy.int32(N), numpy.int32(R)), shared_mem=R * 4)
    return y


def stack_lora_adapters(adapters, rank: int | None = None):
    """[(A (r_i, K), B (N, r_i)), ...] -> (A_stack (n, R, K), B_stack (n, N, R)) for ``bgmv``.

    Adapters of rank r_i < R are zero-padded: rows r_i.. of A and columns r_i.. of B are zero,
    so the padded entries of A x are 0 and meet only zeros in B — B A is unchanged, exactly.
    R is the largest rank unless given.
    """
    rank = rank or max(A.shape[0] for A, _ in adapters)
    (_, K), (N, _) = adapters[0][0].shape, adapters[0][1].shape
    xp = array_module(adapters[0][0])
    A_stack = xp.zeros((len(adapters), rank, K), dtype=F32)
    B_stack = xp.zeros((len(adapters), N, rank), dtype=F32)
    for i, (A, B) in enumerate(adapters):
        if A.shape[0] > rank or A.shape[1] != K or B.shape != (N, A.shape[0]):
            raise KernelArgumentError(f"stack_lora_adapters: adapter {i} has A {A.shape}, B {B.shape}; "
                                      f"expected A (r <= {rank}, {K}), B ({N}, r)")
        A_stack[i, : A.shape[0]] = A
        B_stack[i, :, : A.shape[0]] = B
    return A_stack, B_stack


# ---- NF4 (kernels/nf4_dequant.cu, kernels/nf4_gemv.cu) -------------------------------------
# The layout is minift.quant.nf4's (bitsandbytes'): n values in whole blocks of an even
# ``blocksize``, packed two per byte, one absmax per block (float32, or uint8 codes of a 256-entry
# map with absmax2 and an offset when double-quantized). The raw functions take those arrays; the
# last two take (packed, QuantState) like ``nf4.dequantize_nf4``.
def _nf4_sizes(op: str, packed, n: int, blocksize: int) -> int:
    """Check the codes of n values in blocks of ``blocksize``; returns the number of blocks."""
    if blocksize <= 0 or blocksize % 2 or n % blocksize:
        raise KernelArgumentError(f"{op}: n = {n} values must be whole blocks of an even blocksize, got {blocksize}")
    _expect(op, "packed", packed, numpy.uint8, (n // 2,))
    return n // blocksize


def _nested_checks(op: str, absmax_q, code2, absmax2, n_blocks: int, nested_blocksize: int) -> None:
    if nested_blocksize <= 0:
        raise KernelArgumentError(f"{op}: nested_blocksize must be positive, got {nested_blocksize}")
    _expect(op, "absmax_q", absmax_q, numpy.uint8, (n_blocks,))
    _expect(op, "code2", code2, F32, (kernel_constants(NF4)["CODE2_SIZE"],))
    _expect(op, "absmax2", absmax2, F32, (_blocks(n_blocks, nested_blocksize),))


def _dequant_output(op: str, out, like, n: int, dtype):
    dtype = numpy.dtype(dtype)
    if dtype not in (F32, numpy.dtype(numpy.float16)):
        raise KernelArgumentError(f"{op}: the output dtype must be float32 or float16, got {dtype}")
    return _output(op, "out", out, like, (n,), dtype), "f32" if dtype == F32 else "f16"


def nf4_dequantize(packed, absmax, n: int, blocksize: int, out=None, dtype=numpy.float32):
    """w[i] = NF4[q_i] * absmax[i // blocksize] for the n values packed two per byte (high nibble
    first), as float32 or float16: the flat (n,) array."""
    n_blocks = _nf4_sizes("nf4_dequantize", packed, n, blocksize)
    _expect("nf4_dequantize", "absmax", absmax, F32, (n_blocks,))
    _same_device("nf4_dequantize", packed, absmax)
    out, suffix = _dequant_output("nf4_dequantize", out, packed, n, dtype)
    c = kernel_constants(NF4)
    launch(NF4, f"nf4_dequant_{suffix}", (_blocks(n // 2, c["NF4_THREADS"]), 1, 1), (c["NF4_THREADS"], 1, 1),
           (packed, absmax, out, numpy.int32(n), numpy.int32(blocksize)), shared_mem=c["NF4_CODES"] * 4)
    return out


def nf4_dequantize_nested(packed, absmax_q, code2, absmax2, offset: float, n: int, blocksize: int,
                          nested_blocksize: int = 256, out=None, dtype=numpy.float32):
    """``nf4_dequantize`` with double-quantized absmax (QLoRA), decoded per value as
    absmax[b] = code2[absmax_q[b]] * absmax2[b // nested_blocksize] + offset."""
    n_blocks = _nf4_sizes("nf4_dequantize_nested", packed, n, blocksize)
    _nested_checks("nf4_dequantize_nested", absmax_q, code2, absmax2, n_blocks, nested_blocksize)
    _same_device("nf4_dequantize_nested", packed, absmax_q, code2, absmax2)
    out, suffix = _dequant_output("nf4_dequantize_nested", out, packed, n, dtype)
    c = kernel_constants(NF4)
    launch(NF4, f"nf4_dequant_nested_{suffix}", (_blocks(n // 2, c["NF4_THREADS"]), 1, 1), (c["NF4_THREADS"], 1, 1),
           (packed, absmax_q, code2, absmax2, numpy.float32(offset), out, numpy.int32(n), numpy.int32(blocksize),
            numpy.int32(nested_blocksize)), shared_mem=(c["NF4_CODES"] + c["CODE2_SIZE"]) * 4)
    return out


def nf4_absmax_nested(absmax_q, code2, absmax2, offset: float, nested_blocksize: int = 256, out=None):
    """Only the absmax of the double-quantized layout: code2[absmax_q[b]] * absmax2[b // nested] + offset."""
    n_blocks = _expect("nf4_absmax_nested", "absmax_q", absmax_q, numpy.uint8, (None,))[0]
    _nested_checks("nf4_absmax_nested", absmax_q, code2, absmax2, n_blocks, nested_blocksize)
    _same_device("nf4_absmax_nested", absmax_q, code2, absmax2)
    out = _output("nf4_absmax_nested", "out", out, absmax_q, (n_blocks,))
    threads = kernel_constants(NF4)["NF4_THREADS"]
    launch(NF4, "nf4_absmax_nested", (_blocks(n_blocks, threads), 1, 1), (threads, 1, 1),
           (absmax_q, code2, absmax2, numpy.float32(offset), out, numpy.int32(n_blocks), numpy.int32(nested_blocksize)))
    return out


def nf4_gemv(packed, absmax, x, N: int, K: int, blocksize: int, out=None):
    """y = W x for an (N, K) NF4 weight W (row-major, K even) and one input row x (K,), without
    materializing W: each weight is decoded in registers. ``absmax`` is float32 (decode double-
    quantized ones first with ``nf4_absmax_nested``)."""
    if K % 2:
        raise KernelArgumentError(f"nf4_gemv: K must be even (rows start on a byte), got {K}")
    n_blocks = _nf4_sizes("nf4_gemv", packed, N * K, blocksize)
    _expect("nf4_gemv", "absmax", absmax, F32, (n_blocks,))
    _expect("nf4_gemv", "x", x, F32, (K,))
    _same_device("nf4_gemv", packed, absmax, x)
    y = _output("nf4_gemv", "out", out, x, (N,))
    _no_overlap("nf4_gemv", y, x, absmax)
    threads = kernel_constants(NF4_GEMV)["NF4_GEMV_THREADS"]
    launch(NF4_GEMV, "nf4_gemv", (_blocks(N, threads // 32), 1, 1), (threads, 1, 1),
           (packed, absmax, x, y, numpy.int32(N), numpy.int32(K), numpy.int32(blocksize)))
    return y


def _state_arrays(state):
    """(absmax_q, code2, absmax2, offset, nested_blocksize) of a double-quantized QuantState."""
    return (state.absmax, array_module(state.absmax).asarray(state.state2.code, dtype=F32), state.state2.absmax,
            float(state.offset), state.state2.blocksize)


def dequantize_nf4(packed, state, dtype=None):
    """``minift.quant.nf4.dequantize_nf4`` on the kernels: (packed, QuantState) -> the weight, in
    ``dtype`` (float32 or float16; default the original dtype) and the original shape."""
    n, dtype = math.prod(state.shape), numpy.dtype(dtype or state.dtype)
    op_counts["nf4_dequantize"] += 1  # counted as the NumPy path counts it: the same on either backend
    if state.nested:
        flat = nf4_dequantize_nested(packed, *_state_arrays(state)[:4], n, state.blocksize,
                                     state.state2.blocksize, dtype=dtype)
    else:
        flat = nf4_dequantize(packed, state.absmax, n, state.blocksize, dtype=dtype)
    return flat.reshape(state.shape)


def nf4_matvec(packed, state, x):
    """y = W x for a 4-bit weight (packed, QuantState) of shape (N, K) and x (K,), by ``nf4_gemv``."""
    absmax = nf4_absmax_nested(*_state_arrays(state)) if state.nested else state.absmax
    N, K = state.shape
    return nf4_gemv(packed, absmax, x, N, K, state.blocksize)


# ---- when LoraLinear uses the kernels ---------------------------------------------------------
_lora_mode = "auto"


@contextlib.contextmanager
def lora_kernels(mode: str):
    """Choose LoraLinear's path: "auto" (kernels for float32 CuPy arrays, the default), "on" (always:
    on NumPy arrays that means the emulator — slow, for tests), "off" (never)."""
    global _lora_mode
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"lora_kernels mode must be 'auto', 'on' or 'off', got {mode!r}")
    previous, _lora_mode = _lora_mode, mode
    try:
        yield
    finally:
        _lora_mode = previous


def use_lora_kernels(x) -> bool:
    """Should a LoRA update of input array ``x`` run on the kernels? (see ``lora_kernels``)"""
    if _lora_mode == "auto":
        return is_cupy_array(x) and x.dtype == F32
    return _lora_mode == "on"
