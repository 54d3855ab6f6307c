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
import os
import tempfile
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


def atomic_write_bytes(path: str | os.PathLike, chunks) -> None:
    """Write the byte ``chunks`` to ``path`` so that readers see the old file or the new one,
    never half of one: temp file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


def _read_header(data: bytes, path) -> tuple[dict, int]:
    if len(data) < 8:
        raise SafetensorsError(f"{path}: too short to be a safetensors file ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise SafetensorsError(f"{path}: header length {n} runs past the end of the file (truncated?)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    return header, 8 + n


def load_file(path: str | os.PathLike, with_metadata: bool = False):
    """Read every tensor of a safetensors file as NumPy arrays (bf16 is widened to float32)."""
    data = Path(path).read_bytes()
    header, start = _read_header(data, path)
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= len(data) - start:
            raise SafetensorsError(f"{path}: tensor {name} lies outside the file (truncated?)")
        raw = data[start + begin:start + end]
        if info["dtype"] == "BF16":  # bfloat16 = the top 16 bits of a float32
            array = (numpy.frombuffer(raw, "<u2").astype(numpy.uint32) << 16).view(numpy.float32)
        elif info["dtype"] in _DTYPES:
            array = numpy.frombuffer(raw, numpy.dtype(_DTYPES[info["dtype"]]).newbyteorder("<"))
        else:
            raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        expected = int(numpy.prod(info["shape"], dtype=numpy.int64))
        if array.size != expected:
            raise SafetensorsError(f"{path}: tensor {name} has {array.size} values for shape {info['shape']}")
        tensors[name] = array.reshape(info["shape"]).copy()
    return (tensors, metadata) if with_metadata else tensors
