"""The adapter library: many PEFT-format LoRA adapters, loaded by name, checked against one base.

Lecture 004 ("Multi-LoRA"): one base model stays in memory; each task is a folder of a few
megabytes (``adapter_config.json`` + ``adapter_model.safetensors``) applied per request. The
library keeps every adapter's A and B in *host* memory, cast to the model's dtype, keyed by the
module they adapt; ``AdapterSlots`` copies the ones a batch needs into the device slots.

Loading validates everything up front, so that a request can never meet a half-fitting adapter:
``minift.io.peft_adapter`` checks the folder itself (the config's fields, complete A/B pairs of
the adapter's rank, finite values); here every pair must name a Linear layer of the base model
and have that layer's shapes, and nothing but A/B pairs may be saved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy

from minift.io import lora_pairs, read_adapter_folder
from minift.nn import Linear, Module
from minift.peft.lora import LoraConfig
from minift.serve.multi_lora import MultiLoraLinear

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class AdapterError(ValueError):
    """An adapter cannot be served with this base model (the message says why)."""


@dataclass
class Adapter:
    """One loaded adapter: rank, scale s, and host copies of (A, B) per adapted module."""

    name: str
    rank: int
    scale: float
    weights: dict[str, tuple[numpy.ndarray, numpy.ndarray]]  # module -> (A (r, d_in), B (d_out, r))

    @property
    def nbytes(self) -> int:
        """Bytes of A and B over all modules: what a move into a device slot copies."""
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def _base_shape(model: Module, module: str, where: str) -> tuple[int, int]:
    """(d_out, d_in) of the Linear layer ``module`` (possibly already wrapped for serving)."""
    try:
        layer = model.get_submodule(module)
    except AttributeError:
        raise AdapterError(f"{where}: the base model has no layer {module!r}") from None
    if not isinstance(layer, (Linear, MultiLoraLinear)):
        raise AdapterError(f"{where}: {module!r} is a {type(layer).__name__}, not a Linear layer")
    return tuple(layer.weight.shape)


def read_adapter(model: Module, name: str, folder: str | Path) -> Adapter:
    """Load the PEFT adapter in ``folder`` and check it against ``model``'s layer shapes."""
    where = f"adapter {name!r} ({folder})"
    try:
        saved_config, saved = read_adapter_folder(folder)
        config = LoraConfig.from_peft_dict(saved_config)
    except (OSError, ValueError, TypeError) as exc:
        raise AdapterError(f"{where}: {exc}") from None
    if config.bias != "none" or config.modules_to_save:
        raise AdapterError(f"{where}: bias={config.bias!r} / modules_to_save are not served; plain LoRA only")
    pairs, rest = lora_pairs(saved)
    if rest:
        raise AdapterError(f"{where}: tensor {min(rest)!r} is not a LoRA A/B weight; multi-LoRA serving "
                           "supports plain LoRA (no modules_to_save, no bias training)")
    dtype, weights = model.dtype, {}
    for module, (a, b) in sorted(pairs.items()):
        d_out, d_in = _base_shape(model, module, where)
        for which, array, shape in (("A", a, (config.r, d_in)), ("B", b, (d_out, config.r))):
            if array.shape != shape:
                raise AdapterError(f"{where}: {module}.lora_{which} has shape {array.shape}; "
                                   f"rank {config.r} on this base model needs {shape}")
        weights[module] = (a.astype(dtype), b.astype(dtype))
    return Adapter(name, config.r, config.scaling, weights)


class AdapterLibrary:
    """Named adapters for one base model: ``add(name, folder)``, lookup, and what they adapt."""

    def __init__(self, model: Module):
        self.model = model
        self.adapters: dict[str, Adapter] = {}

    def add(self, name: str, folder: str | Path) -> Adapter:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise AdapterError(f"adapter name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        adapter = read_adapter(self.model, name, folder)
        self.adapters[name] = adapter
        return adapter

    def __getitem__(self, name: str) -> Adapter:
        if name not in self.adapters:
            raise KeyError(f"unknown adapter {name!r}; loaded: {sorted(self.adapters) or 'none'}")
        return self.adapters[name]

    def __contains__(self, name) -> bool:
        return name in self.adapters

    def __len__(self) -> int:
        return len(self.adapters)

    def names(self) -> list[str]:
        return sorted(self.adapters)

    def target_modules(self) -> set[str]:
        """Every module some adapter adapts: the layers that need a ``MultiLoraLinear``."""
        return {m for a in self.adapters.values() for m in a.weights}

    def max_rank(self) -> int:
        return max((a.rank for a in self.adapters.values()), default=1)

