"""``export_model``: a model, with a LoRA adapter merged in if one is given, written as a Hugging
Face folder (transformers, vLLM) or a GGUF file (llama.cpp, Ollama). ``minift export`` calls it.

    export_model("smollm2", "out/smol", "hf")                               float32 safetensors folder
    export_model("smollm2", "smol.Q8_0.gguf", "gguf", dtype="q8_0")         one GGUF file
    export_model("smollm2", "out/merged", "hf", adapter="runs/q/adapter")   merge an adapter first

Merging onto the right base. A QLoRA adapter was trained as  y = Q(W) x + s B A x : it learned to
correct the NF4-rounded base Q(W), not W. Folded into the original float W, the base's rounding
error comes back uncorrected; folded into the dequantized Q(W), the merged weight is the trained
model up to float rounding — what PEFT users ask for in peft#2105 and peft#2321. minift's
``PeftModel.save_pretrained`` records an NF4 base in the adapter file (``read_adapter_base``), so
such an adapter is merged into Q(W): the float base is quantized with the recorded block size,
dequantized, and s B A added. ``adapter_base`` overrides the record (PEFT's files carry none).
The logits of the merged model are compared with the unmerged one (``logit_drift``): float
rounding when the base was right, far more when it was not.

Nothing is half-written: every check runs before the first byte is written, the files go to a
temporary folder beside ``out`` and are moved into place by one rename, and that folder is
removed if anything fails.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy

from minift.autograd import no_grad
from minift.backend import to_numpy
from minift.io.gguf_writer import DTYPES as GGUF_DTYPES
from minift.io.gguf_writer import write_gguf
from minift.io.model_dir import HF_DTYPES, save_hf_folder
from minift.io.peft_adapter import lora_pairs, read_adapter_base, read_adapter_folder
from minift.nn import dequantize_model
from minift.quant.nf4 import DEFAULT_BLOCKSIZE
from minift.training.pretrained import (
    adapter_base_name,
    adapter_of,
    attach_adapter,
    base_model_reference,
    load_pretrained,
)

#: The output formats and the weight types each one's writer takes; the first (f32) is the default.
FORMATS = {"hf": tuple(HF_DTYPES), "gguf": tuple(GGUF_DTYPES)}
ADAPTER_BASES = ("nf4", "float")


class ExportError(ValueError):
    """An export that cannot be done as asked; the message says what to change. Raised before any
    file is written."""


@dataclass
class ExportReport:
    """What ``export_model`` wrote, for the command to print."""

    path: Path
    fmt: str
    dtype: str
    files: dict[str, int]  # file name -> bytes
    adapter_base: str | None = None  # which base the adapter was merged into, and why
    drift: dict[str, float] | None = None  # merged vs unmerged-as-trained logits (``logit_drift``)


def export_model(src, out, fmt: str, *, adapter=None, adapter_base: str | None = None,
                 dtype: str | None = None) -> ExportReport:
    """Load ``src`` (anything ``load_pretrained`` takes), merge ``adapter`` (a PEFT folder) into
    it if given, write it to ``out`` as ``fmt`` ("hf": a folder, "gguf": a file) in ``dtype``.
    A LoRA run's folder (or an adapter folder) as ``src`` means its base with its adapter.

    ``adapter_base`` ("nf4" or "float") says which base the adapter was trained on when its file
    does not say it, or overrides what it says."""
    dtype = check_format(fmt, dtype)
    out = Path(out)
    check_out_path(out, fmt)
    if adapter_base not in (None, *ADAPTER_BASES):
        raise ExportError(f"adapter base {adapter_base!r}: choose one of {', '.join(ADAPTER_BASES)}")
    run_adapter = adapter_of(src) if adapter is None else None
    if run_adapter is not None:  # a LoRA run (or an adapter folder): its base, with the adapter merged
        src, adapter = adapter_base_name(run_adapter), run_adapter
    model, tokenizer = load_pretrained(src)
    report = ExportReport(out, fmt, dtype, {})
    if adapter is not None:
        model, report.adapter_base, report.drift = merge_adapter(model, adapter, adapter_base, src)
    report.files = _write(model, tokenizer, out, fmt, dtype, base_name=base_model_reference(src) if adapter else None)
    return report


def check_format(fmt: str, dtype: str | None) -> str:
    """-> the dtype to write (the format's default for None); an unknown format or dtype raises."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose hf (a Hugging Face folder) or gguf (one file)")
    if dtype is None:
        return FORMATS[fmt][0]
    if dtype not in FORMATS[fmt]:
        raise ExportError(f"dtype {dtype!r} cannot be written as {fmt}: choose one of {', '.join(FORMATS[fmt])}")
    return dtype


def check_out_path(out: Path, fmt: str) -> None:
    """Export never overwrites: ``out`` must not exist (for "hf" an empty folder is fine), and the
    nearest existing folder above it must be writable."""
    if out.exists() and not (fmt == "hf" and out.is_dir() and not any(out.iterdir())):
        raise ExportError(f"{out} already exists; export does not overwrite, remove it or choose another path")
    parent = out.parent.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out}: {parent} is not a writable folder")


def merge_adapter(model, folder, adapter_base: str | None = None, src="the model"):
    """Fold the LoRA adapter in ``folder`` into ``model``; -> (merged model, which base in words,
    ``logit_drift`` of the merged logits against the adapter kept separate on the base it was
    trained on). An adapter trained on NF4 is merged into the dequantized Q(W) unless
    ``adapter_base="float"`` asks for the original W; its drift then shows what that costs."""
    check_adapter_fits(model, folder, src)
    trained_on, merge_into, words = adapter_bases(folder, adapter_base)
    ids = drift_ids(model.config.vocab_size, model.config.max_seq_len)
    reference = None
    if trained_on != merge_into:  # keep W for the merge; the model as trained runs on a copy
        reference = model_logits(attach_adapter(copy.deepcopy(model), folder, trained_on), ids)
    peft_model = attach_adapter(model, folder, merge_into)
    if reference is None:
        reference = model_logits(peft_model, ids)
    dequantize_model(peft_model)  # Q(W) as float; the merge then adds s B A without a second rounding
    merged = peft_model.merge_and_unload()
    return merged, words, logit_drift(model_logits(merged, ids), reference)


def check_adapter_fits(model, folder, src="the model") -> None:
    """Every module the adapter changes exists in ``model`` with the (out, in) shape of its B A;
    else an error naming the module and both shapes, before the model is touched."""
    config, tensors = read_adapter_folder(folder)
    pairs, _ = lora_pairs(tensors, folder)
    trained_on = config.get("base_model_name_or_path")
    hint = f" (its adapter_config.json names {trained_on})" if trained_on else ""
    modules = dict(model.named_modules())
    for name, (a, b) in sorted(pairs.items()):
        weight = getattr(modules.get(name), "weight", None)
        if weight is None:
            raise ExportError(f"adapter {folder} does not fit {src}: it changes {name}, which that model does not "
                              f"have; it was trained on another base{hint}")
        if tuple(weight.shape) != (b.shape[0], a.shape[1]):
            raise ExportError(f"adapter {folder} does not fit {src}: {name} is {tuple(weight.shape)} (out, in) "
                              f"in the model but the adapter's B A is {(b.shape[0], a.shape[1])}; it was "
                              f"trained on another base{hint}")


def adapter_bases(folder, adapter_base: str | None = None) -> tuple[dict | None, dict | None, str]:
    """-> (NF4 settings of the base the adapter was trained on, of the base to merge into; None
    for a float base; the choice in words). The adapter file's record says how it was trained;
    ``adapter_base`` fills in for a file without one ("nf4") or picks the merge base ("float")."""
    recorded = read_adapter_base(folder)
    trained_on = recorded
    if recorded is None and adapter_base == "nf4":
        trained_on = {"quantization": "nf4", "blocksize": DEFAULT_BLOCKSIZE, "double_quant": True}
    merge_into = None if adapter_base == "float" else trained_on
    why = "as recorded in the adapter" if recorded and adapter_base is None else "as asked"
    if merge_into is None:
        why = "the adapter records no NF4 base" if adapter_base is None else why
        trained = f"; it was trained on {_nf4_words(trained_on)}, the drift is against that" if trained_on else ""
        return trained_on, None, f"float base W ({why}{trained})"
    return trained_on, merge_into, f"dequantized {_nf4_words(merge_into)} ({why})"


def _nf4_words(nf4: dict) -> str:
    double = ", double quant" if nf4["double_quant"] else ""
    return f"NF4 base Q(W), block {nf4['blocksize']}{double}"


def drift_ids(vocab_size: int, max_seq_len: int, rows: int = 2, length: int = 16, seed: int = 0):
    """A fixed batch of token ids spread over the whole vocabulary, to compare two models on."""
    rng = numpy.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(rows, min(length, max_seq_len)))


def model_logits(model, input_ids) -> numpy.ndarray:
    with no_grad():
        return to_numpy(model(input_ids).data).astype(numpy.float64)


def logit_drift(logits, reference) -> dict[str, float]:
    """Max and mean |difference|, norm relative to the reference, and how often the top token agrees."""
    diff = logits - reference
    return {"max_abs": float(numpy.abs(diff).max()), "mean_abs": float(numpy.abs(diff).mean()),
            "relative": float(numpy.linalg.norm(diff) / numpy.linalg.norm(reference)),
            "top1_agree": float((logits.argmax(-1) == reference.argmax(-1)).mean())}


def format_drift(rows: dict[str, dict[str, float]], against: str) -> str:
    """``logit_drift`` rows as a table; ``against`` heads the first column (what was compared with)."""
    lines = [f"{against:<34}{'max |dz|':>10}{'mean |dz|':>11}{'rel.':>9}{'top-1 same':>11}"]
    for name, r in rows.items():
        lines.append(f"{name:<34}{r['max_abs']:>10.2e}{r['mean_abs']:>11.2e}{r['relative']:>9.4f}"
                     f"{100 * r['top1_agree']:>10.1f}%")
    return "\n".join(lines)


def _write(model, tokenizer, out: Path, fmt: str, dtype: str, base_name: str | None) -> dict[str, int]:
    """Write into a temporary folder beside ``out``, then rename into place; -> {file name: bytes}.
    ``base_name``: the model an adapter was merged into, named in the HF folder's model card."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        if fmt == "hf":
            save_hf_folder(model, tokenizer, staging / out.name, dtype=dtype, base_name=base_name)
        else:
            write_gguf(model, tokenizer, staging / out.name, dtype=dtype)
        os.replace(staging / out.name, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = sorted(out.iterdir()) if out.is_dir() else [out]
    return {f.name: f.stat().st_size for f in files}
