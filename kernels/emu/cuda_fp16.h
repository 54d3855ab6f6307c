// cuda_fp16.h for the CPU emulator: the 16-bit float type __half and its conversions.
//
// A kernel writes `#include <cuda_fp16.h>`; NVRTC finds CUDA's header, g++ finds this one (the
// emulator build puts kernels/emu first on the include path). The storage is GCC's _Float16 —
// IEEE binary16, the same 2 bytes as CUDA's __half and NumPy's float16 — and float -> half
// rounds to nearest even, as __float2half does.
#pragma once

struct __half {
    _Float16 value;
    __half() = default;
    __half(float f) : value(static_cast<_Float16>(f)) {}
    operator float() const { return static_cast<float>(value); }
};
static_assert(sizeof(__half) == 2, "__half must be 2 bytes");
typedef __half half;

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
