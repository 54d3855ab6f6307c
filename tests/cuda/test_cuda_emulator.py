"""The CPU emulator itself (kernels/emu/cuda_emu.h): each CUDA feature it claims, on tiny kernels.

Shuffles are checked against a Python model of CUDA's documented rules, barriers by kernels that
give wrong answers without them, shared memory by kernels that read it before writing it.
"""

import numpy as np
import pytest

from minift.cuda import emulator as cuda_emu
from minift.cuda.emulator import EmulatorBuildError, EmulatorLaunchError

FULL = "0xffffffffu"

SOURCE = r"""
#include <cuda_fp16.h>

// Built-in variables: every thread writes its coordinates.
extern "C" __global__ void coordinates(int* out) {
    const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int i = block * blockDim.x * blockDim.y * blockDim.z + thread;
    out[4 * i + 0] = block; out[4 * i + 1] = threadIdx.x; out[4 * i + 2] = threadIdx.y; out[4 * i + 3] = threadIdx.z;
}

// Reverse each block's slice through static shared memory: wrong without the barrier.
extern "C" __global__ void reverse_static(const float* x, float* out) {
    __shared__ float s[64];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    s[threadIdx.x] = x[i];
    __syncthreads();
    out[i] = s[blockDim.x - 1 - threadIdx.x];
}

// The same through dynamic shared memory, after the first half of the threads has returned:
// exited threads must not count at the barrier (no deadlock), the rest still synchronize.
extern "C" __global__ void reverse_dynamic_after_exit(const float* x, float* out) {
    extern __shared__ float s[];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int half = blockDim.x / 2;
    if (threadIdx.x < half) return;
    s[threadIdx.x - half] = x[i];
    __syncthreads();
    out[i] = s[blockDim.x - 1 - threadIdx.x];
}

// Shared memory read before it is written: block 0 writes it, every block reads it.
extern "C" __global__ void read_unwritten_shared(float* out_static, float* out_dynamic) {
    __shared__ float s[32];
    extern __shared__ float d[];
    if (blockIdx.x == 0) { s[threadIdx.x] = 1.0f; d[threadIdx.x] = 1.0f; }
    __syncthreads();
    out_static[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
    out_dynamic[blockIdx.x * blockDim.x + threadIdx.x] = d[threadIdx.x];
}

extern "C" __global__ void shfl(const float* x, float* out, int op, int arg, int width) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = x[i];
    if (op == 0) v = __shfl_sync(0xffffffffu, v, arg, width);
    if (op == 1) v = __shfl_up_sync(0xffffffffu, v, arg, width);
    if (op == 2) v = __shfl_down_sync(0xffffffffu, v, arg, width);
    if (op == 3) v = __shfl_xor_sync(0xffffffffu, v, arg, width);
    out[i] = v;
}

extern "C" __global__ void shfl_partial_mask(float* out) {
    out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 1.0f, 1);
}

extern "C" __global__ void shfl_with_exited_lane(float* out) {
    if (threadIdx.x == 5) return;
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

extern "C" __global__ void count(int* counter, float* total) {
    atomicAdd(counter, 1);
    atomicAdd(total, 0.5f);
}

extern "C" __global__ void to_half(const float* x, __half* out, float* back, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { out[i] = __float2half(x[i]); back[i] = __half2float(out[i]); }
}
"""


@pytest.fixture(scope="module")
def emu():
    return cuda_emu.load_source(SOURCE, "emulator_features.cu")


def test_builtin_variables_cover_grid_and_block_in_three_dimensions(emu):
    grid, block = (2, 3, 2), (4, 2, 3)
    n_blocks, n_threads = np.prod(grid), np.prod(block)
    out = np.full((n_blocks * n_threads, 4), -1, dtype=np.int32)
    emu.launch("coordinates", grid, block, (out,))
    t = np.arange(n_threads)
    expected_thread = np.stack([t % 4, (t // 4) % 2, t // 8], axis=1)
    for b in range(n_blocks):
        rows = out[b * n_threads:(b + 1) * n_threads]
        assert (rows[:, 0] == b).all()
        np.testing.assert_array_equal(rows[:, 1:], expected_thread)


def test_syncthreads_orders_static_shared_memory_across_blocks(emu):
    x = np.arange(4 * 64, dtype=np.float32)
    out = np.full_like(x, np.nan)
    emu.launch("reverse_static", (4, 1, 1), (64, 1, 1), (x, out))
    np.testing.assert_array_equal(out, x.reshape(4, 64)[:, ::-1].ravel())


def test_threads_that_returned_leave_the_barrier_and_dynamic_shared_memory_works(emu):
    x = np.arange(3 * 64, dtype=np.float32)
    out = np.full_like(x, np.nan)
    emu.launch("reverse_dynamic_after_exit", (3, 1, 1), (64, 1, 1), (x, out), shared_mem=32 * 4)
    expected = np.full((3, 64), np.nan, dtype=np.float32)
    expected[:, 32:] = x.reshape(3, 64)[:, 32:][:, ::-1]
    np.testing.assert_array_equal(out, expected.ravel())


def test_shared_memory_is_poisoned_at_the_start_of_every_block(emu):
    out_static, out_dynamic = np.zeros((2, 3 * 32), dtype=np.float32)
    emu.launch("read_unwritten_shared", (3, 1, 1), (32, 1, 1), (out_static, out_dynamic), shared_mem=32 * 4)
    for out in (out_static, out_dynamic):
        assert (out[:32] == 1.0).all()
        assert np.isnan(out[32:]).all(), "block 1 and 2 read shared memory they never wrote"


def cuda_shuffle(x, op, arg, width):
    """CUDA's rules (Programming Guide, warp shuffle functions), lane by lane, for one warp."""
    out = x.copy()
    for lane in range(32):
        base = lane - lane % width
        if op == "sync":
            src = base + arg % width
        elif op == "up":
            src = lane - arg if lane - base >= arg else lane
        elif op == "down":
            src = lane + arg if lane - base + arg < width else lane
        else:  # xor: lower sub-warps may be read, higher ones give the caller's own value
            src = lane ^ arg if (lane ^ arg) < base + width else lane
        out[lane] = x[src]
    return out


@pytest.mark.parametrize("op", ["sync", "up", "down", "xor"])
@pytest.mark.parametrize("width", [32, 16, 4])
@pytest.mark.parametrize("arg", [1, 3, 8, 17])
def test_shuffles_follow_cuda_semantics(emu, op, width, arg):
    x = np.arange(64, dtype=np.float32) + 100
    out = np.full_like(x, np.nan)
    code = ["sync", "up", "down", "xor"].index(op)
    emu.launch("shfl", (1, 1, 1), (64, 1, 1), (x, out, np.int32(code), np.int32(arg), np.int32(width)))
    expected = np.concatenate([cuda_shuffle(x[:32], op, arg, width), cuda_shuffle(x[32:], op, arg, width)])
    np.testing.assert_array_equal(out, expected)


def test_a_partial_warp_mask_is_an_error(emu):
    with pytest.raises(EmulatorLaunchError, match="partial mask is not supported"):
        emu.launch("shfl_partial_mask", (1, 1, 1), (32, 1, 1), (np.zeros(32, np.float32),))


def test_shuffling_with_a_lane_that_returned_is_an_error(emu):
    with pytest.raises(EmulatorLaunchError, match="lane 4 read lane 5, which is not taking part"):
        emu.launch("shfl_with_exited_lane", (1, 1, 1), (32, 1, 1), (np.zeros(32, np.float32),))


def test_atomic_add_counts_every_thread_of_every_block(emu):
    counter, total = np.zeros(1, np.int32), np.zeros(1, np.float32)
    emu.launch("count", (5, 1, 1), (96, 1, 1), (counter, total))
    assert counter[0] == 5 * 96 and total[0] == 5 * 96 * 0.5


def test_half_conversion_rounds_like_cuda_and_numpy():
    """float -> __half rounds to nearest even: ties, overflow to inf, subnormal halves, NaN."""
    emu = cuda_emu.load_source(SOURCE, "emulator_features.cu")
    x = np.array([0.0, -0.0, 1.0, 1 + 2**-11, 1 + 3 * 2**-11, 65504, 65519.9, 65520, 1e6, -1e6,
                  2**-24, 2**-25, 3 * 2**-26, 1e-30, np.nan, np.inf, 0.1, -3.14159], dtype=np.float32)
    out, back = np.zeros(x.size, np.float16), np.zeros(x.size, np.float32)
    emu.launch("to_half", (1, 1, 1), (32, 1, 1), (x, out, back, np.int32(x.size)))
    with np.errstate(over="ignore"):  # 65520 and 1e6 overflow to inf, on purpose
        expected = x.astype(np.float16)
    np.testing.assert_array_equal(out.view(np.uint16)[~np.isnan(x)], expected.view(np.uint16)[~np.isnan(x)])
    assert np.isnan(out[np.isnan(x)]).all()
    np.testing.assert_array_equal(back, out.astype(np.float32))


@pytest.mark.parametrize("feature", ["__ballot_sync(0xffffffffu, 1)", "__activemask()", "__any_sync(0xffffffffu, 1)"])
def test_an_unsupported_intrinsic_fails_to_build_and_says_so(feature):
    name = feature.split("(")[0]
    source = f'extern "C" __global__ void k(unsigned* out) {{ out[threadIdx.x] = {feature}; }}\n'
    with pytest.raises(EmulatorBuildError, match=f"cuda_emu: {name} is not supported by the CPU emulator"):
        cuda_emu.load_source(source, f"uses_{name.strip('_')}.cu")


def test_cooperative_groups_fail_to_build_and_say_so():
    source = '#include <cooperative_groups.h>\nextern "C" __global__ void k(float* x) { x[0] = 1; }\n'
    with pytest.raises(EmulatorBuildError, match="cuda_emu: cooperative groups are not supported"):
        cuda_emu.load_source(source, "uses_cg.cu")


def test_launch_limits_and_argument_types_are_checked(emu):
    out = np.zeros(64, np.float32)
    with pytest.raises(EmulatorLaunchError, match="grid or block too large"):
        emu.launch("count", (1, 1, 1), (2048, 1, 1), (np.zeros(1, np.int32), out))
    with pytest.raises(EmulatorLaunchError, match="48 KiB"):
        emu.launch("read_unwritten_shared", (1, 1, 1), (32, 1, 1), (out, out), shared_mem=49 * 1024)
    with pytest.raises(EmulatorLaunchError, match="argument 1 is a float64 array, the kernel takes f32"):
        emu.launch("reverse_static", (1, 1, 1), (64, 1, 1), (out, out.astype(np.float64)))
    with pytest.raises(EmulatorLaunchError, match="argument 4 is i64, the kernel takes i32"):
        emu.launch("shfl", (1, 1, 1), (32, 1, 1), (out, out, np.int32(0), np.int32(1), np.int64(32)))
    with pytest.raises(EmulatorLaunchError, match="takes 2 arguments, got 1"):
        emu.launch("reverse_static", (1, 1, 1), (64, 1, 1), (out,))
    assert emu.signature("shfl") == ["f32*", "f32*", "i32", "i32", "i32"]


def test_a_build_is_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIFT_CACHE", str(tmp_path))
    source = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] = 2.0f; }\n'
    unit = cuda_emu.translation_unit(source, "cached.cu")
    first = cuda_emu._build(unit, "cached")
    stamp = first.stat().st_mtime_ns
    assert cuda_emu._build(unit, "cached") == first and first.stat().st_mtime_ns == stamp
    changed = cuda_emu._build(cuda_emu.translation_unit(source.replace("2.0f", "3.0f"), "cached.cu"), "cached")
    assert changed != first and len(list(tmp_path.rglob("*.so"))) == 2
