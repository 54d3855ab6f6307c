"""Time every CUDA kernel on a GPU against a CuPy / cuBLAS baseline (llm.c dev/cuda style).

    python benchmarks/kernels_gpu.py

For each kernel: first a correctness check against the NumPy reference (as ``minift kernels
check`` does), then the timing, printed as achieved GB/s and TFLOP/s and as a fraction of this
device's *measured* peak — bandwidth from a large device-to-device copy, FLOP/s from a large
cuBLAS SGEMM. Every kernel here is memory-bound (see the roofline in each .cu header), so the
GB/s fraction is the number to read. Where no GPU is present the script says so and exits.
"""

from __future__ import annotations

import sys

import numpy as np

from minift.backend import cupy_available
from minift.cuda import check as kernels_check
from minift.cuda import kernels
from minift.cuda import reference as kernels_reference


def gpu_seconds(fn, repeat: int = 20) -> float:
    from cupyx.profiler import benchmark

    return float(np.median(benchmark(fn, n_repeat=repeat, n_warmup=3).gpu_times[0]))


def measured_peaks(cp) -> tuple[float, float]:
    """(bytes/s, flop/s): a 1 GiB copy (read + write) and an 8192^3 float32 matmul."""
    src = cp.ones(2**28, dtype=cp.float32)
    dst = cp.empty_like(src)
    bandwidth = 2 * src.nbytes / gpu_seconds(lambda: cp.copyto(dst, src))
    a = cp.ones((8192, 8192), dtype=cp.float32)
    flops = 2 * 8192**3 / gpu_seconds(lambda: a @ a, repeat=5)
    return bandwidth, flops


def cases(cp):
    """(name, kernel call, baseline call, bytes moved, flops) at the sizes LoRA and QLoRA meet."""
    rng = cp.random.default_rng(0)

    def f32(*shape):
        return rng.standard_normal(shape, dtype=cp.float32)

    M, K, N, R = 4096, 4096, 4096, 16  # a training micro-batch through a 4096-wide projection
    x, A, B, y, t, g = f32(M, K), f32(R, K), f32(N, R), f32(M, N), f32(M, R), f32(M, N)
    yield ("lora_shrink_v1", lambda: kernels.lora_shrink(x, A, version=1), lambda: x @ A.T,
           4 * (M * K + R * K + M * R), 2 * M * K * R)
    yield ("lora_shrink_v2", lambda: kernels.lora_shrink(x, A), lambda: x @ A.T,
           4 * (M * K + R * K + M * R), 2 * M * K * R)
    yield ("lora_expand", lambda: kernels.lora_expand(t, B, y, 0.5), lambda: cp.add(y, 0.5 * (t @ B.T), out=y),
           4 * (M * R + N * R + 2 * M * N), 2 * M * R * N)
    yield ("lora_fused", lambda: kernels.lora_fused(x, A, B, 0.5, y), lambda: cp.add(y, 0.5 * ((x @ A.T) @ B.T), out=y),
           4 * (M * K + R * K + N * R + 2 * M * N), 2 * M * R * (K + N))
    yield ("lora_grad_weight (dB)", lambda: kernels.lora_grad_weight(g, t, 0.5), lambda: 0.5 * (g.T @ t),
           4 * (M * N + M * R + N * R), 2 * M * N * R)

    rows, n_adapters = 32, 8  # a decode step: 32 requests over 8 adapters
    xb, yb = f32(rows, K), f32(rows, N)
    A_stack, B_stack = f32(n_adapters, R, K), f32(n_adapters, N, R)
    idx = cp.asarray(np.arange(rows, dtype=np.int32) % n_adapters)
    scales = cp.full(n_adapters, 0.5, dtype=cp.float32)

    def gathered():
        t = cp.einsum("mrk,mk->mr", A_stack[idx], xb) * scales[idx][:, None]
        return yb + cp.einsum("mnr,mr->mn", B_stack[idx], t)

    yield ("bgmv", lambda: kernels.bgmv(xb, A_stack, B_stack, idx, scales, yb), gathered,
           4 * (rows * (K + 2 * N) + n_adapters * R * (K + N)), 2 * rows * R * (K + N))

    n, blocksize = N * K, 64  # one 4096 x 4096 weight
    packed = cp.asarray(np.random.default_rng(0).integers(0, 256, n // 2, dtype=np.uint8))
    absmax = rng.random(n // blocksize, dtype=cp.float32)
    table = cp.asarray(kernels_reference.NF4_CODE)

    def dequant_cupy():
        codes = cp.stack([packed >> 4, packed & 15], axis=1).ravel()
        return table[codes] * cp.repeat(absmax, blocksize)

    yield ("nf4_dequant_f32", lambda: kernels.nf4_dequantize(packed, absmax, n, blocksize), dequant_cupy,
           n // 2 + 4 * n // blocksize + 4 * n, n)
    yield ("nf4_dequant_f16", lambda: kernels.nf4_dequantize(packed, absmax, n, blocksize, dtype=np.float16),
           lambda: dequant_cupy().astype(cp.float16), n // 2 + 4 * n // blocksize + 2 * n, n)
    xv = f32(K)
    yield ("nf4_gemv", lambda: kernels.nf4_gemv(packed, absmax, xv, N, K, blocksize),
           lambda: dequant_cupy().reshape(N, K) @ xv, n // 2 + 4 * n // blocksize + 4 * (K + N), 2 * n)


def main() -> int:
    if not cupy_available():
        print("benchmarks/kernels_gpu.py needs CuPy and an NVIDIA GPU; none is present here, so nothing was "
              "timed. (On this machine, `minift kernels check` runs every kernel on the CPU emulator.)")
        return 0
    import cupy as cp

    failed = [r for r in kernels_check.check(["cupy"]) if not r.passed]
    if failed:
        print("kernel check failed, not timing:", ", ".join(r.kernel for r in failed))
        return 1
    device = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    peak_bw, peak_flops = measured_peaks(cp)
    print(f"{device}: measured peak {peak_bw / 1e9:.0f} GB/s (copy), {peak_flops / 1e12:.1f} TFLOP/s (SGEMM)")
    print(f"{'kernel':24} {'time (us)':>10} {'GB/s':>8} {'% peak BW':>10} {'TFLOP/s':>8} {'baseline (us)':>14}")
    for name, run, baseline, n_bytes, n_flops in cases(cp):
        seconds, base = gpu_seconds(run), gpu_seconds(baseline)
        bandwidth = n_bytes / seconds
        print(f"{name:24} {seconds * 1e6:10.1f} {bandwidth / 1e9:8.1f} {100 * bandwidth / peak_bw:9.1f}% "
              f"{n_flops / seconds / 1e12:8.2f} {base * 1e6:14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
