// mma.h (warp matrix multiply-accumulate, tensor cores) for the CPU emulator: not emulated.
#pragma once
#error "cuda_emu: warp matrix functions (mma.h / wmma) are not supported by the CPU emulator"
