"""The adapter library: many PEFT-format LoRA adapters, loaded by name, checked against one base.

Lecture 004 ("Multi-LoRA"): one base model stays in memory; each task is a folder of a few
megabytes (``adapter_config.json`` + ``adapter_model.safetensors``) applied per request. The
library keeps every adapter's A and B in *host* memory, cast to the model's dtype, keyed by the
module they adapt; ``AdapterSlots`` copies the ones a batch needs into the device slots.

Loading validates everything up front, at start-up or at runtime alike, so that a request can
never meet a half-fitting adapter, and nothing is served that PEFT would refuse to load:

- ``minift.io.peft_adapter`` checks the folder itself: the config's fields, complete A/B pairs of
  the adapter's rank, finite values;
- here the config's *scope* (``target_modules``, ``layers_to_transform``, ``layers_pattern``),
  resolved on this base by ``minift.peft.lora.target_module_names`` (the one owner of "which
  modules does this config adapt"), must be exactly the modules the file holds A/B pairs for;
- every pair must have its layer's shapes, and nothing but A/B pairs may be saved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy

from minift.io import lora_pairs, read_adapter_folder
from minift.models import BLOCK_PROJECTIONS
from minift.nn import Linear, Linear4bit, Module
from minift.peft.lora import LoraConfig, target_module_names
from minift.serve.multi_lora import MultiLoraLinear

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
BLOCKS = "layers"  #: the name of the block list in this decoder (model.layers.N), PEFT's layers_pattern


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


class BaseView:
    """The model's modules as the base had them: a ``MultiLoraLinear`` is seen as the layer it
    wraps, and its inner ``base_layer`` is not listed again. Scopes are resolved on this view, so
    an adapter loaded after the engine wrapped the model gets the same scope as one loaded before."""

    def __init__(self, model: Module):
        self.model = model

    def named_modules(self):
        wrapped = ()
        for name, module in self.model.named_modules():
            if name.startswith(wrapped):
                continue
            if isinstance(module, MultiLoraLinear):
                wrapped = (f"{name}.",)
            yield name, module.base_layer if isinstance(module, MultiLoraLinear) else module


def every_projection(model: Module) -> list[str]:
    """Every layer a LoRA adapter for this base could target (q, k, v, o, gate, up, down of each
    block): what a server that loads adapters at runtime wraps at start-up."""
    return target_module_names(BaseView(model), LoraConfig(target_modules=list(BLOCK_PROJECTIONS)))


def read_adapter(model: Module, name: str, folder: str | Path) -> Adapter:
    """Load the PEFT adapter in ``folder`` and check it in full against ``model``: scope, shapes."""
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
    view = BaseView(model)
    modules = dict(view.named_modules())
    layers = {module: _base_layer(modules.get(module), module, where) for module in sorted(pairs)}
    _check_scope(view, config, saved_config.get("layers_pattern"), set(pairs), where)
    dtype, weights = model.dtype, {}
    for module, (a, b) in sorted(pairs.items()):
        d_out, d_in = layers[module].out_features, layers[module].in_features
        for which, array, shape in (("A", a, (config.r, d_in)), ("B", b, (d_out, config.r))):
            if array.shape != shape:
                raise AdapterError(f"{where}: {module}.lora_{which} has shape {array.shape}; "
                                   f"rank {config.r} on this base model needs {shape}")
        weights[module] = (a.astype(dtype), b.astype(dtype))
    return Adapter(name, config.r, config.scaling, weights)


def _base_layer(layer: Module | None, module: str, where: str) -> Linear | Linear4bit:
    """``layer`` (the base's module named ``module``) if it is a float or NF4 Linear, the only
    kinds an adapter may target."""
    if layer is None:
        raise AdapterError(f"{where}: the base model has no layer {module!r}; the adapter was trained on "
                           "another base model, serve it with that one")
    if not isinstance(layer, (Linear, Linear4bit)):
        raise AdapterError(f"{where}: {module!r} is a {type(layer).__name__}, not a Linear layer")
    return layer


def _check_scope(view: BaseView, config: LoraConfig, layers_pattern, saved: set[str], where: str) -> None:
    """The modules ``adapter_config.json`` names on this base must be exactly those with saved A/B:
    a pair outside the scope, or a module in it without one, means the config and the weights
    disagree, and PEFT would not load the folder as saved."""
    fix = "the config and the weights are from different runs; save the adapter again"
    if layers_pattern not in (None, BLOCKS, [BLOCKS]):
        raise AdapterError(f"{where}: adapter_config.json field layers_pattern is {layers_pattern!r}, but this "
                           f"base's blocks are {BLOCKS!r} (model.{BLOCKS}.N); set it to {BLOCKS!r} or null")
    try:
        scope = set(target_module_names(view, config))
    except (ValueError, TypeError) as exc:
        raise AdapterError(f"{where}: adapter_config.json target_modules / layers_to_transform: {exc}") from None
    fields = f"target_modules={config.target_modules!r}, layers_to_transform={config.layers_to_transform!r}"
    if saved - scope:
        raise AdapterError(f"{where}: adapter_model.safetensors holds lora_A/lora_B for {min(saved - scope)!r}, "
                           f"outside the scope of adapter_config.json ({fields}); {fix}")
    if scope - saved:
        raise AdapterError(f"{where}: adapter_config.json ({fields}) adapts {min(scope - saved)!r}, but "
                           f"adapter_model.safetensors has no lora_A/lora_B for it; {fix}")


class AdapterLibrary:
    """Named adapters for one base model: ``add(name, folder)``, lookup, and what they adapt."""

    def __init__(self, model: Module):
        self.model = model
        self.adapters: dict[str, Adapter] = {}

    def add(self, name: str, folder: str | Path, check=None) -> Adapter:
        """Read and check the adapter in ``folder``; ``check(adapter)``, if given, is a last test
        (the engine's: does it fit the slots?) that may raise before the adapter joins."""
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise AdapterError(f"adapter name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first to replace it")
        adapter = read_adapter(self.model, name, folder)
        if check is not None:
            check(adapter)
        self.adapters[name] = adapter
        return adapter

    def remove(self, name: str) -> Adapter:
        """Take ``name`` out of the library (``KeyError`` naming the loaded ones if absent)."""
        adapter = self[name]
        del self.adapters[name]
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

