/*
LoRA's two thin matrix products, forward and backward (lectures 003 and 004).

A frozen linear layer y = x W^T gets a low-rank update of rank R:

    t = x A^T                (M, R)   "shrink":  K numbers per row  -> R numbers
    y += s * t B^T           (M, N)   "expand":  R numbers per row  -> N numbers

    x: (M, K) rows = tokens (M = batch * time), K = d_in
    A: (R, K)   B: (N, R)   N = d_out   s = alpha / r      all row-major float32

The d_out x d_in matrix B A is never formed: shrink costs 2 M K R flops, expand 2 M R N.

Backward. With g = dL/dy (M, N) and u = g B (M, R) (the gradient reaching t is s u):

    dB = s g^T t     (N, R)      dL/dB[n, j] = s sum_m g[m, n] t[m, j]
    dA = s u^T x     (R, K)      dL/dA[j, k] = s sum_m u[m, j] x[m, k]
    dx = s u A       (M, K)      dL/dx[m, k] = s sum_j u[m, j] A[j, k]   (added to the base's W^T g)

Each is one of the kernels below: u = g B is a shrink (with B^T as the "A"), dx an expand
(with A^T as the "B"), dA and dB are lora_grad_weight (C = s U^T V, a reduction over the M rows).
minift/cuda/kernels.py launches them; minift/cuda/reference.py is the NumPy definition of each.

Kernels and versions
    lora_shrink_v1     one thread per output t[m, j], a serial loop over K. The 32 threads of a
                       warp read 32 *different* rows of A at the same k: strided, uncoalesced.
    lora_shrink_v2     (chosen) one warp per output: the lanes read 32 consecutive floats of the
                       x row and of the A row (one 128-byte transaction each), then add their 32
                       partial sums with __shfl_down_sync. Consecutive warps take consecutive j of
                       the same row m, so the x row is reused from L1/L2.
    lora_expand        grid (N / 256, M / TILE_M): a block stages TILE_M rows of t in shared
                       memory, then each thread owns one column n for those TILE_M rows
                       (TILE_M accumulators in registers, each B[n, :] read once per block).
                       accumulate = 0 writes y = s t B^T (y is not read), 1 adds to y.
    lora_fused         shrink + expand in one launch, t never goes to global memory: a block
                       computes its TILE_M x R tile of t into shared memory (one warp per output,
                       as v2), then sweeps all N columns for those rows. The grid is M / TILE_M
                       blocks, so it needs M in the hundreds to fill a GPU; with small M (decode)
                       use shrink + expand, whose expand grid also spans N.
    lora_grad_weight   C = s U^T V, (P, Q) = sum over M rows: 16 x 16 output tile per block, the
                       M axis walked in 16-row steps through two shared-memory tiles. (A faster
                       version would give each thread a 4 x 4 register tile, as in SGEMM.)

Roofline (float32; A100: 19.5 TFLOP/s, ~1.5 TB/s, ridge ~13 flop/byte; H100 SXM ~67 / 3.35)
    shrink   bytes 4 (M K + R K + M R)        flops 2 M K R     intensity ~ R / 2 for M >> R
    expand   bytes 4 (M R + N R + 2 M N)      flops 2 M R N     intensity ~ R / 4  (y read + written)
    fused    bytes 4 (M K + R K + N R + 2 M N) flops 2 M R (K + N): saves the 8 M R bytes of t
    grad_w   bytes 4 (M P + M Q + P Q)        flops 2 M P Q
With the usual R = 8..64, every one of them is memory-bound (intensity below the ridge): the
goal is to stream x, y and g once at full bandwidth; the small A and B stay in L2.
*/

#define WARP 32
#define SHRINK_V1_THREADS 256  // v1: threads per block, one output each
#define SHRINK_THREADS 256     // v2 and fused phase 1: 8 warps, one output per warp
#define EXPAND_THREADS 256     // expand / fused phase 2: one column n per thread
#define TILE_M 16              // rows of t per expand / fused block (registers per thread)
#define GW_TILE 16             // grad_weight: 16 x 16 outputs, 16 x 16 threads

// Sum over the 32 lanes of a warp in log2(32) = 5 steps; lane 0 ends up with the total.
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = WARP / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

// dot(a[0:K], b[0:K]) by the 32 lanes of one warp; the result is valid in lane 0.
__device__ __forceinline__ float warp_dot(const float* __restrict__ a, const float* __restrict__ b, int K, int lane) {
    float acc = 0.0f;
    for (int k = lane; k < K; k += WARP) acc += a[k] * b[k];
    return warp_sum(acc);
}

extern "C" __global__ void lora_shrink_v1(const float* __restrict__ x, const float* __restrict__ A,
                                          float* __restrict__ t, int M, int K, int R) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;  // i = m * R + j
    if (i >= M * R) return;
    const float* xr = x + (size_t)(i / R) * K;
    const float* ar = A + (size_t)(i % R) * K;
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) acc += xr[k] * ar[k];
    t[i] = acc;
}

extern "C" __global__ void lora_shrink_v2(const float* __restrict__ x, const float* __restrict__ A,
                                          float* __restrict__ t, int M, int K, int R) {
    const int lane = threadIdx.x % WARP;
    const int i = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;  // this warp's output m * R + j
    if (i >= M * R) return;  // the whole warp leaves together, so no shuffle is left half-attended
    const float acc = warp_dot(x + (size_t)(i / R) * K, A + (size_t)(i % R) * K, K, lane);
    if (lane == 0) t[i] = acc;
}

// Phase 2 of expand and fused: with ts = t[m0 : m0 + rows, :] in shared memory, this thread
// computes y[m0 + mi, n] for its column n and all rows mi, reading each B[n, j] once.
__device__ __forceinline__ void expand_column(const float* ts, const float* __restrict__ B, float* __restrict__ y,
                                              int m0, int rows, int n, int N, int R, float scale, int accumulate) {
    float acc[TILE_M];
    for (int mi = 0; mi < TILE_M; ++mi) acc[mi] = 0.0f;
    const float* br = B + (size_t)n * R;
    for (int j = 0; j < R; ++j) {
        const float b = br[j];
        for (int mi = 0; mi < TILE_M; ++mi) acc[mi] += ts[mi * R + j] * b;  // same address across the warp: broadcast
    }
    for (int mi = 0; mi < rows; ++mi) {
        float* out = y + (size_t)(m0 + mi) * N + n;  // consecutive threads, consecutive n: coalesced
        *out = accumulate ? *out + scale * acc[mi] : scale * acc[mi];
    }
}

// grid (ceil(N / blockDim.x), ceil(M / TILE_M)), dynamic shared memory TILE_M * R floats.
extern "C" __global__ void lora_expand(const float* __restrict__ t, const float* __restrict__ B, float* __restrict__ y,
                                       int M, int N, int R, float scale, int accumulate) {
    extern __shared__ float ts[];  // (TILE_M, R): the rows of t this block needs
    const int m0 = blockIdx.y * TILE_M;
    const int rows = min(TILE_M, M - m0);
    for (int i = threadIdx.x; i < TILE_M * R; i += blockDim.x)
        ts[i] = i < rows * R ? t[(size_t)m0 * R + i] : 0.0f;  // rows m0.. are contiguous in t
    __syncthreads();
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n < N) expand_column(ts, B, y, m0, rows, n, N, R, scale, accumulate);
}

// grid ceil(M / TILE_M), dynamic shared memory TILE_M * R floats. y += s * (x A^T) B^T.
extern "C" __global__ void lora_fused(const float* __restrict__ x, const float* __restrict__ A,
                                      const float* __restrict__ B, float* __restrict__ y,
                                      int M, int K, int N, int R, float scale) {
    extern __shared__ float ts[];  // (TILE_M, R): this block's tile of t, never written to global memory
    const int m0 = blockIdx.x * TILE_M;
    const int rows = min(TILE_M, M - m0);
    const int lane = threadIdx.x % WARP, warps = blockDim.x / WARP;
    for (int i = threadIdx.x / WARP; i < TILE_M * R; i += warps) {  // phase 1: one warp per t entry
        const int mi = i / R, j = i % R;
        const float acc = mi < rows ? warp_dot(x + (size_t)(m0 + mi) * K, A + (size_t)j * K, K, lane) : 0.0f;
        if (lane == 0) ts[i] = acc;
    }
    __syncthreads();
    for (int n = threadIdx.x; n < N; n += blockDim.x)  // phase 2: the block sweeps all N columns
        expand_column(ts, B, y, m0, rows, n, N, R, scale, 1);
}

// C = s * U^T V: U (M, P), V (M, Q), C (P, Q). grid (ceil(Q / 16), ceil(P / 16)), block (16, 16).
extern "C" __global__ void lora_grad_weight(const float* __restrict__ U, const float* __restrict__ V,
                                            float* __restrict__ C, int M, int P, int Q, float scale) {
    __shared__ float Us[GW_TILE][GW_TILE];  // Us[i][p]: rows m0 + i of U, columns p0 .. p0 + 15
    __shared__ float Vs[GW_TILE][GW_TILE];  // Vs[i][q]: rows m0 + i of V, columns q0 .. q0 + 15
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int p0 = blockIdx.y * GW_TILE, q0 = blockIdx.x * GW_TILE;
    float acc = 0.0f;
    for (int m0 = 0; m0 < M; m0 += GW_TILE) {
        const int m = m0 + ty;  // thread (ty, tx) loads element (ty, tx) of both tiles: rows are coalesced
        Us[ty][tx] = (m < M && p0 + tx < P) ? U[(size_t)m * P + p0 + tx] : 0.0f;
        Vs[ty][tx] = (m < M && q0 + tx < Q) ? V[(size_t)m * Q + q0 + tx] : 0.0f;
        __syncthreads();
        for (int i = 0; i < GW_TILE; ++i) acc += Us[i][ty] * Vs[i][tx];
        __syncthreads();  // everyone is done with the tiles before they are overwritten
    }
    if (p0 + ty < P && q0 + tx < Q) C[(size_t)(p0 + ty) * Q + q0 + tx] = scale * acc;
}
