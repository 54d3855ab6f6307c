// cooperative_groups.h for the CPU emulator: not emulated, so a kernel that includes it fails to
// build, saying why (rather than with a wall of errors about undeclared names).
#pragma once
#error "cuda_emu: cooperative groups are not supported by the CPU emulator"
