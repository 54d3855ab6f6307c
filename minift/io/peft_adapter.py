"""PEFT's adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), written and read.

This is the one module that knows the format. Training (``PeftModel.save_pretrained``), serving
(``AdapterLibrary``) and the benchmarks' synthetic adapters all go through it, so they agree on
the file names and keys, and every adapter is checked once, here, before anything trusts it.

The format, as Hugging Face PEFT writes it for LoRA:

- ``adapter_config.json``: a JSON object with PEFT's ``LoraConfig`` fields (``peft_type: "LORA"``,
  ``r``, ``lora_alpha``, ``target_modules``, ...).
- ``adapter_model.safetensors``: each saved weight under its name inside PEFT's wrapper, with the
  adapter name dropped: ``base_model.model.`` + the module's name in the base model +
  ``.lora_A.weight`` for A, shape (r, d_in), and ``.lora_B.weight`` for B, shape (d_out, r).
  Other weights (``modules_to_save`` copies, trained biases) keep their plain names.
  Its safetensors metadata may also say how the base was stored while the adapter was trained
  (``minift.base``, see ``read_adapter_base``); PEFT ignores metadata it does not know.

Whether the weights fit a *model* (a layer of that name and shape exists) needs the model, so the
readers above check that; here is checked what the folder alone can tell.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy

from minift.backend import to_numpy
from minift.io.safetensors import atomic_write_bytes, load_file, read_json, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_KEY = re.compile(re.escape(PREFIX) + r"(?P<module>.+)\.lora_(?P<which>[AB])\.weight")
_RESAVE = "save the adapter again (save_pretrained in minift or PEFT)"
BASE_KEY = "minift.base"  # safetensors metadata: the base's storage during training, as JSON


class AdapterFormatError(ValueError):
    """An adapter folder breaks PEFT's format; the message names the file and field, and what to do."""


def lora_key(module: str, which: str) -> str:
    """The saved key of ``module``'s A or B (``which`` is "A" or "B")."""
    return f"{PREFIX}{module}.lora_{which}.weight"


def lora_tensors(pairs: dict) -> dict:
    """{module: (A, B)} -> {saved key: array}, ready for ``write_adapter_folder``."""
    return {lora_key(module, which): array for module, pair in pairs.items() for which, array in zip("AB", pair)}


def lora_pairs(tensors: dict, where: str | Path = WEIGHTS_NAME) -> tuple[dict, dict]:
    """{saved key: array} -> ({module: (A, B)}, every other tensor); the inverse of ``lora_tensors``.
    An A without its B (or a B without its A) is an error: half an update cannot be applied."""
    halves, rest = {}, {}
    for key, array in tensors.items():
        found = _LORA_KEY.fullmatch(key)
        if found:
            halves.setdefault(found["module"], {})[found["which"]] = array
        else:
            rest[key] = array
    for module, half in halves.items():
        if set(half) != {"A", "B"}:
            have, missing = ("A", "B") if "A" in half else ("B", "A")
            raise AdapterFormatError(f"{where}: {module} has lora_{have} but not its partner lora_{missing} "
                                     f"({lora_key(module, missing)}); the file is incomplete, {_RESAVE}")
    return {module: (half["A"], half["B"]) for module, half in halves.items()}, rest


def write_adapter_folder(folder: str | Path, config: dict, tensors: dict, base: dict | None = None) -> Path:
    """Write ``config`` and ``tensors`` ({saved key: array}) as an adapter folder; -> the folder.

    ``base`` (optional) records how the base model was stored during training, e.g.
    ``{"quantization": "nf4", "blocksize": 64, "double_quant": True}`` for QLoRA; see ``read_adapter_base``.
    The same checks as on reading run first, so minift never writes an adapter it would refuse;
    each file is replaced atomically, so an interrupted save leaves the previous file whole."""
    folder = Path(folder)
    tensors = {key: to_numpy(array) for key, array in tensors.items()}
    check_adapter(config, tensors, folder)
    metadata = {"format": "pt"} | ({BASE_KEY: json.dumps(base)} if base else {})
    save_file(tensors, folder / WEIGHTS_NAME, metadata=metadata)
    atomic_write_bytes(folder / CONFIG_NAME, [json.dumps(config, indent=2).encode()])
    return folder


def read_adapter_folder(folder: str | Path) -> tuple[dict, dict]:
    """-> (the config as a dict, {saved key: NumPy array}), both checked by ``check_adapter``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; an adapter is a folder holding {CONFIG_NAME} "
                                f"and {WEIGHTS_NAME}, check the path")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} does not exist: a PEFT adapter folder needs {CONFIG_NAME} "
                                    f"and {WEIGHTS_NAME}; check the path, or {_RESAVE}")
    try:
        config = read_json(folder / CONFIG_NAME, "an adapter config")
    except ValueError as exc:
        raise AdapterFormatError(f"{exc}; or {_RESAVE}") from None
    tensors = load_file(folder / WEIGHTS_NAME, allow_nonfinite=True)  # check_adapter says what NaN means here
    check_adapter(config, tensors, folder)
    return config, tensors


def read_adapter_base(folder: str | Path) -> dict | None:
    """How the base was stored while the adapter in ``folder`` was trained: ``{"quantization": "nf4",
    "blocksize": int, "double_quant": bool}`` for a QLoRA adapter saved by minift, None otherwise
    (a float base, or an adapter saved by PEFT, which does not record it).

    It matters when merging: a QLoRA adapter learned to correct the NF4 base Q(W), not W."""
    path = Path(folder) / WEIGHTS_NAME
    _, metadata = load_file(path, with_metadata=True, allow_nonfinite=True)
    if BASE_KEY not in metadata:
        return None
    try:
        base = json.loads(metadata[BASE_KEY])
    except json.JSONDecodeError:
        base = None
    if not (isinstance(base, dict) and base.get("quantization") == "nf4" and type(base.get("blocksize")) is int
            and base["blocksize"] > 0 and isinstance(base.get("double_quant"), bool)):
        raise AdapterFormatError(f"{path}: metadata {BASE_KEY} is {metadata[BASE_KEY]!r}, expected "
                                 '{"quantization": "nf4", "blocksize": <int>, "double_quant": <bool>}; '
                                 f"{_RESAVE}")
    return base


def check_adapter(config, tensors: dict, folder: str | Path) -> None:
    """Raise ``AdapterFormatError`` unless ``config`` and ``tensors`` make a sound LoRA adapter:
    the fields LoRA needs, complete A/B pairs of the config's rank, finite values."""
    folder = Path(folder)
    _check_config(config, folder / CONFIG_NAME)
    _check_tensors(config, tensors, folder / WEIGHTS_NAME)


def _check_config(config, path: Path) -> None:
    fix = f"fix the field in the file or {_RESAVE}"
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: holds a JSON {type(config).__name__}, but an adapter config is a JSON "
                                 f"object {{\"peft_type\": \"LORA\", \"r\": ..}}; {fix}")
    if config.get("peft_type") != "LORA":
        raise AdapterFormatError(f"{path}: peft_type is {config.get('peft_type')!r}, but only LoRA adapters "
                                 f"(peft_type \"LORA\") can be read; use a LoRA adapter or {fix}")
    r, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterFormatError(f"{path}: r (the LoRA rank) must be a positive integer, got {r!r}; {fix}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterFormatError(f"{path}: lora_alpha must be a finite positive number, got {alpha!r}; {fix}")
    if not isinstance(targets, str) and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise AdapterFormatError(f"{path}: target_modules must be a list of module names or a regular "
                                 f"expression string, got {targets!r}; {fix}")


def _check_tensors(config: dict, tensors: dict, path: Path) -> None:
    for key, array in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{path}: tensor {key!r} does not start with {PREFIX!r}, so it is not a "
                                     f"PEFT adapter weight; {_RESAVE}")
        if numpy.issubdtype(array.dtype, numpy.floating) and not numpy.isfinite(array).all():
            raise AdapterFormatError(f"{path}: tensor {key!r} holds NaN or infinite values (the training that "
                                     "saved it diverged); save it from an earlier checkpoint or train again "
                                     "with a lower learning rate")
    pairs, _ = lora_pairs(tensors, path)
    if not pairs:
        raise AdapterFormatError(f"{path}: holds no LoRA weights (no key ends in .lora_A.weight); {_RESAVE}")
    ranks, pattern = {config["r"]}, config.get("rank_pattern")
    if isinstance(pattern, dict):  # PEFT's rank_pattern gives some modules their own rank
        ranks |= set(pattern.values())
    for module, (a, b) in pairs.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] not in ranks or b.shape[1] != a.shape[0]:
            raise AdapterFormatError(f"{path}: {module} has lora_A of shape {a.shape} and lora_B of shape "
                                     f"{b.shape}, but r={config['r']} in {CONFIG_NAME} needs A (r, d_in) and "
                                     f"B (d_out, r); the config and weights are from different adapters, "
                                     f"{_RESAVE}")
