"""Every kernel test runs once per path: the CPU emulator always, the GPU (CuPy) when present.

``device`` moves test arrays to where the path runs and makes *guarded* outputs: every element
poisoned with NaN before the launch (so an element the kernel forgets to write stays NaN), inside
a larger buffer whose NaN margins must still be NaN afterwards (so a write past either end of the
array is caught, not silently absorbed by neighbouring memory).
"""

import numpy as np
import pytest

from minift.backend import cupy_available, to_numpy

PATHS = ["emulator"] + (["cupy"] if cupy_available() else [])
MARGIN = 64  # elements of poison on each side of a guarded array


class Guarded:
    """A C-contiguous array that is the middle of a NaN-filled buffer."""

    def __init__(self, module, shape, dtype, fill=None):
        size = int(np.prod(shape))
        self.buffer = module.full(size + 2 * MARGIN, np.nan, dtype=dtype)
        self.array = self.buffer[MARGIN:MARGIN + size].reshape(shape)
        if fill is not None:
            self.array[...] = module.asarray(fill)

    def result(self) -> np.ndarray:
        """The array on the host, after checking that nothing was written outside it."""
        buffer = to_numpy(self.buffer)
        assert np.isnan(buffer[:MARGIN]).all() and np.isnan(buffer[-MARGIN:]).all(), "write outside the array"
        return to_numpy(self.array)


class Device:
    def __init__(self, path: str):
        self.path = path
        if path == "cupy":
            import cupy

            self.module = cupy
        else:
            self.module = np

    def put(self, a):
        return self.module.asarray(a)

    def guarded(self, shape, dtype=np.float32, fill=None) -> Guarded:
        return Guarded(self.module, shape, dtype, fill)


@pytest.fixture(params=PATHS, scope="module")
def device(request):
    return Device(request.param)
