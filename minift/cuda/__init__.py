"""The CUDA kernels of ``kernels/*.cu`` from Python: on a GPU through CuPy, elsewhere on the CPU.

Reading order: ``kernels.py`` (one function per kernel: argument checks, grid, launch),
``emulator.py`` (g++ builds the same .cu file against ``kernels/emu/cuda_emu.h``),
``reference.py`` (the NumPy definition each kernel is tested against) and ``check.py``
(``minift kernels check``: every kernel on every path against its reference).

Layer 3 of minift (docs/design.md): below it only the ground floor, autograd's op counter and
the NF4 format of ``minift.quant``; the layers above (``nn``, ``peft``, ``serve``) call it.
"""

from minift.cuda.kernels import KernelArgumentError, lora_kernels

__all__ = ["KernelArgumentError", "lora_kernels"]
