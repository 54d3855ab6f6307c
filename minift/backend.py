"""Array backend: NumPy on the CPU, CuPy on an NVIDIA GPU — one code path for both.

Every array operation in minift goes through ``xp``, a stand-in for the active array module
(``numpy`` or ``cupy``). CuPy copies NumPy's API, so ``xp.exp(a)`` or ``xp.matmul(a, b)`` run on
whichever device holds the data. Pick the backend with ``set_backend("cupy")`` or the
environment variable ``MINIFT_BACKEND=cupy`` before arrays are made.

Asking for CuPy where it cannot work is an error that says what is missing; minift never falls
back to NumPy behind your back, because a silent fallback makes a GPU benchmark measure a CPU.
"""

from __future__ import annotations

import os
import types

import numpy

BACKENDS = ("numpy", "cupy")

_active_name: str = "numpy"
_active_module: types.ModuleType = numpy


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine (package or device missing)."""


def _load_cupy() -> types.ModuleType:
    try:
        import cupy  # noqa: PLC0415 - optional dependency, imported only on request
    except ImportError as exc:
        raise BackendUnavailableError(
            "backend 'cupy' needs the CuPy package, which is not installed. "
            "Install it with: pip install 'minift[gpu]' (a CuPy wheel for CUDA 12), "
            "or unset MINIFT_BACKEND to run on the CPU with NumPy."
        ) from exc
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken: CuPy raises its own error types
        raise BackendUnavailableError(
            f"backend 'cupy' needs an NVIDIA GPU with a working CUDA driver; CuPy reports: {exc}"
        ) from exc
    if n_devices == 0:
        raise BackendUnavailableError("backend 'cupy' needs an NVIDIA GPU; CUDA sees no device.")
    return cupy


def set_backend(name: str) -> types.ModuleType:
    """Make ``name`` ("numpy" or "cupy") the active array module and return it."""
    global _active_name, _active_module
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    _active_module = numpy if name == "numpy" else _load_cupy()
    _active_name = name
    return _active_module


def get_backend() -> str:
    """Name of the active backend: "numpy" or "cupy"."""
    return _active_name


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU (used to parametrize tests)."""
    try:
        _load_cupy()
    except BackendUnavailableError:
        return False
    return True


class _ActiveArrayModule:
    """``xp.name`` looks ``name`` up on the active module at call time.

    A proxy rather than a plain module reference, so that ``from minift.backend import xp``
    keeps working after ``set_backend`` switches the module.
    """

    def __getattr__(self, name: str):
        return getattr(_active_module, name)

    def __repr__(self) -> str:
        return f"<minift xp -> {_active_name}>"


xp = _ActiveArrayModule()


def to_numpy(array) -> numpy.ndarray:
    """A NumPy copy of ``array`` wherever it lives (plotting, saving, comparing in tests)."""
    if isinstance(array, numpy.ndarray):
        return array
    if hasattr(array, "get"):  # cupy.ndarray
        return array.get()
    return numpy.asarray(array)


def asarray(data, dtype=None):
    """``data`` as an array of the active backend (copied to the GPU if needed)."""
    return _active_module.asarray(data, dtype=dtype)


set_backend(os.environ.get("MINIFT_BACKEND", "numpy"))
