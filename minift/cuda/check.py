"""``minift kernels check``: every kernel, on every path present, against its NumPy reference.

The emulator path always runs; the CuPy path runs where CuPy sees a GPU. Each kernel is run over
a few fixed shapes (odd sizes, a single row, sizes off the tile grid) and compared with
``minift/cuda/reference.py`` (NF4 dequantization bit for bit: its tolerance is zero).
The table reports the largest error and the largest error as a fraction of the allowed tolerance
(``minift.cuda.reference.float32_tolerance``); a kernel passes when that fraction is <= 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from minift.backend import cupy_available, to_numpy
from minift.cuda import kernels
from minift.cuda import reference as ref
from minift.quant import nf4

LORA_SHAPES = [(1, 64, 48, 8), (37, 100, 70, 16), (16, 33, 257, 64)]  # (M, K, N, R)
BGMV_SHAPES = [(1, 64, 48, 8, 2), (9, 70, 33, 16, 3)]  # (M, K, N, R, adapters)
NF4_SHAPES = [(17 * 64, 64), (4096, 4096), (130 * 32, 32)]  # (n, blocksize): n in whole blocks


@dataclass
class Result:
    kernel: str
    path: str
    shapes: list
    max_error: float = 0.0
    worst_ratio: float = 0.0  # max |error| / tolerance

    @property
    def passed(self) -> bool:
        return self.worst_ratio <= 1.0

    def add(self, out, expected, tolerance) -> None:
        error = numpy.abs(to_numpy(out).astype(numpy.float64) - expected)
        self.max_error = max(self.max_error, float(error.max(initial=0.0)))
        ratio = numpy.where(error == 0, 0.0, error / numpy.maximum(tolerance, 1e-300))
        nan_seen = numpy.inf if numpy.isnan(ratio).any() else 0
        self.worst_ratio = max(self.worst_ratio, float(ratio.max(initial=0.0)), nan_seen)


def _random(rng, *shape):
    a = rng.normal(size=shape).astype(numpy.float32)
    a[rng.random(shape) < 0.1] = 0.0  # some exact zeros
    return a


def _lora_cases(put, rng):
    for version in (1, 2):
        yield f"lora_shrink_v{version}", LORA_SHAPES, lambda s, v=version: _shrink(put, rng, s, v)
    yield "lora_expand", LORA_SHAPES, lambda s: _expand(put, rng, s)
    yield "lora_fused", LORA_SHAPES, lambda s: _fused(put, rng, s)
    yield "lora_backward (dx, dA, dB)", LORA_SHAPES, lambda s: _backward(put, rng, s)
    yield "bgmv", BGMV_SHAPES, lambda s: _bgmv(put, rng, s)


def _shrink(put, rng, shape, version):
    M, K, _, R = shape
    x, A = _random(rng, M, K), _random(rng, R, K)
    out = kernels.lora_shrink(put(x), put(A), version=version)
    yield out, ref.lora_shrink(x, A), ref.float32_tolerance(ref.lora_shrink, x, A, terms=K)


def _expand(put, rng, shape):
    M, _, N, R = shape
    t, B, y = _random(rng, M, R), _random(rng, N, R), _random(rng, M, N)
    out = kernels.lora_expand(put(t), put(B), put(y.copy()), 0.5)  # the kernel writes y
    yield out, ref.lora_expand(t, B, y, 0.5), ref.float32_tolerance(ref.lora_expand, t, B, y, 0.5, terms=R)


def _fused(put, rng, shape):
    M, K, N, R = shape
    x, A, B, y = _random(rng, M, K), _random(rng, R, K), _random(rng, N, R), _random(rng, M, N)
    out = kernels.lora_fused(put(x), put(A), put(B), 0.5, put(y.copy()))
    yield out, ref.lora_fused(x, A, B, 0.5, y), ref.float32_tolerance(ref.lora_fused, x, A, B, 0.5, y, terms=K + R)


def _backward(put, rng, shape):
    M, K, N, R = shape
    x, A, B, g = _random(rng, M, K), _random(rng, R, K), _random(rng, N, R), _random(rng, M, N)
    t = kernels.lora_shrink(put(x), put(A))
    got = kernels.lora_backward(put(x), put(A), put(B), t, put(g), 0.5)
    expected = ref.lora_backward(x, A, B, g, 0.5)
    tolerance = ref.float32_tolerance(ref.lora_backward, x, A, B, g, 0.5, terms=M + N + K)
    yield from zip(got, expected, tolerance)


def _bgmv(put, rng, shape):
    M, K, N, R, n = shape
    x, A, B, y = _random(rng, M, K), _random(rng, n, R, K), _random(rng, n, N, R), _random(rng, M, N)
    idx = rng.integers(-1, n, M).astype(numpy.int32)
    out = kernels.bgmv(put(x), put(A), put(B), put(idx), 0.5, put(y.copy()))
    tolerance = ref.float32_tolerance(lambda x, A, B, y: ref.bgmv(x, A, B, idx, 0.5, y), x, A, B, y, terms=K + R)
    yield out, ref.bgmv(x, A, B, idx, 0.5, y), tolerance


def _nf4_cases(put, rng):
    for dtype in (numpy.float32, numpy.float16):
        suffix = numpy.dtype(dtype).name
        yield f"nf4_dequant ({suffix})", NF4_SHAPES, lambda s, d=dtype: _nf4(put, rng, s, d, nested=False)
        yield f"nf4_dequant_nested ({suffix})", NF4_SHAPES, lambda s, d=dtype: _nf4(put, rng, s, d, nested=True)
    yield "nf4_gemv", [(33, 128, 64), (1, 4096, 4096)], lambda s: _nf4_gemv(put, rng, s)


def _nf4_inputs(rng, n, blocksize):
    packed = rng.integers(0, 256, n // 2, dtype=numpy.uint8)
    n_blocks = n // blocksize
    absmax_q = rng.integers(0, 256, n_blocks, dtype=numpy.uint8)
    absmax2 = rng.uniform(0.1, 2.0, -(-n_blocks // 256)).astype(numpy.float32)
    return packed, rng.uniform(0, 3, n_blocks).astype(numpy.float32), (absmax_q, nf4.DYNAMIC_CODE, absmax2, 0.25)


def _nf4(put, rng, shape, dtype, nested):
    n, blocksize = shape
    packed, absmax, nested_args = _nf4_inputs(rng, n, blocksize)
    if nested:
        out = kernels.nf4_dequantize_nested(put(packed), *map(put, nested_args[:3]), nested_args[3], n, blocksize,
                                            dtype=dtype)
        expected = ref.nf4_dequantize_nested(packed, *nested_args, n, blocksize, dtype=dtype)
    else:
        out = kernels.nf4_dequantize(put(packed), put(absmax), n, blocksize, dtype=dtype)
        expected = ref.nf4_dequantize(packed, absmax, n, blocksize, dtype=dtype)
    yield out, expected.astype(numpy.float64), numpy.zeros(n)  # exact


def _nf4_gemv(put, rng, shape):
    N, K, blocksize = shape
    packed, absmax, _ = _nf4_inputs(rng, N * K, blocksize)
    x = _random(rng, K)
    out = kernels.nf4_gemv(put(packed), put(absmax), put(x), N, K, blocksize)
    W = ref.nf4_dequantize(packed, absmax, N * K, blocksize).reshape(N, K)  # exactly the kernel's weights
    yield out, ref.nf4_gemv(packed, absmax, x, N, K, blocksize), ref.float32_tolerance(numpy.matmul, W, x, terms=K)


def check(paths=None) -> list[Result]:
    """Run every kernel on every path ("emulator", and "cupy" when a GPU is present)."""
    paths = paths or ["emulator"] + (["cupy"] if cupy_available() else [])
    results = []
    for path in paths:
        if path == "cupy":
            import cupy

            put = cupy.asarray
        else:
            put = numpy.asarray
        rng = numpy.random.default_rng(0)
        for name, shapes, run in [*_lora_cases(put, rng), *_nf4_cases(put, rng)]:
            result = Result(name, path, shapes)
            for shape in shapes:
                for out, expected, tolerance in run(shape):
                    result.add(out, expected, tolerance)
            results.append(result)
    return results


def format_table(results: list[Result]) -> str:
    rows = [("kernel", "path", "shapes tried", "max |error|", "error / tolerance", "pass")]
    rows += [(r.kernel, r.path, "; ".join(str(s) for s in r.shapes), f"{r.max_error:.3g}", f"{r.worst_ratio:.3g}",
              "yes" if r.passed else "NO") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
