/*
BGMV: batched gather matrix-vector products — many LoRA adapters in one batch (lecture 004;
Punica, Chen et al. 2023; S-LoRA, Sheng et al. 2023).

A server keeps one base model and a stack of adapters. Each row i of a batch (one token of one
request) names its adapter a = idx[i], or -1 for the base model alone. The base product x W^T runs
once for the whole batch; this kernel adds each row's own low-rank update in a single launch:

    a = idx[i] >= 0:   y[i, :] += scale[a] * B[a] (A[a] x[i, :])
    a = idx[i] == -1:  y[i, :] unchanged

    x: (M, K)   A: (n_adapters, R, K)   B: (n_adapters, N, R)   idx: (M,) int32
    scale: (n_adapters,) float32 (alpha / r per adapter)   y: (M, N)   all row-major

"Gather": the rows of one adapter are not contiguous in the batch, so instead of one matmul per
adapter the kernel gathers the weights A[idx[i]], B[idx[i]] per row. Rows that share an adapter
read the same weights, which then come from L2.

Different ranks. All adapters in a stack share R. An adapter of rank r < R is padded: rows
r..R-1 of its A and columns r..R-1 of its B are zero, which adds exact zeros to t and to y — the
result is unchanged, the cost is that of rank R. (S-LoRA's MBGMV kernel avoids the padding by
giving each adapter its own rank and offsets into one memory pool; Punica pads.)

Thread mapping: grid = M blocks, one per row i (a token in decode), BGMV_THREADS threads.
    phase 1  t[j] = dot(x[i, :], A[a][j, :]), j < R: warp w takes j = w, w + 8, ...; the lanes
             read consecutive k (coalesced) and combine with __shfl_xor_sync; t is kept in shared
             memory (R floats of dynamic shared memory), already multiplied by scale[a].
    phase 2  thread n (n = threadIdx.x, + blockDim.x ...) writes y[i, n] += sum_j t[j] B[a][n, j].
A row with idx -1 returns at once — the whole block together, before any barrier.

Roofline, per row with an adapter: bytes 4 (K + R K + N R + 2 N) — the weights dominate,
flops 2 R (K + N): about 0.5 flop/byte, far below any GPU's ridge point. BGMV is bound by
reading adapter weights; batching many rows that share adapters is what lets L2 absorb those reads.
*/

#define WARP 32
#define BGMV_THREADS 256

// All-reduce over a warp: after the 5 butterfly steps every lane holds the total.
__device__ __forceinline__ float warp_allsum(float v) {
    for (int mask = WARP / 2; mask > 0; mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, mask);
    return v;
}

extern "C" __global__ void bgmv(const float* __restrict__ x, const float* __restrict__ A, const float* __restrict__ B,
                                const int* __restrict__ idx, const float* __restrict__ scale, float* __restrict__ y,
                                int K, int N, int R) {
    extern __shared__ float t[];  // (R,): this row's low-rank middle, times scale[a]
    const int i = blockIdx.x;
    const int a = idx[i];
    if (a < 0) return;  // no adapter: the row keeps the base output
    const float* xr = x + (size_t)i * K;
    const float* Aa = A + (size_t)a * R * K;
    const float* Ba = B + (size_t)a * N * R;
    const int lane = threadIdx.x % WARP;
    for (int j = threadIdx.x / WARP; j < R; j += blockDim.x / WARP) {
        float acc = 0.0f;
        for (int k = lane; k < K; k += WARP) acc += xr[k] * Aa[(size_t)j * K + k];
        acc = warp_allsum(acc);
        if (lane == 0) t[j] = scale[a] * acc;
    }
    __syncthreads();
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < R; ++j) acc += t[j] * Ba[(size_t)n * R + j];
        y[(size_t)i * N + n] += acc;
    }
}
