/*
Fused NF4 GEMV for 4-bit inference: y = W x for one input row, W read in its 4-bit form.

    W: (N, K) quantized in bitsandbytes' layout (see nf4_dequant.cu): the N * K elements in
       row-major order, packed two per byte (high nibble first), one float32 absmax per block
       of `blocksize` consecutive elements (double-quantized absmax are decoded first, by
       nf4_absmax_nested). K must be even, so every row starts on a byte.
    x: (K,) float32      y: (N,) float32      y[o] = sum_k NF4[q(o, k)] * absmax[(o K + k) / blocksize] * x[k]

Why fuse: dequantizing W to float32 and then multiplying writes and re-reads 4 N K bytes; here
each weight is decoded in registers and used once, so W costs its 0.5 byte per element — 8x less
traffic than a float32 GEMV. That is the point of 4-bit inference at batch size 1: decode is bound
by reading weights, and reading fewer bytes is the speed-up.

Thread mapping: one warp per output row o, NF4_GEMV_THREADS / 32 rows per block. Lane l takes
bytes l, l + 32, ... of row o (coalesced: 32 consecutive bytes per step), decodes both nibbles,
multiplies by the block's absmax and by x, and the warp adds its 32 partial sums with
__shfl_xor_sync. The NF4 codebook sits in shared memory (divergent lookups, see nf4_dequant.cu).
One version: a v2 would load 4 bytes per lane (uchar4) and keep x in shared memory.

Roofline: bytes N K / 2 (codes) + 4 N K / blocksize (absmax) + 4 K (x, from cache) + 4 N (y);
flops 2 N K (+ N K for the scale): ~4-5 flop/byte, memory-bound on every GPU.
*/

#define WARP 32
#define NF4_GEMV_THREADS 256
#define NF4_CODES 16

// The same 16 values as nf4_dequant.cu (a kernel file is self-contained; a test checks both).
__constant__ float NF4_TABLE[NF4_CODES] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// grid ceil(N / (NF4_GEMV_THREADS / 32)), block NF4_GEMV_THREADS.
extern "C" __global__ void nf4_gemv(const unsigned char* __restrict__ packed, const float* __restrict__ absmax,
                                    const float* __restrict__ x, float* __restrict__ y, int N, int K, int blocksize) {
    __shared__ float nf4[NF4_CODES];
    if (threadIdx.x < NF4_CODES) nf4[threadIdx.x] = NF4_TABLE[threadIdx.x];
    __syncthreads();
    const int lane = threadIdx.x % WARP;
    const int o = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (o >= N) return;  // the whole warp together
    const unsigned char* row = packed + (size_t)o * (K / 2);
    float acc = 0.0f;
    for (int b = lane; b < K / 2; b += WARP) {
        const unsigned char q = row[b];
        const float scale = absmax[((size_t)o * K + 2 * b) / blocksize];
        acc += nf4[q >> 4] * scale * x[2 * b] + nf4[q & 15] * scale * x[2 * b + 1];
    }
    for (int mask = WARP / 2; mask > 0; mask /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, mask);
    if (lane == 0) y[o] = acc;
}
