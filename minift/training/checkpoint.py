"""Training checkpoints: weights, optimizer state and loop state, written so a kill loses nothing.

A checkpoint is a folder ``step-000120/`` holding
    trainable.safetensors   the parameters that training changes (all of them for full
                            fine-tuning, only the adapters for LoRA)
    optimizer.safetensors   the optimizer's arrays (AdamW's two moments per parameter)
    state.json              everything else: step, scheduler, data position, history, config
and ``latest``, a one-line file, names the checkpoint to resume from.

What a kill (at any instant, power loss included) leaves behind
---------------------------------------------------------------
``latest`` always names a complete checkpoint, or does not exist yet. A save goes:

1. write the three files into ``.tmp-step-000120/``, each one fsynced, then fsync that folder
   (its entries naming the files): the folder is now whole on disk, under a name nobody reads;
2. rename it to its final name, then fsync ``out_dir``: the complete folder appears at once,
   and durably *before* anything names it (a ``latest`` that reached the disk ahead of the
   rename could name a folder that a power cut took back);
3. replace ``latest`` (temp file, fsync, rename: ``atomic_write_bytes``), then fsync
   ``out_dir``. This rename is the commit point: before it, a resume finds the previous
   checkpoint; after it, the new one;
4. only then remove what the new checkpoint supersedes, each folder first renamed to a
   ``.tmp-`` name (one atomic step), then deleted. A folder called ``step-*`` is therefore
   always complete: a kill half-way through a deletion leaves a ``.tmp-`` folder, not a torn
   checkpoint.

Saving a step that already has a folder (a rerun in an old ``out_dir``) never deletes the
folder ``latest`` may name before the new one is committed: the new one takes a free name
(``step-000120.1``), ``latest`` moves to it, and the old one goes in step 4.

Anything named ``.tmp-*`` (or a ``.*.tmp`` file left by ``atomic_write_bytes``) belongs to a save
or deletion that a kill cut short; ``remove_orphans`` deletes it at the next save or resume.
Which checkpoints to keep is the Trainer's decision (``prune_checkpoints``): only it knows
whether the weights of a checkpoint gave a finite loss.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from pathlib import Path

import numpy

from minift.backend import asarray, to_numpy
from minift.io.safetensors import atomic_write_bytes, load_file, save_file

TEMP_PREFIX = ".tmp-"
_CHECKPOINT_NAME = re.compile(r"step-(\d+)(\.\d+)?")


class CheckpointError(RuntimeError):
    """A checkpoint that exists cannot be read; the message names it and what to do."""


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


# ---- the folder's bookkeeping ---------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    """Make the folder's entries (names created, renamed, replaced in it) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_step(folder: Path) -> int:
    """The step of ``step-000120`` (or of ``step-000120.1``, a re-save of the same step)."""
    return int(_CHECKPOINT_NAME.fullmatch(folder.name).group(1))


def checkpoint_folders(out_dir: str | Path) -> list[Path]:
    """Every complete checkpoint folder of ``out_dir``, oldest step first."""
    folders = [p for p in Path(out_dir).glob("step-*") if _CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(folders, key=lambda p: (checkpoint_step(p), p.name))


def remove_orphans(out_dir: str | Path) -> None:
    """Delete what a killed save or deletion left: ``.tmp-*`` folders (``.step-*`` ones from
    minift versions before these names) and ``.*.tmp`` files."""
    out_dir = Path(out_dir)
    for folder in [*out_dir.glob(f"{TEMP_PREFIX}*"), *out_dir.glob(".step-*")]:
        shutil.rmtree(folder, ignore_errors=True)
    for file in out_dir.glob(".*.tmp"):
        file.unlink(missing_ok=True)


def _discard(folder: Path) -> None:
    """Rename, then delete: no kill can leave a half-deleted folder under a ``step-*`` name."""
    trash = folder.with_name(f"{TEMP_PREFIX}removed-{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    shutil.rmtree(trash)


def set_latest(out_dir: str | Path, folder: Path | None) -> None:
    """Point ``latest`` at ``folder`` (None: remove it), durably, before anything else happens."""
    out_dir = Path(out_dir)
    if folder is None:
        (out_dir / "latest").unlink(missing_ok=True)
    else:
        atomic_write_bytes(out_dir / "latest", [folder.name.encode()])
    _fsync_dir(out_dir)


def prune_checkpoints(out_dir: str | Path, keep: list[Path]) -> None:
    """Delete every checkpoint folder of ``out_dir`` that is not in ``keep``."""
    for folder in checkpoint_folders(out_dir):
        if folder not in keep:
            _discard(folder)


#: What a training run writes into its folder beside the checkpoints.
RUN_FILES = ("latest", "metrics.jsonl", "curves.png", "rewards.png")


def holds_run(out_dir: str | Path) -> bool:
    """True when ``out_dir`` already holds a training run (a checkpoint or its metrics)."""
    out_dir = Path(out_dir)
    return any((out_dir / name).exists() for name in RUN_FILES[:2]) or bool(checkpoint_folders(out_dir))


def discard_run(out_dir: str | Path) -> None:
    """Delete the training run in ``out_dir`` (checkpoints, ``latest``, metrics, plots) and
    nothing else: ``latest`` goes first, so a kill midway leaves no checkpoint that looks current."""
    set_latest(out_dir, None)
    prune_checkpoints(out_dir, keep=[])
    remove_orphans(out_dir)
    for name in RUN_FILES[1:]:
        (Path(out_dir) / name).unlink(missing_ok=True)


# ---- save and load --------------------------------------------------------------------------


def _free_name(out_dir: Path, step: int) -> Path:
    base = f"step-{step:06d}"
    names = itertools.chain([base], (f"{base}.{n}" for n in itertools.count(1)))
    return next(out_dir / name for name in names if not (out_dir / name).exists())


def save_checkpoint(out_dir: str | Path, step: int, trainable: dict, optimizer_state: dict,
                    loop_state: dict) -> Path:
    """Write checkpoint ``step`` under ``out_dir`` and commit it by pointing ``latest`` at it.

    The order of the writes, renames and fsyncs is the module docstring's; older checkpoints
    are left alone (``prune_checkpoints``), except another folder of this same step, which the
    new one supersedes and which goes once ``latest`` no longer names it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_orphans(out_dir)
    tmp = out_dir / f"{TEMP_PREFIX}step-{step:06d}"
    tmp.mkdir()
    try:
        save_file(trainable, tmp / "trainable.safetensors")
        opt_json, opt_arrays = split_arrays(optimizer_state)
        save_file(opt_arrays, tmp / "optimizer.safetensors")
        state = {"step": step, "optimizer": opt_json, **loop_state}
        atomic_write_bytes(tmp / "state.json", [json.dumps(state, indent=1).encode()])
        _fsync_dir(tmp)
        final = _free_name(out_dir, step)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out_dir)
    set_latest(out_dir, final)
    for same_step in checkpoint_folders(out_dir):
        if checkpoint_step(same_step) == step and same_step != final:
            _discard(same_step)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The folder ``latest`` names; None when no checkpoint was ever committed."""
    pointer = Path(out_dir) / "latest"
    if not pointer.exists():
        return None
    try:
        folder = Path(out_dir) / pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{pointer} cannot be read ({err}); write in it the name of one of the "
                              f"step-* folders next to it, or delete it to start over") from err
    if not (_CHECKPOINT_NAME.fullmatch(folder.name) and folder.is_dir()):
        raise CheckpointError(f"{pointer} names {folder.name!r}, which is not a checkpoint folder there; "
                              f"write in it the name of one of the step-* folders next to it, or delete "
                              f"it to start over")
    return folder


def load_checkpoint(folder: str | Path) -> tuple[dict, dict, dict]:
    """-> (trainable arrays, optimizer state dict, loop state) of one checkpoint folder."""
    folder = Path(folder)
    try:
        trainable = load_file(folder / "trainable.safetensors")
        state = json.loads((folder / "state.json").read_text())
        arrays = load_file(folder / "optimizer.safetensors")
        optimizer_state = _int_keys(join_arrays(state.pop("optimizer"), arrays))
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {folder} cannot be read ({type(err).__name__}: {err}); write the "
                              f"name of an older step-* folder in {folder.parent / 'latest'}, or delete "
                              f"{folder.parent / 'latest'} to start over") from err
    return trainable, optimizer_state, state
