"""Layer freezing (lecture 000): ``requires_grad = False`` and what it really saves.

A frozen parameter gets no gradient, no optimizer state and no update. In minift that is not a
promise on paper: the autograd engine does not record a graph through parts where nothing needs
a gradient, and skips every backward matmul whose result nobody wants (see
``minift/autograd/function.py``). Freezing the first N blocks of a decoder therefore also saves
the backward compute *below* block N — the gradient never has to travel there.

Lower blocks tend to hold general language features and upper blocks more task-specific ones
(lecture 000), so the usual choice is to freeze the bottom and tune the top.
"""

from __future__ import annotations

import re

import numpy

from minift.nn.layers import Embedding, Linear, base_dtype
from minift.nn.module import Module, matching

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _set_requires_grad(model: Module, pattern: str | None, flag: bool) -> list[str]:
    params = dict(model.named_parameters())
    names = matching(params, pattern)
    if pattern is not None and not names:
        raise ValueError(f"pattern {pattern!r} matches no parameter; names look like {next(iter(params))!r}")
    for name in names:
        params[name].requires_grad_(flag)
    return names


def freeze(model: Module, pattern: str | None = None) -> list[str]:
    """Freeze the parameters whose dotted name matches regex ``pattern`` (all if None)."""
    return _set_requires_grad(model, pattern, False)


def unfreeze(model: Module, pattern: str | None = None) -> list[str]:
    """Make the parameters matching ``pattern`` trainable again (all if None)."""
    return _set_requires_grad(model, pattern, True)


def layer_index(name: str) -> int | None:
    """The block number in a name like ``model.layers.7.mlp.up_proj.weight`` (None elsewhere)."""
    found = _LAYER_INDEX.search(name)
    return int(found.group(1)) if found else None


def freeze_layers(model: Module, first_n: int) -> list[str]:
    """Freeze the token embedding and the first ``first_n`` transformer blocks.

    With tied embeddings (SmolLM2) the output head *is* the embedding matrix, so it is frozen
    too — one Parameter, one flag.
    """
    n_blocks = 1 + max((layer_index(n) for n, _ in model.named_parameters() if layer_index(n) is not None),
                       default=-1)
    if not 0 <= first_n <= n_blocks:
        raise ValueError(f"freeze_layers: first_n must be in [0, {n_blocks}], got {first_n}")
    frozen = []
    for name, param in model.named_parameters():
        index = layer_index(name)
        if "embed" in name or (index is not None and index < first_n):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def train_only_last_layers(model: Module, last_n: int = 1) -> list[str]:
    """Last-layer tuning (lecture 004): freeze all but the last ``last_n`` blocks and the final
    norm, so the pretrained model acts as a fixed feature extractor under a small trained top."""
    params = dict(model.named_parameters())
    n_blocks = 1 + max((layer_index(n) for n in params if layer_index(n) is not None), default=-1)
    if not 1 <= last_n <= n_blocks:
        raise ValueError(f"train_only_last_layers: last_n must be in [1, {n_blocks}], got {last_n}")
    freeze(model)
    first_kept = n_blocks - last_n
    keep = [n for n in params if n.endswith("model.norm.weight")
            or (layer_index(n) is not None and layer_index(n) >= first_kept)]
    for name in keep:
        params[name].requires_grad_(True)
    return keep


def cast_frozen(model: Module, dtype: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Store every frozen ``Linear`` weight, and a frozen embedding table, in ``dtype`` ("bf16",
    "f16", or "float32" to widen them back), except those whose dotted name contains one of
    ``skip``; returns the names of the weights cast. Call it after freezing (or ``get_peft_model``).

    A frozen weight is only ever read. ``Linear`` widens a 16-bit one for each product
    (``WidenedLinear``) and ``Embedding`` widens the rows it looks up, so 16 bits halve their
    memory at the price of one rounding of W; the trainable weights, their gradients and AdamW's
    moments stay float32 (lecture 003's mixed precision keeps fp32 master weights for the same
    reason: a step of lr x update is mostly below a 16-bit weight's last digit). A tied head is
    the embedding table itself, so it is stored with it and widened per product by
    ``Embedding.attend``; a frozen untied head is a ``Linear`` like the others. Norms and biases
    stay in float32: a few thousand numbers, not worth a second code path. (QLoRA's 4-bit
    ``quantize_model`` keeps the head in float; 16 bits round it far less.)
    The embedding and head are cast only along with frozen block ``Linear`` weights: with none of
    those (method full; or qlora, whose frozen projections are 4-bit already) the call is
    refused, as the flag most likely names the wrong method. Widening back to float32 before a save is exact, so a
    saved model holds the rounded base.
    """
    target = base_dtype(dtype)
    frozen = [(f"{name}.weight".lstrip("."), layer) for name, layer in model.named_modules()
              if isinstance(layer, (Linear, Embedding)) and not layer.weight.requires_grad
              and not any(s in name for s in skip)]
    if target != numpy.float32 and not any(isinstance(layer, Linear) and "lm_head" not in name
                                           for name, layer in frozen):
        raise ValueError(f"cast_frozen: no frozen Linear weight to store in {dtype}: every Linear trains "
                         f"(method full), or the frozen ones are 4-bit already (qlora). Freeze the base first "
                         f"(method lora, freeze or last), or keep it in float32 (--base-dtype float32)")
    if dtype == "bf16" and not all(isinstance(layer.weight.data, numpy.ndarray) for _, layer in frozen):
        raise ValueError("cast_frozen: bf16 needs the NumPy backend (CuPy has no bfloat16); use f16 on a GPU")
    for _, layer in frozen:
        layer.weight.data = layer.weight.data.astype(target)
    return [name for name, _ in frozen]


def trainable_report(model: Module) -> str:
    """The one-line summary people know from PEFT's ``print_trainable_parameters``."""
    total = model.num_parameters()
    trainable = model.num_parameters(trainable_only=True)
    return (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")
