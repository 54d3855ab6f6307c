"""Training checkpoints: weights, optimizer state and loop state, written so nothing is lost.

A checkpoint is a folder ``step-000120/`` holding
    trainable.safetensors   the parameters that training changes (all of them for full
                            fine-tuning, only the adapters for LoRA)
    optimizer.safetensors   the optimizer's arrays (AdamW's two moments per parameter)
    state.json              everything else: step, scheduler, data position, RNG states, history
Each folder is written under a temporary name and renamed when complete, then ``latest`` (a
one-line file) is atomically pointed at it, then older folders are removed. A crash at any
moment leaves the previous checkpoint readable.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy

from minift.backend import asarray, to_numpy
from minift.io.safetensors import atomic_write_bytes, load_file, save_file


def split_arrays(obj, prefix: str = "", arrays: dict | None = None):
    """Split a nested state (dicts, lists, arrays, numbers) into JSON-able data plus arrays.

    Each array is replaced by ``{"__array__": key}`` and stored under ``key`` in ``arrays``.
    """
    arrays = {} if arrays is None else arrays
    if hasattr(obj, "shape") and hasattr(obj, "dtype") and not isinstance(obj, numpy.generic):
        arrays[prefix] = to_numpy(obj)  # any ndarray, 0-d included (a scalar parameter's moments)
        return {"__array__": prefix}, arrays
    if isinstance(obj, dict):
        return {str(k): split_arrays(v, f"{prefix}/{k}", arrays)[0] for k, v in obj.items()}, arrays
    if isinstance(obj, (list, tuple)):
        return [split_arrays(v, f"{prefix}/{i}", arrays)[0] for i, v in enumerate(obj)], arrays
    if isinstance(obj, numpy.generic):
        return obj.item(), arrays
    return obj, arrays


def join_arrays(obj, arrays: dict):
    """Inverse of ``split_arrays``: put the arrays back (on the active backend)."""
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return asarray(arrays[obj["__array__"]])
        return {k: join_arrays(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_arrays(v, arrays) for v in obj]
    return obj


def _int_keys(obj):
    """JSON turns int dict keys into strings; optimizer state is keyed by parameter index."""
    if isinstance(obj, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_int_keys(v) for v in obj]
    return obj


def save_checkpoint(out_dir: str | Path, step: int, trainable: dict, optimizer_state: dict,
                    loop_state: dict, keep_last: int = 1) -> Path:
    """Write checkpoint ``step`` under ``out_dir`` atomically and point ``latest`` at it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{final.name}."))
    try:
        save_file(trainable, tmp / "trainable.safetensors")
        opt_json, opt_arrays = split_arrays(optimizer_state)
        save_file(opt_arrays, tmp / "optimizer.safetensors")
        state = {"step": step, "optimizer": opt_json, **loop_state}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(out_dir / "latest", [final.name.encode()])
    older = sorted(p for p in out_dir.glob("step-*") if p.is_dir() and p != final)
    for stale in older[: max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    pointer = Path(out_dir) / "latest"
    if not pointer.exists():
        return None
    folder = Path(out_dir) / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def load_checkpoint(folder: str | Path) -> tuple[dict, dict, dict]:
    """-> (trainable arrays, optimizer state dict, loop state) of one checkpoint folder."""
    folder = Path(folder)
    trainable = load_file(folder / "trainable.safetensors")
    state = json.loads((folder / "state.json").read_text())
    optimizer_state = _int_keys(join_arrays(state.pop("optimizer"), load_file(folder / "optimizer.safetensors")))
    return trainable, optimizer_state, state
