"""The CPU path of the kernels: build a ``kernels/*.cu`` file with g++ and ``kernels/emu/cuda_emu.h``
(a small CUDA emulation header), then launch its kernels through ctypes.

The .cu file is compiled as it is, with one exception the C preprocessor cannot express:
``extern __shared__ T name[];`` (dynamic shared memory) is rewritten into
``CUDA_EMU_DYNAMIC_SHARED(T, name);``. A generated tail registers every ``extern "C" __global__``
kernel, so that ``cuda_emu_launch(name, grid, block, smem, args)`` can call it with the packed
arguments — the same (grid, block, smem, args) a GPU launch gets (see ``minift/cuda/kernels.py``).

Built libraries are cached under ``$MINIFT_CACHE/cuda_emu`` (default ``~/.cache/minift``), named by
a hash of everything that goes into the build, so an edit to a kernel or to the header rebuilds it
and nothing else does. ``compile_library`` is that build and cache; the compiled CPU NF4 decoder
(``minift/cuda/cpu_decode.py``) uses it too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy


def find_kernel_dir() -> Path:
    """The folder of the kernel sources. A wheel ships the repository's top-level ``kernels/``
    inside the package, as ``minift/cuda/kernel_sources/`` (pyproject.toml); a checkout or an
    editable install reads ``kernels/`` where it is."""
    here = Path(__file__).resolve().parent
    candidates = (here / "kernel_sources", here.parent.parent / "kernels")
    for folder in candidates:
        if (folder / "emu" / "cuda_emu.h").is_file():
            return folder
    raise FileNotFoundError(f"the CUDA kernel sources are missing: looked in {', '.join(map(str, candidates))}; "
                            "reinstall minift (the wheel ships them as minift/cuda/kernel_sources)")


KERNEL_DIR = find_kernel_dir()
EMU_DIR = KERNEL_DIR / "emu"
CXX = os.environ.get("CXX", "g++")
# -ffp-contract=off: never fuse a*b+c into an FMA behind the source's back (results stay comparable).
CXX_FLAGS = ("-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-Wall", "-Wno-sign-compare",
             "-Wno-unused-function")

KERNEL_NAME = re.compile(r'extern\s+"C"\s+__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s+)?void\s+(\w+)\s*\(')
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+([^;\[\]]*?)\s*\b(\w+)\s*\[\s*\]\s*;")

# The type code of each argument the launcher packs, as cuda_emu.h's scalar_code() spells it.
_SCALAR_CODES = {numpy.dtype(numpy.float32): "f32", numpy.dtype(numpy.float64): "f64", numpy.dtype(numpy.int32): "i32",
                 numpy.dtype(numpy.uint32): "u32", numpy.dtype(numpy.int64): "i64", numpy.dtype(numpy.uint64): "u64",
                 numpy.dtype(numpy.uint8): "u8", numpy.dtype(numpy.float16): "f16"}
_CTYPES = {"f32": ctypes.c_float, "f64": ctypes.c_double, "i32": ctypes.c_int32, "u32": ctypes.c_uint32,
           "i64": ctypes.c_int64, "u64": ctypes.c_uint64}


class EmulatorBuildError(RuntimeError):
    """g++ could not build a kernel file for the emulator, or the compiled CPU decoder (the
    compiler's message is included)."""


class EmulatorLaunchError(RuntimeError):
    """A launch the emulator refused, or an error it detected while the kernel ran."""


def cache_dir() -> Path:
    root = Path(os.environ.get("MINIFT_CACHE") or Path.home() / ".cache" / "minift")
    return root / "cuda_emu"


def translation_unit(source: str, filename: str) -> str:
    """The C++ text g++ compiles: the kernel file (dynamic shared memory rewritten, line numbers
    kept so errors point into the .cu file) and a tail that registers each kernel by name."""
    names = KERNEL_NAME.findall(source)
    if not names:
        raise EmulatorBuildError(f"{filename}: no extern \"C\" __global__ kernel found")

    def rewrite(match: re.Match) -> str:
        return f"CUDA_EMU_DYNAMIC_SHARED({match.group(1)}, {match.group(2)});" + "\n" * match.group(0).count("\n")

    body = DYNAMIC_SHARED.sub(rewrite, source)
    tail = "".join(f"CUDA_EMU_REGISTER({name})\n" for name in names)
    return f'#line 1 "{filename}"\n{body}\n#line 1 "<cuda_emu registration>"\n{tail}'


@functools.cache
def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise EmulatorBuildError(f"building kernels/ for the CPU needs a C++20 compiler ({cxx}, set $CXX to "
                                 f"another): {exc}") from exc


def compile_library(unit: str, stem: str, flags: tuple[str, ...], include_args: tuple[str, ...] = (),
                    hashed_extra: str = "") -> Path:
    """Compile the C++ text ``unit`` with ``CXX`` into a shared library in the cache, reused when
    the same text, ``hashed_extra`` (the text of the headers it includes), ``flags`` and compiler
    were built before. ``include_args`` (-I, -include) are passed but not hashed: they name where
    the headers are, which does not change what is built. The one place minift runs the compiler:
    the emulator and the compiled CPU decoder (minift/cuda/cpu_decode.py) both build through it."""
    cxx = CXX
    key = "\0".join([unit, hashed_extra, " ".join(flags), _compiler_version(cxx)])
    target = cache_dir() / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cpp, lib = Path(tmp) / f"{stem}.cpp", Path(tmp) / f"{stem}.so"
        cpp.write_text(unit)
        try:
            done = subprocess.run([cxx, *flags, *include_args, str(cpp), "-o", str(lib)], check=False,
                                  capture_output=True, text=True)
        except OSError as exc:
            raise EmulatorBuildError(f"{cxx} could not be run to build {stem}: {exc}; set $CXX to a C++20 compiler") \
                from exc
        if done.returncode != 0:
            raise EmulatorBuildError(f"{cxx} could not build {stem}:\n{done.stderr}")
        os.replace(lib, target)  # atomic: a concurrent build never sees half a library
    return target


def _build(unit: str, stem: str) -> Path:
    """Compile an emulator translation unit (``translation_unit``) against the emulation headers."""
    headers = "".join(p.read_text() for p in sorted(EMU_DIR.glob("*.h")))
    includes = ("-I", str(EMU_DIR), "-I", str(KERNEL_DIR), "-include", "cuda_emu.h")
    return compile_library(unit, stem, CXX_FLAGS, includes, hashed_extra=headers)


class EmulatedModule:
    """The kernels of one .cu file, built for the CPU; ``launch`` mirrors a CUDA launch."""

    def __init__(self, library: Path):
        self._lib = ctypes.CDLL(str(library))
        self._lib.cuda_emu_signature.restype = ctypes.c_char_p
        self._lib.cuda_emu_signature.argtypes = [ctypes.c_char_p]
        self._lib.cuda_emu_error.restype = ctypes.c_char_p
        self._lib.cuda_emu_launch.restype = ctypes.c_int
        self._lib.cuda_emu_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [ctypes.c_size_t,
                                                                                        ctypes.c_void_p]

    def signature(self, name: str) -> list[str]:
        """Parameter type codes of kernel ``name`` as the compiler saw them, e.g. ["f32*", "i32"]."""
        found = self._lib.cuda_emu_signature(name.encode())
        if found is None:
            raise EmulatorLaunchError(f"no kernel named {name!r} in this module")
        return found.decode().split(",") if found else []

    def launch(self, name: str, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
        """Run kernel ``name``: arrays are passed as pointers, NumPy scalars by value (as CuPy does)."""
        expected = self.signature(name)
        if len(args) != len(expected):
            raise EmulatorLaunchError(f"{name} takes {len(expected)} arguments, got {len(args)}")
        packed = [_pack(name, i, arg, code) for i, (arg, code) in enumerate(zip(args, expected))]
        pointers = (ctypes.c_void_p * max(len(packed), 1))(*[ctypes.addressof(p) for p in packed])
        if self._lib.cuda_emu_launch(name.encode(), *grid, *block, shared_mem, pointers) != 0:
            raise EmulatorLaunchError(f"{name}: {self._lib.cuda_emu_error().decode()}")


def _pack(kernel: str, index: int, arg, code: str):
    """One argument as a ctypes value whose address goes into the launch's argument array."""
    if isinstance(arg, numpy.ndarray):
        given = _SCALAR_CODES.get(arg.dtype, str(arg.dtype)) + "*"
        if given != code:
            raise EmulatorLaunchError(f"{kernel}: argument {index} is a {arg.dtype} array, the kernel takes {code}")
        return ctypes.c_void_p(arg.ctypes.data)
    given = _SCALAR_CODES.get(getattr(arg, "dtype", None), type(arg).__name__)
    if given != code or code not in _CTYPES:
        raise EmulatorLaunchError(f"{kernel}: argument {index} is {given}, the kernel takes {code} "
                                  "(pass NumPy scalars such as numpy.int32(n), as for a CuPy launch)")
    return _CTYPES[code](arg.item())


@functools.cache
def _load(library: Path) -> EmulatedModule:
    return EmulatedModule(library)


def load(path: str | Path) -> EmulatedModule:
    """The emulated module of kernel file ``path`` (built on first use, then cached)."""
    path = Path(path)
    return load_source(path.read_text(), str(path))


def load_source(source: str, filename: str = "<source>.cu") -> EmulatedModule:
    """Like ``load``, for kernel text that is not in a file (the emulator's own tests)."""
    return _load(_build(translation_unit(source, filename), Path(filename).stem.strip("<>") or "kernel"))
