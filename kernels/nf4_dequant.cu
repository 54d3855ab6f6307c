/*
NF4 dequantization, blockwise, with or without double-quantized absmax (QLoRA, Dettmers et al.
2023; lecture 004: "the 4-bit base weights are dequantized on the fly, in small blocks").

The layout is bitsandbytes' (minift/quant/nf4.py builds it; its dequantize is the reference):

    packed     (n / 2,) uint8        two 4-bit codes per byte, element 2i in the HIGH nibble
    absmax     (n_blocks,) float32   one scale per block of `blocksize` consecutive elements
                                     (n is a whole number of blocks, blocksize even, as nf4.py has it)
    w[i]       = NF4[q_i] * absmax[i / blocksize]          NF4 = the 16 code values below

Double quantization stores the absmax themselves in 8 bits, in nested blocks of 256:

    absmax_q   (n_blocks,) uint8     index into code2, bitsandbytes' 256-entry dynamic map
    absmax2    (ceil(n_blocks / nested_blocksize),) float32
    absmax[b]  = code2[absmax_q[b]] * absmax2[b / nested_blocksize] + offset

Every product and sum is rounded on its own (__fmul_rn, __fadd_rn): nvcc would otherwise fuse
a * b + c into one FMA with a single rounding, and the result would no longer equal NumPy's bit
for bit. Output is float32, or __half rounded to nearest even from the float32 value.

Thread mapping: one thread per packed byte (two outputs), NF4_THREADS per block. Every block
first copies the 16 NF4 values (and for the nested kernels the 256 code2 values) from constant /
global memory into shared memory: the 32 lanes of a warp look up 32 *different* codes, which
constant memory would serialize and shared memory serves in one pass. Dynamic shared memory,
16 or 16 + 256 floats.

Kernels: nf4_dequant_{f32,f16} (plain absmax), nf4_dequant_nested_{f32,f16} (double quantized),
nf4_absmax_nested (only the absmax, for nf4_gemv.cu). One version each: a v2 would have each
thread decode 4 bytes (uchar4 load, 8 outputs, two float4 stores).

Roofline, per element: 0.5 byte of codes + 4 / blocksize of absmax (nested: 1 / blocksize
+ 4 / (256 blocksize)) read, 4 bytes (f32) or 2 bytes (f16) written, 1 flop. Pure bandwidth:
the goal is ~4.5 (f32) or ~2.5 (f16) bytes per element at the device's copy bandwidth.
*/

#include <cuda_fp16.h>

#define NF4_THREADS 256
#define NF4_CODES 16
#define CODE2_SIZE 256

// bitsandbytes' NF4 values (quantiles of N(0, 1), scaled to [-1, 1]); minift/quant/nf4.py has the
// same 16 numbers and a test checks they agree.
__constant__ float NF4[NF4_CODES] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

__device__ __forceinline__ void store(float* out, float v) { *out = v; }
__device__ __forceinline__ void store(__half* out, float v) { *out = __float2half(v); }

// table[0:16] = NF4, table[16:272] = code2 (when given). Ends with a barrier: the block reads it next.
__device__ __forceinline__ void load_tables(float* table, const float* code2) {
    const int size = NF4_CODES + (code2 ? CODE2_SIZE : 0);
    for (int i = threadIdx.x; i < size; i += blockDim.x) table[i] = i < NF4_CODES ? NF4[i] : code2[i - NF4_CODES];
    __syncthreads();
}

// absmax[b] of the nested layout.
__device__ __forceinline__ float nested_absmax(const float* code2_table, const unsigned char* absmax_q,
                                               const float* absmax2, float offset, int b, int nested_blocksize) {
    return __fadd_rn(__fmul_rn(code2_table[absmax_q[b]], absmax2[b / nested_blocksize]), offset);
}

// The two elements of packed byte `byte`: high nibble first. blocksize is even, so both share a block.
template <typename Out>
__device__ __forceinline__ void decode_byte(const float* nf4, unsigned char q, float scale, Out* out, int byte) {
    store(out + 2 * byte, __fmul_rn(nf4[q >> 4], scale));
    store(out + 2 * byte + 1, __fmul_rn(nf4[q & 15], scale));
}

// grid ceil(n / 2 / NF4_THREADS); dynamic shared memory NF4_CODES floats.
template <typename Out>
__device__ __forceinline__ void dequant(const unsigned char* packed, const float* absmax, Out* out, int n, int blocksize) {
    extern __shared__ float table[];
    load_tables(table, nullptr);
    const int byte = blockIdx.x * blockDim.x + threadIdx.x;
    if (2 * byte < n) decode_byte(table, packed[byte], absmax[2 * byte / blocksize], out, byte);
}

// As dequant, the absmax decoded first; dynamic shared memory NF4_CODES + CODE2_SIZE floats.
template <typename Out>
__device__ __forceinline__ void dequant_nested(const unsigned char* packed, const unsigned char* absmax_q,
                                               const float* code2, const float* absmax2, float offset, Out* out,
                                               int n, int blocksize, int nested_blocksize) {
    extern __shared__ float table[];
    load_tables(table, code2);
    const int byte = blockIdx.x * blockDim.x + threadIdx.x;
    if (2 * byte >= n) return;
    const float scale = nested_absmax(table + NF4_CODES, absmax_q, absmax2, offset, 2 * byte / blocksize, nested_blocksize);
    decode_byte(table, packed[byte], scale, out, byte);
}

extern "C" __global__ void nf4_dequant_f32(const unsigned char* __restrict__ packed, const float* __restrict__ absmax,
                                           float* __restrict__ out, int n, int blocksize) {
    dequant(packed, absmax, out, n, blocksize);
}

extern "C" __global__ void nf4_dequant_f16(const unsigned char* __restrict__ packed, const float* __restrict__ absmax,
                                           __half* __restrict__ out, int n, int blocksize) {
    dequant(packed, absmax, out, n, blocksize);
}

extern "C" __global__ void nf4_dequant_nested_f32(const unsigned char* __restrict__ packed,
                                                  const unsigned char* __restrict__ absmax_q,
                                                  const float* __restrict__ code2, const float* __restrict__ absmax2,
                                                  float offset, float* __restrict__ out, int n, int blocksize,
                                                  int nested_blocksize) {
    dequant_nested(packed, absmax_q, code2, absmax2, offset, out, n, blocksize, nested_blocksize);
}

extern "C" __global__ void nf4_dequant_nested_f16(const unsigned char* __restrict__ packed,
                                                  const unsigned char* __restrict__ absmax_q,
                                                  const float* __restrict__ code2, const float* __restrict__ absmax2,
                                                  float offset, __half* __restrict__ out, int n, int blocksize,
                                                  int nested_blocksize) {
    dequant_nested(packed, absmax_q, code2, absmax2, offset, out, n, blocksize, nested_blocksize);
}

// absmax[b] for b < n_blocks, one thread each (code2 read through the cache, no table needed).
extern "C" __global__ void nf4_absmax_nested(const unsigned char* __restrict__ absmax_q,
                                             const float* __restrict__ code2, const float* __restrict__ absmax2,
                                             float offset, float* __restrict__ absmax, int n_blocks,
                                             int nested_blocksize) {
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b < n_blocks) absmax[b] = nested_absmax(code2, absmax_q, absmax2, offset, b, nested_blocksize);
}
