"""A test double of CuPy: NumPy does the arithmetic, CuPy's rules guard the device boundary.

minift's ``backend=cupy`` path cannot run on a machine without an NVIDIA GPU, yet most of the
ways it can break are not about the GPU at all. They are about the boundary between host and
device memory, which CuPy polices strictly and NumPy does not:

* a device array never turns into a NumPy array by itself: ``numpy.asarray(x)``, matplotlib,
  ``numpy.testing`` and anything else that calls ``__array__`` raise ``TypeError``; only
  ``x.get()`` or ``cupy.asnumpy(x)`` copy to the host;
* an operation never mixes host and device arrays: ``device + numpy_array``,
  ``cupy.concatenate([device, numpy_array])``, ``device[...] = numpy_array`` and a kernel
  launch with a NumPy argument all raise ``TypeError`` (Python and NumPy scalars are fine);
* reductions and element access return 0-d *device* arrays, not Python or NumPy scalars:
  ``float(x.sum())`` and ``f"{x:.3f}"`` work, ``json.dumps(x.sum())`` and ``round(x, 2)`` do not;
* only the functions CuPy has exist (``cupy_api.txt``, taken from CuPy 15's sources).

This module, put first on ``PYTHONPATH`` as ``cupy``, follows those rules (read from CuPy's
``core.pyx`` and ``_kernel.pyx``) on top of NumPy, and runs ``RawModule`` kernels on minift's
CPU emulator. With ``MINIFT_BACKEND=cupy``, a notebook or a test then takes every CuPy branch in
minift and trips on every implicit host/device crossing a real GPU would refuse. What it cannot
show: CUDA compilation by NVRTC, GPU numerics (TF32, reduction order), speed and device memory.
It lives in ``tests/`` and never in the package: minift must not mistake it for a GPU.
"""

from __future__ import annotations

import functools
import os
import sys
import types
from pathlib import Path

import numpy as _np


def _read_api(path: Path) -> dict[str, frozenset[str]]:
    sections: dict[str, set[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), set())
        elif line and not line.startswith("#"):
            current.update(line.split())
    return {name: frozenset(names) for name, names in sections.items()}


_API = _read_api(Path(__file__).with_name("cupy_api.txt"))
_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")

__version__ = "15.0.0a1 (minift test double on NumPy)"


# ---- crossing the boundary ----------------------------------------------------------------------
def _host_refused(obj):
    return TypeError(f"Unsupported type {type(obj)}: CuPy does not mix host (NumPy) and device arrays; "
                     "move it first with cupy.asarray")


def _unwrap(obj, allow_host: bool = False):
    """Device arrays -> their NumPy storage (no copy), recursively; NumPy arrays refused unless allowed."""
    if isinstance(obj, ndarray):
        return obj._host
    if isinstance(obj, _np.ndarray):
        if not allow_host:
            raise _host_refused(obj)
        return obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o, allow_host) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v, allow_host) for k, v in obj.items()}
    return obj


def _wrap(obj):
    """NumPy results -> device arrays; a NumPy scalar becomes a 0-d device array, as in CuPy."""
    if isinstance(obj, _np.ndarray):
        return ndarray(obj)
    if isinstance(obj, _np.generic):
        return ndarray(_np.asarray(obj))
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_wrap(o) for o in obj)
    return obj


def _on_device(function, allow_host: bool = False):
    @functools.wraps(function)
    def run(*args, **kwargs):
        return _wrap(function(*_unwrap(args, allow_host), **_unwrap(kwargs, allow_host)))

    return run


# ---- the array ----------------------------------------------------------------------------------
class ndarray:  # noqa: N801 - CuPy's name
    """A "device" array: a NumPy array that refuses to leave or mix without an explicit copy."""

    __slots__ = ("_host", "__weakref__")  # weak references work, as on the Python class cupy.ndarray
    __array_priority__ = 100
    __hash__ = None  # unhashable, like numpy.ndarray and cupy.ndarray

    def __init__(self, host: _np.ndarray):
        self._host = host

    # explicit transfers
    def get(self, stream=None, order="C", out=None):
        if out is not None:
            out[...] = self._host
            return out
        return _np.array(self._host, order=order, copy=True)

    def set(self, arr, stream=None):
        if not isinstance(arr, _np.ndarray):
            raise TypeError(f"only numpy.ndarray is supported, got {type(arr)}")
        self._host[...] = arr

    # what CuPy refuses
    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if ufunc.__name__ not in _API["cupy"]:
            return NotImplemented
        result = _on_device(getattr(ufunc, method) if method != "__call__" else ufunc)(*inputs, **kwargs)
        out = kwargs.get("out")
        return out[0] if isinstance(out, tuple) and len(out) == 1 else result  # in place: the same object

    def __array_function__(self, func, types, args, kwargs):
        section = "cupy" + func.__module__.removeprefix("numpy").removeprefix(".lib")
        if func.__name__ not in _API.get(section, _API["cupy"]):
            return NotImplemented  # NumPy then raises "no implementation found"
        return _on_device(func)(*args, **kwargs)

    # attributes and methods that CuPy's ndarray has, run on the NumPy storage
    def __getattr__(self, name):
        if name not in _API["cupy.ndarray"]:
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r}")
        value = getattr(self._host, name)
        return _on_device(value) if callable(value) else _wrap(value)

    def __getitem__(self, key):
        return _wrap(self._host[_unwrap(key, allow_host=True)])  # NumPy index arrays are copied over

    def __setitem__(self, key, value):
        if isinstance(value, (_np.ndarray, list, tuple)):
            raise _host_refused(value)  # CuPy refuses assignment from CPU arrays (cupy gh-2079)
        self._host[_unwrap(key, allow_host=True)] = _unwrap(value)

    # Python conversions CuPy allows (each is a synchronising device -> host copy)
    def __len__(self):
        return len(self._host)

    def __iter__(self):
        if self._host.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self._host)))

    def __bool__(self):
        return bool(self._host)

    def __int__(self):
        return int(self._host)

    def __float__(self):
        return float(self._host)

    def __complex__(self):
        return complex(self._host)

    def __format__(self, spec):
        return format(self._host, spec)

    def __repr__(self):
        return repr(self._host)

    def __str__(self):
        return str(self._host)

    def __reduce__(self):
        return array, (self.get(),)

    def __deepcopy__(self, memo):
        return ndarray(self._host.copy())

    def __copy__(self):
        return ndarray(self._host.copy())


def _operators():
    """a + b, b + a, a += b, ... as NumPy ufuncs, which dispatch to ``__array_ufunc__`` above."""
    binary = {"add": _np.add, "sub": _np.subtract, "mul": _np.multiply, "truediv": _np.true_divide,
              "floordiv": _np.floor_divide, "mod": _np.remainder, "pow": _np.power, "matmul": _np.matmul,
              "and": _np.bitwise_and, "or": _np.bitwise_or, "xor": _np.bitwise_xor,
              "lshift": _np.left_shift, "rshift": _np.right_shift}
    for name, ufunc in binary.items():
        setattr(ndarray, f"__{name}__", lambda self, other, u=ufunc: u(self, other))
        setattr(ndarray, f"__r{name}__", lambda self, other, u=ufunc: u(other, self))
        if name != "matmul":
            setattr(ndarray, f"__i{name}__", lambda self, other, u=ufunc: u(self, other, out=(self,)))  # -> self
    compare = {"lt": _np.less, "le": _np.less_equal, "gt": _np.greater, "ge": _np.greater_equal,
               "eq": _np.equal, "ne": _np.not_equal}
    for name, ufunc in compare.items():
        setattr(ndarray, f"__{name}__", lambda self, other, u=ufunc: u(self, other))
    unary = {"neg": _np.negative, "pos": _np.positive, "abs": _np.absolute, "invert": _np.invert}
    for name, ufunc in unary.items():
        setattr(ndarray, f"__{name}__", lambda self, u=ufunc: u(self))


_operators()


# ---- module functions ---------------------------------------------------------------------------
def asarray(a, dtype=None, order=None, *, blocking=False):
    """Host data -> a device copy; a device array is returned as is (cast if ``dtype`` asks)."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == _np.dtype(dtype) else a.astype(dtype)
    return ndarray(_np.array(a, dtype=dtype, order=order or "K", copy=True))


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray) and not copy:
        return asarray(obj, dtype)
    host = obj._host if isinstance(obj, ndarray) else obj
    return ndarray(_np.array(host, dtype=dtype, copy=True, order=order, ndmin=ndmin))


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    return a.get(order=order, out=out) if isinstance(a, ndarray) else _np.asarray(a, order=order)


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else _np


class ufunc:  # noqa: N801 - CuPy's name
    """A NumPy ufunc on device arrays (``cupy.add``, ``cupy.add.at``, ``cupy.maximum.reduce`` ...)."""

    def __init__(self, numpy_ufunc):
        self._ufunc = numpy_ufunc
        self.__name__ = numpy_ufunc.__name__

    def __call__(self, *args, **kwargs):
        return _on_device(self._ufunc)(*args, **kwargs)

    def __getattr__(self, method):
        return _on_device(getattr(self._ufunc, method))


def _public(numpy_namespace, section: str, name: str):
    if name not in _API[section]:
        raise AttributeError(f"module {section!r} has no attribute {name!r} (CuPy does not implement it)")
    value = getattr(numpy_namespace, name)
    if isinstance(value, _np.ufunc):
        return ufunc(value)
    if callable(value) and not isinstance(value, type):
        return _on_device(value)
    return value  # dtypes, dtype classes, constants: CuPy re-exports NumPy's


@functools.cache
def __getattr__(name):  # module attribute lookup for everything not defined above
    return _public(_np, "cupy", name)


class _Namespace(types.ModuleType):
    def __init__(self, name, numpy_namespace, section):
        super().__init__(name)
        self._numpy, self._section = numpy_namespace, section

    def __getattr__(self, name):
        return _public(self._numpy, self._section, name)


linalg = _Namespace("cupy.linalg", _np.linalg, "cupy.linalg")


class _Generator:
    """``cupy.random.default_rng(seed)``: draws land on the device."""

    def __init__(self, seed=None):
        self._rng = _np.random.default_rng(seed)

    def __getattr__(self, name):
        return _on_device(getattr(self._rng, name))


class _Random(_Namespace):
    Generator = _Generator

    def default_rng(self, seed=None):
        return _Generator(seed)


random = _Random("cupy.random", _np.random, "cupy.random")


# ---- CUDA: one "device", kernels on minift's CPU emulator ----------------------------------------
class _Device:
    def __init__(self, device=0):
        if device != 0:
            raise ValueError(f"the test double has one device (0), not {device}")
        self.id = 0

    def synchronize(self):
        """Nothing to wait for: the emulator runs kernels synchronously."""

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class RawModule:
    """CUDA C source, built by minift's CPU emulator instead of NVRTC."""

    def __init__(self, code=None, *, path=None, options=(), backend="nvrtc", **_):
        self._module = _emulated(code if code is not None else Path(path).read_text())

    def get_function(self, name):
        return RawKernel(None, name, module=self._module)


class RawKernel:
    """A kernel launch: on the emulator, or (``CUPY_DOUBLE_KERNELS=reference``) by its NumPy math."""

    def __init__(self, code, name, options=(), *, module=None, **_):
        self._module = module or _emulated(code)
        self.name = name

    def __call__(self, grid, block, args, *, shared_mem=0, **_):
        args = tuple(_unwrap(list(args)))
        if os.environ.get("CUPY_DOUBLE_KERNELS") == "reference" and self.name in _REFERENCE:
            _REFERENCE[self.name](*args)
        else:
            self._module.launch(self.name, _dim3(grid), _dim3(block), args, shared_mem)


def _emulated(code: str):
    from minift.cuda import emulator as cuda_emu  # noqa: PLC0415 - minift imports this module while it starts

    return cuda_emu.load_source(code, "raw_module.cu")


def _dim3(size) -> tuple[int, int, int]:
    return (*size, 1, 1)[:3] if isinstance(size, tuple) else (size, 1, 1)


# ---- the kernels' results by NumPy: what each minift kernel writes, for CUPY_DOUBLE_KERNELS=reference -----
# The emulator runs every CUDA thread on the CPU: exact, but seconds per launch. Notebooks that
# train with LoRA on "the GPU" launch thousands; with this setting the launch still goes through
# RawModule with the kernel's own arguments, and writes what the kernel is specified to write
# (the emulator tests check the kernels themselves against the same definitions).
# The NF4 decoders are written out here rather than taken from minift.cuda.reference: those go
# through minift.quant.nf4, which counts op_counts["nf4_dequantize"] and makes backend arrays.
def _nf4_values(packed, absmax, n, blocksize):
    from minift.quant.nf4 import NF4_CODE  # noqa: PLC0415

    codes = _np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[:n]  # high nibble first
    return NF4_CODE.astype(_np.float32)[codes] * absmax[_np.arange(n) // blocksize]


def _nested_absmax(absmax_q, code2, absmax2, offset, nested_blocksize):
    return code2[absmax_q] * absmax2[_np.arange(len(absmax_q)) // nested_blocksize] + offset


def _dequant(packed, absmax, out, n, blocksize):
    out[...] = _nf4_values(packed, absmax, int(n), int(blocksize))


def _dequant_nested(packed, absmax_q, code2, absmax2, offset, out, n, blocksize, nested_blocksize):
    absmax = _nested_absmax(absmax_q, code2, absmax2, offset, int(nested_blocksize))
    out[...] = _nf4_values(packed, absmax.astype(_np.float32), int(n), int(blocksize))


def _absmax_nested(absmax_q, code2, absmax2, offset, out, n_blocks, nested_blocksize):
    out[...] = _nested_absmax(absmax_q, code2, absmax2, offset, int(nested_blocksize))


def _gemv(packed, absmax, x, y, N, K, blocksize):
    y[...] = _nf4_values(packed, absmax, int(N) * int(K), int(blocksize)).reshape(int(N), int(K)) @ x


def _shrink(x, A, t, M, K, R):
    t[...] = _ref().lora_shrink(x, A)


def _expand(t, B, y, M, N, R, scale, accumulate):
    y[...] = _ref().lora_expand(t, B, y, float(scale), accumulate=bool(accumulate))


def _fused(x, A, B, y, M, K, N, R, scale):
    y[...] = _ref().lora_fused(x, A, B, float(scale), y)


def _grad_weight(U, V, C, M, P, Q, scale):
    C[...] = _ref().lora_grad_weight(U, V, float(scale))


def _bgmv(x, A_stack, B_stack, idx, scale, y, K, N, R):
    y[...] = _ref().bgmv(x, A_stack, B_stack, idx, scale, y)


def _ref():
    from minift.cuda import reference as kernels_reference  # noqa: PLC0415 - minift imports this module while it starts

    return kernels_reference


_REFERENCE = {"lora_shrink_v1": _shrink, "lora_shrink_v2": _shrink, "lora_expand": _expand, "lora_fused": _fused,
              "lora_grad_weight": _grad_weight, "bgmv": _bgmv, "nf4_dequant_f32": _dequant, "nf4_dequant_f16": _dequant,
              "nf4_dequant_nested_f32": _dequant_nested, "nf4_dequant_nested_f16": _dequant_nested,
              "nf4_absmax_nested": _absmax_nested, "nf4_gemv": _gemv}


cuda = types.SimpleNamespace(
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
    is_available=lambda: True,
    get_cuda_path=lambda: None,
    Device=_Device,
)
