"""The safetensors format, read and written in plain NumPy (no pickle, no extra dependency).

A file is: 8 bytes (little-endian u64) giving the header length N, then N bytes of JSON
``{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}``,
then the raw little-endian tensor bytes, offsets counted from the end of the header. Loading
is just slicing a byte buffer: nothing in the file can run code, unlike a pickle.

Writes are atomic: the bytes go to a temporary file in the same folder, are flushed to disk,
and then renamed over the target. An interrupted save leaves the previous file intact.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path

import numpy

from minift.backend import to_numpy

_DTYPES = {
    "F64": numpy.float64, "F32": numpy.float32, "F16": numpy.float16,
    "I64": numpy.int64, "I32": numpy.int32, "I16": numpy.int16, "I8": numpy.int8,
    "U8": numpy.uint8, "U16": numpy.uint16, "U32": numpy.uint32, "U64": numpy.uint64, "BOOL": numpy.bool_,
}
_NAMES = {numpy.dtype(v): k for k, v in _DTYPES.items()}
#: The dtypes ``save_file(..., dtype=...)`` can store floating-point tensors as.
FLOAT_DTYPES = ("F32", "F16", "BF16")


class SafetensorsError(ValueError):
    """The file is not a valid safetensors file (the message says what is wrong)."""


def temp_file_beside(path: Path) -> tuple[int, Path]:
    """(descriptor, path) of a new empty file next to ``path``, to be renamed over it.

    Created with mode 0666 less the umask, as ``open(path, "w")`` would: ``tempfile.mkstemp``
    makes 0600 files, which would leave every saved model readable by its owner alone while
    everything else in the folder follows the umask."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: could not create a temporary file next to {path.name}")


def atomic_write_bytes(path: str | os.PathLike, chunks) -> None:
    """Write the byte ``chunks`` to ``path`` so that readers see the old file or the new one,
    never half of one: temp file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_bfloat16_bits(array) -> numpy.ndarray:
    """The uint16 bit patterns of ``array`` as bfloat16, which NumPy lacks as a dtype.

    bfloat16 is the top half of a float32 (same exponent, 7 mantissa bits), so rounding to
    nearest-even adds 0x7FFF plus the lowest kept bit, then cuts: what PyTorch does. NaN stays NaN."""
    values = numpy.asarray(array, numpy.float32)
    bits = values.view(numpy.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(numpy.uint16)
    return numpy.where(numpy.isnan(values), numpy.uint16(0x7FC0), rounded)


def _stored(name: str, array: numpy.ndarray, dtype: str | None) -> tuple[str, numpy.ndarray]:
    """(the safetensors dtype, the array whose bytes go to the file) of one tensor."""
    if dtype is not None and array.dtype.kind == "f":
        return dtype, to_bfloat16_bits(array) if dtype == "BF16" else array.astype(_DTYPES[dtype])
    if array.dtype not in _NAMES:
        raise SafetensorsError(f"{name}: dtype {array.dtype} cannot be stored in safetensors")
    return _NAMES[array.dtype], array


def save_file(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None,
              dtype: str | None = None) -> None:
    """Save a name -> array dict (NumPy or CuPy arrays) as a safetensors file, atomically.

    ``dtype`` ("F32", "F16" or "BF16") stores every floating-point tensor in that precision,
    rounded to nearest; None keeps each array's own dtype."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise SafetensorsError(f"cannot store tensors as {dtype!r}; choose one of {', '.join(FLOAT_DTYPES)}")
    stored = {name: _stored(name, numpy.ascontiguousarray(to_numpy(a)), dtype) for name, a in sorted(tensors.items())}
    header, offset = {}, 0
    for name, (kind, a) in stored.items():
        header[name] = {"dtype": kind, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as the reference writer does
    chunks = [len(blob).to_bytes(8, "little"), blob]
    chunks += [a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes() for _, a in stored.values()]
    atomic_write_bytes(path, chunks)


#: The largest JSON header read (the reference implementation's limit too): a longer one is
#: a corrupt length field, not a real file.
MAX_HEADER_BYTES = 100 * 1024**2


def read_json(path: str | os.PathLike, what: str):
    """The JSON value in the file ``path`` (``what`` it should be, for the messages); every way
    the file can fail to be JSON is a ``ValueError`` naming the file and what to do."""
    return parse_json(read_bytes(path, what), path, what)


def read_bytes(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of the file ``path``; a folder in its place is an error naming both."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, but {what} is a file; point at the file itself")
    return path.read_bytes()


def parse_json(data: bytes | str, path, what: str):
    """``json.loads`` with its failures turned into a ``ValueError`` that names ``path``."""
    try:
        return json.loads(data)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start} is {data[exc.start:exc.start + 1]!r}); "
                         f"save {what} as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                         f"fix or rewrite {what}") from None
    except RecursionError:
        raise ValueError(f"{path}: nests JSON arrays/objects deeper than the parser can follow, which "
                         f"{what} never does: the file is corrupt; rewrite it") from None


def _read_header(data: bytes, path) -> tuple[dict, int]:
    if len(data) < 8:
        raise SafetensorsError(f"{path}: too short to be a safetensors file ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, MAX_HEADER_BYTES):
        raise SafetensorsError(f"{path}: header length {n} runs past the end of the file or past "
                               f"MAX_HEADER_BYTES={MAX_HEADER_BYTES} (truncated or not a safetensors file?)")
    try:
        header = parse_json(data[8:8 + n], path, "the safetensors header")
    except ValueError as exc:
        raise SafetensorsError(str(exc)) from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{path}: __metadata__ is a JSON {type(metadata).__name__}, not an object of strings")
    return header, metadata, 8 + n


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(name: str, info, path) -> None:
    """One header entry: a known dtype, a shape of counts, and offsets spanning exactly its bytes."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise SafetensorsError(f"{where}: header entry {json.dumps(info)[:100]} needs 'dtype', 'shape' and "
                               "'data_offsets'; the file is corrupt, write it again")
    if info["dtype"] not in _DTYPES and info["dtype"] != "BF16":
        raise SafetensorsError(f"{where} has unsupported dtype {info['dtype']!r} "
                               f"(minift reads {', '.join([*_DTYPES, 'BF16'])})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise SafetensorsError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise SafetensorsError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    itemsize = 2 if info["dtype"] == "BF16" else numpy.dtype(_DTYPES[info["dtype"]]).itemsize
    if math.prod(shape) * itemsize != offsets[1] - offsets[0]:
        raise SafetensorsError(f"{where}: shape {shape} of {info['dtype']} needs {math.prod(shape) * itemsize} "
                               f"bytes but data_offsets {offsets} span {offsets[1] - offsets[0]}")


def _check_layout(header: dict, data_bytes: int, path) -> None:
    """Every tensor inside the data, and no two sharing bytes: overlapping offsets would make one
    tensor silently alias another."""
    previous_end, previous = 0, None
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, end = info["data_offsets"]
        if end > data_bytes:
            raise SafetensorsError(f"{path}: tensor {name!r} lies outside the file (it ends at byte {end} of a "
                                   f"{data_bytes}-byte data section; truncated?)")
        if begin < previous_end:
            raise SafetensorsError(f"{path}: tensors {previous!r} and {name!r} overlap (bytes {begin}.."
                                   f"{previous_end}); the file is corrupt, write it again")
        previous_end, previous = end, name


def check_finite(name: str, array: numpy.ndarray, path) -> None:
    """Refuse NaN/inf in a float tensor: a model built from them only ever outputs NaN, far from
    the cause. Pass ``allow_nonfinite=True`` to the loader to inspect such a file anyway."""
    if array.dtype.kind == "f" and not numpy.isfinite(array).all():
        bad = int(array.size - numpy.isfinite(array).sum())
        raise SafetensorsError(f"{path}: tensor {name!r} holds {bad} NaN or infinite values (a diverged "
                               "training or a corrupt file); load an earlier checkpoint, or pass "
                               "allow_nonfinite=True to inspect it")


def _decode(raw: bytes, dtype: str) -> numpy.ndarray:
    if dtype == "BF16":  # bfloat16 = the top 16 bits of a float32
        return (numpy.frombuffer(raw, "<u2").astype(numpy.uint32) << 16).view(numpy.float32)
    return numpy.frombuffer(raw, numpy.dtype(_DTYPES[dtype]).newbyteorder("<"))


def load_file(path: str | os.PathLike, with_metadata: bool = False, allow_nonfinite: bool = False):
    """Read every tensor of a safetensors file as NumPy arrays (bf16 is widened to float32).

    The whole header is checked before any tensor is read; NaN or infinite values are refused
    unless ``allow_nonfinite``."""
    data = read_bytes(path, "a safetensors file")
    header, metadata, start = _read_header(data, path)
    for name, info in header.items():
        _check_entry(name, info, path)
    _check_layout(header, len(data) - start, path)
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        array = _decode(data[start + begin:start + end], info["dtype"]).reshape(info["shape"]).copy()
        if not allow_nonfinite:
            check_finite(name, array, path)
        tensors[name] = array
    return (tensors, metadata) if with_metadata else tensors
