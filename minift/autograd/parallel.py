"""Elementwise work over row blocks, on as many threads as the matrix products use.

NumPy's BLAS multiplies matrices on several threads (``minift --threads``), but its ufuncs
(``exp``, ``+``, ``*``, a sum along the last axis) run on the calling thread alone. They do release
the GIL on large arrays, so Python threads working on *different rows* of the same arrays run
side by side. ``over_row_blocks`` is the one place that does this: it cuts the leading axis into
contiguous blocks and hands each to a thread of one shared pool, the first to the calling thread.

Why the result is the same bit for bit as one call on all rows: every block is a view into the
very same buffers, so each row is the same numbers at the same addresses, and a function that
works row by row (elementwise arithmetic, a reduction along a *later* axis) does the same
floating-point operations on it whichever block it lands in. A reduction *over rows* would
not be the same (its summation order would depend on the blocks); callers keep those serial.

This module also owns "how many threads": ``blas_threads``, which the NF4 decoder
(``minift/quant/nf4.py``) uses too, so one setting governs all of a step's multi-threaded work.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy

#: Fewest elements worth handing to another thread. Measured on the 2-core machine of
#: docs/benchmarks.md (a float32 ``exp`` or SiLU over a (64, n / 64) array through this function,
#: one thread vs two, best of 50 calls, machine quiet): handing a block to the pool and
#: collecting it costs ~60 us there, so two threads *lose* up to 2^16 elements per thread
#: (0.4-0.6x at 2^15, 0.7-0.85x at 2^16), win a little at 2^17 (1.2x) and clearly at 2^19
#: (1.7-1.9x). When other jobs share
#: the cores the handover costs more (RMSNorm split at 2^17 per thread measured 0.86x), hence
#: 2^18. At SmolLM2's 4 x 128 tokens this splits the MLP's arrays (786k elements), attention's
#: scores (590k) and the head's logit chunks (2M), not the residual stream's (295k: RMSNorm,
#: RoPE, which split from 8 x 128 tokens); a single token's arrays (generation) never.
MIN_ELEMENTS_PER_THREAD = 1 << 18


def blas_threads() -> int:
    """The number of threads NumPy's BLAS multiplies matrices with: what ``minift --threads``
    (``threadpoolctl.threadpool_limits``) sets, or the BLAS library's own default.
    threadpoolctl is imported here, on first use, so that ``import minift.autograd`` loads NumPy
    alone."""
    return max((lib.num_threads for lib in _blas_controllers()), default=1)


@functools.cache
def _blas_controllers() -> tuple:
    from threadpoolctl import ThreadpoolController  # noqa: PLC0415 - lazy, see blas_threads

    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


@functools.cache
def _thread_pool() -> ThreadPoolExecutor:
    """One pool for the whole process, as large as the machine; each call uses what it asks for."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="minift-rows")


def row_blocks(rows: int, size: int, threads: int | None = None) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` blocks covering ``rows`` rows of an array of ``size``
    elements: one per thread (``threads``, default ``blas_threads()``), at most one per row, and
    each at least ``MIN_ELEMENTS_PER_THREAD`` elements, so small arrays get a single block."""
    count = max(1, min(threads or blas_threads(), rows, size // MIN_ELEMENTS_PER_THREAD))
    edges = [rows * i // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def over_row_blocks(fn, *arrays, threads: int | None = None) -> None:
    """Call ``fn(*(a[start:stop] for a in arrays))`` for the row blocks of ``arrays`` (all with
    the same leading axis; outputs are among them, preallocated by the caller; a None, an output
    not wanted, is passed as None) and return when all are done. One block, i.e. ``fn(*arrays)``,
    is the reference; it is what runs on CuPy arrays (a GPU parallelises each kernel itself)
    and on arrays too small to split.

    ``fn`` must work row by row (see the module docstring) and must not write rows outside
    its block. Arguments that are not split (a norm's weight, a broadcast table) are bound with
    ``functools.partial``."""
    first = next(a for a in arrays if a is not None)
    if not isinstance(first, numpy.ndarray) or first.ndim == 0:  # a device array, or a scalar: no rows
        fn(*arrays)
        return
    blocks = row_blocks(first.shape[0], first.size, threads)
    others = [_thread_pool().submit(fn, *_block(arrays, start, stop)) for start, stop in blocks[1:]]
    try:
        fn(*_block(arrays, *blocks[0]))  # the calling thread takes the first block
    finally:  # even if it failed: no task may still be writing when this returns
        for task in others:
            task.result()


def _block(arrays, start: int, stop: int) -> list:
    return [None if a is None else a[start:stop] for a in arrays]
