// nf4_decode_cpu.cpp — QLoRA's NF4 decode as a plain compiled loop for the CPU (not a CUDA kernel).
//
// Math: w[i] = code[q[i]] * absmax[i / blocksize], one float32 multiply per weight, the codes
// packed two per byte, the first in the high nibble (minift/quant/nf4.py, ``dequantize_nf4``).
// The absmax values arrive already decoded to float32 (double quantization is undone in Python,
// ``block_absmax``: it touches one value per block, 1/64 of the work), so this file only does
// the per-weight part — and does it bit for bit as the reference does.
//
// The loop: for each block, first the 16 levels times that block's absmax (16 products — the
// same float32 products the reference makes, since code[q] * a depends only on q and a), then
// each byte writes its two weights straight from that small table. For the default block of 64
// weights that is 16 multiplies instead of 64, and the inner loop has no multiply at all.
//
// Three versions of that block loop; each call runs the best one the CPU supports:
// * decode_blocks_plain, one byte at a time: the definition, and what any CPU runs;
// * decode_blocks_avx512, 16 bytes (32 weights) at a time: the 16 scaled levels fill exactly one
//   512-bit register, so ``vpermps`` (_mm512_permutexvar_ps) looks up 16 codes in one
//   instruction. The codes are first put in weight order (high nibble, low nibble, next byte...)
//   with SSE2 byte shuffles, so the looked-up floats are stored as they come;
// * decode_blocks_avx2, the same with 256-bit registers: the 16 levels take two, so each code
//   is looked up in both (_mm256_permutevar8x32_ps uses its low 3 bits) and bit 3 picks the
//   half (_mm256_blendv_ps reads the sign bit, so the code is shifted left by 28 first).
// Every NF4 block size (32..4096) is a whole number of 32-weight steps. No -march flag is
// needed: only these functions are compiled for AVX2 / AVX-512 (GCC's target attribute), and
// they are only called where the CPU has them (__builtin_cpu_supports).
//
// Threads: the blocks are split into ``threads`` contiguous ranges, one std::thread each (the
// calling thread takes the first range). std::thread rather than OpenMP because the process
// already holds OpenBLAS's threads (and PyTorch's OpenMP runtime when bitsandbytes is loaded):
// a second OpenMP runtime's idle workers spin after every parallel region, taking a core from
// the BLAS on a machine this small, and two OpenMP runtimes in one process is a known hazard.
// A thread start costs tens of microseconds; the Python side gives each thread at least
// MIN_WEIGHTS_PER_THREAD (2^18) weights, about 50 us of this loop's work at 20 GB/s.
//
// Bytes moved per weight: 0.5 read (codes) + 4 written (float32): bound by memory writes.

#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

void decode_blocks_plain(const uint8_t* __restrict packed, const float* absmax, const float* code,
                         int64_t first_block, int64_t last_block, int32_t blocksize, float* __restrict out) {
    const int64_t bytes_per_block = blocksize / 2;
    float scaled[16];
    for (int64_t block = first_block; block < last_block; ++block) {
        for (int q = 0; q < 16; ++q) scaled[q] = code[q] * absmax[block];
        const uint8_t* bytes = packed + block * bytes_per_block;
        float* weights = out + block * blocksize;
        for (int64_t j = 0; j < bytes_per_block; ++j) {
            weights[2 * j] = scaled[bytes[j] >> 4];
            weights[2 * j + 1] = scaled[bytes[j] & 15];
        }
    }
}

#if defined(__x86_64__)
// The codes of 32 weights, in weight order, from 16 bytes: (first 16 codes, next 16 codes).
inline void codes_in_order(const uint8_t* bytes, __m128i& first16, __m128i& next16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
    const __m128i low_nibble = _mm_set1_epi8(15);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(b, 4), low_nibble);
    const __m128i low = _mm_and_si128(b, low_nibble);
    first16 = _mm_unpacklo_epi8(high, low);  // h0 l0 h1 l1 ... h7 l7
    next16 = _mm_unpackhi_epi8(high, low);   // h8 l8 ... h15 l15
}

__attribute__((target("avx512f"))) void decode_blocks_avx512(const uint8_t* __restrict packed, const float* absmax,
                                                             const float* code, int64_t first_block,
                                                             int64_t last_block, int32_t blocksize,
                                                             float* __restrict out) {
    const __m512 levels = _mm512_loadu_ps(code);
    for (int64_t block = first_block; block < last_block; ++block) {
        const __m512 scaled = _mm512_mul_ps(levels, _mm512_set1_ps(absmax[block]));
        const uint8_t* bytes = packed + block * (blocksize / 2);
        float* weights = out + block * blocksize;
        for (int32_t j = 0; j < blocksize / 2; j += 16, weights += 32) {
            __m128i first16, next16;
            codes_in_order(bytes + j, first16, next16);
            _mm512_storeu_ps(weights, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(first16), scaled));
            _mm512_storeu_ps(weights + 16, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(next16), scaled));
        }
    }
}

// 8 weights from the 8 codes in the low half of ``codes``: levels 0-7 or 8-15 by bit 3.
__attribute__((target("avx2"))) inline __m256 lookup8(__m128i codes, __m256 scaled_low, __m256 scaled_high) {
    const __m256i index = _mm256_cvtepu8_epi32(codes);
    const __m256 is_high = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(scaled_low, index),
                            _mm256_permutevar8x32_ps(scaled_high, index), is_high);
}

__attribute__((target("avx2"))) void decode_blocks_avx2(const uint8_t* __restrict packed, const float* absmax,
                                                        const float* code, int64_t first_block, int64_t last_block,
                                                        int32_t blocksize, float* __restrict out) {
    const __m256 levels_low = _mm256_loadu_ps(code), levels_high = _mm256_loadu_ps(code + 8);
    for (int64_t block = first_block; block < last_block; ++block) {
        const __m256 a = _mm256_set1_ps(absmax[block]);
        const __m256 scaled_low = _mm256_mul_ps(levels_low, a), scaled_high = _mm256_mul_ps(levels_high, a);
        const uint8_t* bytes = packed + block * (blocksize / 2);
        float* weights = out + block * blocksize;
        for (int32_t j = 0; j < blocksize / 2; j += 16, weights += 32) {
            __m128i first16, next16;
            codes_in_order(bytes + j, first16, next16);
            _mm256_storeu_ps(weights, lookup8(first16, scaled_low, scaled_high));
            _mm256_storeu_ps(weights + 8, lookup8(_mm_srli_si128(first16, 8), scaled_low, scaled_high));
            _mm256_storeu_ps(weights + 16, lookup8(next16, scaled_low, scaled_high));
            _mm256_storeu_ps(weights + 24, lookup8(_mm_srli_si128(next16, 8), scaled_low, scaled_high));
        }
    }
}
#endif

using BlockDecoder = void (*)(const uint8_t*, const float*, const float*, int64_t, int64_t, int32_t, float*);

// The version called ``name`` ("plain", "avx2", "avx512"), or the best one for this block size
// on this CPU when ``name`` is empty; nullptr when the CPU lacks the named one.
BlockDecoder find_decoder(const std::string& wanted, int32_t blocksize) {
    const bool best = wanted.empty();
#if defined(__x86_64__)
    const bool steps_fit = blocksize % 32 == 0;
    if ((best || wanted == "avx512") && steps_fit && __builtin_cpu_supports("avx512f")) return decode_blocks_avx512;
    if ((best || wanted == "avx2") && steps_fit && __builtin_cpu_supports("avx2")) return decode_blocks_avx2;
#else
    (void)blocksize;
#endif
    return best || wanted == "plain" ? decode_blocks_plain : nullptr;
}

}  // namespace

// packed: n_blocks * blocksize / 2 bytes; absmax: n_blocks float32; code: the 16 levels;
// out: n_blocks * blocksize float32; version: "" for the best, or one by name (the tests compare
// them all). Returns 0; -1 for arguments it cannot decode; -2 for a version this CPU lacks.
extern "C" int nf4_decode_f32(const uint8_t* packed, const float* absmax, const float* code, int64_t n_blocks,
                              int32_t blocksize, float* out, int32_t threads, const char* version) {
    if (n_blocks < 0 || blocksize <= 0 || blocksize % 2 || threads < 1) return -1;
    const BlockDecoder decode = find_decoder(version, blocksize);
    if (decode == nullptr) return -2;
    const int64_t parts = threads < n_blocks ? threads : (n_blocks > 0 ? n_blocks : 1);
    std::vector<std::thread> others;
    for (int64_t part = 1; part < parts; ++part) {
        others.emplace_back(decode, packed, absmax, code, n_blocks * part / parts, n_blocks * (part + 1) / parts,
                            blocksize, out);
    }
    decode(packed, absmax, code, 0, n_blocks / parts, blocksize, out);
    for (std::thread& other : others) other.join();
    return 0;
}

// The name of the version nf4_decode_f32 runs by default for this block size on this CPU.
extern "C" const char* nf4_decode_best_version(int32_t blocksize) {
    const BlockDecoder best = find_decoder("", blocksize);
#if defined(__x86_64__)
    if (best == decode_blocks_avx512) return "avx512";
    if (best == decode_blocks_avx2) return "avx2";
#endif
    return "plain";
}
