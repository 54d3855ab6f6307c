"""Keep freed array memory inside the process: a third of a CPU training step was page faults.

A training step allocates every activation afresh in the forward pass and frees it in the
backward pass, a few hundred megabytes per step for SmolLM2 at batch 4 x 128. NumPy asks the C
library's ``malloc`` for that memory, and glibc serves any request above its *mmap threshold*
(128 KiB at start) with a fresh ``mmap`` and gives it back to the kernel with ``munmap`` on
free. The next step then touches brand-new pages again: one page fault per 4 KiB, and the kernel
zero-fills every page first. Measured on SmolLM2 with one BLAS thread, a LoRA step took 6.2 s
with glibc's defaults and 4.3 s after :func:`keep_freed_memory` — the elementwise ops (SiLU,
RMSNorm, adds, RoPE) were mostly waiting for fresh pages.

:func:`keep_freed_memory` raises the mmap threshold to its largest value (32 MiB on 64-bit
glibc) and stops ``free`` from trimming the heap, so freed activations are reused by the next
step's allocations. The cost: the process keeps its peak memory instead of returning it to
the system between steps (the peak itself does not change). It is a process-wide setting, so
minift applies it where a long training or benchmark run starts (``Trainer`` and the CLI), not
on import. PyTorch's CPU allocator faces the same faults; ``benchmarks/step_vs_torch.py``
reports both libraries with and without the setting.

On anything but glibc (macOS, musl) there is no ``mallopt`` and the call does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: 32 MiB, the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2). Larger
#: arrays (the 100 MB logits of a 49k vocabulary) are still mapped and unmapped each time.
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the top of the heap is given back to the system only above 1 GiB.
TRIM_THRESHOLD = 1024 * 1024 * 1024

_applied = False


def _glibc_mallopt():
    """glibc's ``mallopt`` function, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None)
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory for reuse (see the module docstring).

    Returns True when the setting is in effect (now or from an earlier call), False when this C
    library has no ``mallopt``. Calling it again does nothing more.
    """
    global _applied
    if _applied:
        return True
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
