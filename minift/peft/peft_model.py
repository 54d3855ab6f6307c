"""``get_peft_model`` and ``PeftModel``: LoRA adapters put into a model, managed, saved, loaded.

The wrapper mirrors PEFT's object layout — ``PeftModel.base_model`` (a ``LoraModel``) whose
``.model`` is the original network — so parameter names come out exactly as in PEFT:
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``. On disk the adapter
name is dropped (``...q_proj.lora_A.weight``), as PEFT does, in ``adapter_model.safetensors``
next to ``adapter_config.json``; ``minift.io.peft_adapter`` writes, reads and checks that folder.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy

from minift.backend import asarray
from minift.io.peft_adapter import read_adapter_folder, write_adapter_folder
from minift.nn import Linear4bit, Module, ModuleDict, trainable_report
from minift.peft.lora import LoraConfig, LoraLinear, lora_layers, target_module_names


class ModulesToSave(Module):
    """A layer trained in full next to LoRA (``modules_to_save``, e.g. a new classifier head):
    the original stays frozen, a trainable copy per adapter is used while that adapter is on."""

    def __init__(self, original: Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = ModuleDict()
        self.active: str | None = None

    def add_adapter(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.data = p.data.copy()
            p.requires_grad_(True)
        self.modules_to_save[name] = clone
        self.active = name

    def forward(self, *args, **kwargs):
        module = self.modules_to_save[self.active] if self.active in self.modules_to_save else self.original_module
        return module(*args, **kwargs)


class LoraModel(Module):
    """Holds the adapted network as ``.model`` (PEFT's ``LoraModel`` layout)."""

    def __init__(self, model: Module):
        super().__init__()
        self.model = model


class PeftModel(Module):
    """A model with one or more named LoRA adapters; forward runs the active one."""

    def __init__(self, model: Module, config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        self.base_model = LoraModel(model)
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter = adapter_name
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    # ---- the wrapped model --------------------------------------------------------------
    @property
    def model(self) -> Module:
        return self.base_model.model

    @property
    def config(self):
        return self.model.config

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def hidden(self, *args, **kwargs):
        return self.model.hidden(*args, **kwargs)

    def loss(self, *args, **kwargs):
        return self.model.loss(*args, **kwargs)

    def label_logprobs(self, *args, **kwargs):
        return self.model.label_logprobs(*args, **kwargs)

    def generate(self, input_ids, max_new_tokens: int, **sampling):
        from minift.models.generate import generate  # noqa: PLC0415

        return generate(self, input_ids, max_new_tokens, **sampling)

    @property
    def dtype(self):
        return self.model.dtype

    def gradient_checkpointing_enable(self, blocks: int | None = None) -> None:
        """Checkpoint the wrapped model's bottom ``blocks`` blocks (None: all); the adapters
        inside them are recomputed too."""
        self.model.gradient_checkpointing_enable(blocks)

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing_disable()

    # ---- adapters ------------------------------------------------------------------------
    def add_adapter(self, name: str, config: LoraConfig) -> None:
        """Insert adapter ``name`` into every target layer (LoRA-wrapping them on first use)."""
        if name in self.peft_config:
            raise ValueError(f"an adapter named {name!r} already exists")
        rng = numpy.random.default_rng(config.seed)
        for module_name in target_module_names(self.model, config):
            layer = self.model.get_submodule(module_name)
            if not isinstance(layer, LoraLinear):
                layer = LoraLinear(layer)
                self.model.set_submodule(module_name, layer)
            layer.add_adapter(name, config, rng)
        for module_name in config.modules_to_save or []:
            self._add_module_to_save(module_name, name)
        self.peft_config[name] = config

    def _add_module_to_save(self, module_name: str, adapter: str) -> None:
        matches = [n for n, m in self.model.named_modules()
                   if (n == module_name or n.endswith("." + module_name)) and not isinstance(m, ModulesToSave)
                   and ".modules_to_save." not in n and ".original_module" not in n]
        if not matches:
            raise ValueError(f"modules_to_save entry {module_name!r} matches no module")
        for n in matches:
            wrapper = self.model.get_submodule(n)
            if not isinstance(wrapper, ModulesToSave):
                wrapper = ModulesToSave(wrapper)
                self.model.set_submodule(n, wrapper)
            wrapper.add_adapter(adapter)

    def _check_adapter(self, name: str) -> None:
        if name not in self.peft_config:
            raise KeyError(f"unknown adapter {name!r}; this model has {sorted(self.peft_config)}")

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the adapter that runs and trains; every other adapter is frozen."""
        self._check_adapter(name)
        self.active_adapter = name
        config = self.peft_config[name]
        for _, layer in lora_layers(self.model):
            for adapter in layer.lora_A.keys():
                on = adapter == name
                layer.lora_A[adapter].weight.requires_grad_(on)
                layer.lora_B[adapter].weight.requires_grad_(on)
            layer.active_adapters = [name] if name in layer.lora_A else []
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(config.bias in ("all", "lora_only"))
        if config.bias == "all":
            for pname, p in self.model.named_parameters():
                if pname.endswith(".bias"):
                    p.requires_grad_(True)
        for _, wrapper in self.model.named_modules():
            if isinstance(wrapper, ModulesToSave):
                wrapper.active = name
                for adapter in wrapper.modules_to_save.keys():
                    for p in wrapper.modules_to_save[adapter].parameters():
                        p.requires_grad_(adapter == name)

    def delete_adapter(self, name: str) -> None:
        self._check_adapter(name)
        if len(self.peft_config) == 1:
            raise ValueError("cannot delete the only adapter; use merge_and_unload() or unload()")
        for _, layer in lora_layers(self.model):
            if name in layer.merged_adapters:
                raise ValueError(f"adapter {name!r} is merged; unmerge_adapter() first")
            if name in layer.lora_A:
                del layer.lora_A[name], layer.lora_B[name]
                layer.scaling.pop(name), layer.dropout.pop(name)
        del self.peft_config[name]
        if self.active_adapter == name:
            self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block (merged weights are unmerged first)."""
        layers = [layer for _, layer in lora_layers(self.model)]
        self.unmerge_adapter()
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    def merge_adapter(self) -> None:
        for _, layer in lora_layers(self.model):
            layer.merge()

    def unmerge_adapter(self) -> None:
        for _, layer in lora_layers(self.model):
            layer.unmerge()

    def merge_and_unload(self) -> Module:
        """Fold the active adapter into the base weights and return the plain model."""
        self.merge_adapter()
        return self.unload()

    def unload(self) -> Module:
        """Remove all LoRA layers (un-merged adapters are dropped) and return the plain model."""
        for name, layer in lora_layers(self.model):
            self.model.set_submodule(name, layer.base_layer)
        for name, wrapper in [(n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSave)]:
            self.model.set_submodule(name, wrapper.modules_to_save[wrapper.active]
                                     if wrapper.active in wrapper.modules_to_save else wrapper.original_module)
        return self.model

    def print_trainable_parameters(self) -> None:
        print(trainable_report(self))

    # ---- files ---------------------------------------------------------------------------
    def adapter_state_dict(self, name: str | None = None) -> dict:
        """PEFT's saved keys for adapter ``name``: adapter name dropped, ``base_model.model.`` kept."""
        name = name or self.active_adapter
        self._check_adapter(name)
        config, state = self.peft_config[name], {}
        for pname, p in self.named_parameters():
            if f".lora_A.{name}." in pname or f".lora_B.{name}." in pname:
                state[pname.replace(f".{name}.", ".")] = p.data
            elif f".modules_to_save.{name}." in pname:
                state[pname.replace(f".modules_to_save.{name}.", ".")] = p.data
            elif pname.endswith(".bias") and config.bias != "none" and p.requires_grad:
                state[pname] = p.data  # PEFT keeps the in-memory name (".base_layer.bias")
        return state

    def save_pretrained(self, folder: str | Path, adapter_name: str | None = None) -> Path:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format); on an NF4
        base (QLoRA) the file's metadata also records that, see ``base_storage``."""
        name = adapter_name or self.active_adapter
        state = self.adapter_state_dict(name)
        return write_adapter_folder(folder, self.peft_config[name].to_peft_dict(), state, base=self.base_storage())

    def base_storage(self) -> dict | None:
        """``{"quantization": "nf4", "blocksize": .., "double_quant": ..}`` when the base holds NF4
        layers, else None. A QLoRA adapter learned to correct Q(W), not W, so a later merge must
        quantize the float base the same way and fold the adapter into its dequantized Q(W)."""
        for _, module in self.model.named_modules():
            if isinstance(module, Linear4bit):
                return {"quantization": "nf4", "blocksize": int(module.blocksize),
                        "double_quant": bool(module.double_quant)}
        return None

    def load_adapter(self, folder: str | Path, adapter_name: str) -> None:
        """Add the adapter saved in ``folder`` under ``adapter_name`` and load its weights.

        All or nothing: when the folder does not fit this model, the error leaves no trace of
        ``adapter_name`` behind (no half-registered adapter that a retry would collide with)."""
        config, saved = _read(folder)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        try:
            self.add_adapter(adapter_name, config)
            self._load_weights(saved, adapter_name, folder)
        except BaseException:
            _discard_adapter(self.model, adapter_name)
            self.peft_config.pop(adapter_name, None)
            self.set_adapter(self.active_adapter)
            raise

    def _load_weights(self, saved: dict, name: str, folder) -> None:
        expected = {k: v for k, v in self.adapter_state_dict(name).items()}
        own = dict(self.named_parameters())
        missing = sorted(set(expected) - set(saved))
        unknown = sorted(set(saved) - set(expected))
        if missing or unknown:
            raise ValueError(f"adapter in {folder} does not fit this model: missing {missing[:4]}, "
                             f"unexpected {unknown[:4]}")
        for key, value in saved.items():
            param = own[_in_memory_name(key, name, own)]
            if value.shape != param.shape:
                raise ValueError(f"adapter in {folder} does not fit this model: {key} has shape "
                                 f"{value.shape}, the model needs {param.shape}")
            param.data = asarray(value.astype(param.dtype))

    @classmethod
    def from_pretrained(cls, model: Module, folder: str | Path, adapter_name: str = "default") -> PeftModel:
        """Wrap ``model`` and load the adapter saved in ``folder`` (by minift or by PEFT). On an
        error ``model`` is given back as it was: unwrapped, its parameters' ``requires_grad`` kept."""
        config, saved = _read(folder)
        trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        try:
            peft_model = cls(model, config, adapter_name)
            peft_model._load_weights(saved, adapter_name, folder)
        except BaseException:
            _discard_adapter(model, adapter_name)
            for name, p in model.named_parameters():
                p.requires_grad_(trainable[name])
            raise
        return peft_model


def _discard_adapter(model: Module, name: str) -> None:
    """Remove every trace of adapter ``name`` from ``model`` (what a failed load undoes): its
    A/B pairs and module copies, and the wrappers that held nothing else."""
    for module_name, layer in lora_layers(model):
        if name in layer.lora_A:
            del layer.lora_A[name], layer.lora_B[name]
            layer.scaling.pop(name, None), layer.dropout.pop(name, None)
        if not len(layer.lora_A):
            model.set_submodule(module_name, layer.base_layer)
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
    for module_name, wrapper in wrappers:
        if name in wrapper.modules_to_save:
            del wrapper.modules_to_save[name]
        if not len(wrapper.modules_to_save):
            model.set_submodule(module_name, wrapper.original_module)


def _read(folder: str | Path) -> tuple[LoraConfig, dict]:
    """The adapter in ``folder``, checked by the format's reader, its config parsed for LoRA."""
    config, saved = read_adapter_folder(folder)
    try:
        return LoraConfig.from_peft_dict(config), saved
    except ValueError as exc:
        raise ValueError(f"{Path(folder) / 'adapter_config.json'}: {exc}") from None


def _in_memory_name(saved_key: str, adapter: str, own: dict) -> str:
    """Put the adapter name back into a saved key (the inverse of ``adapter_state_dict``)."""
    for part in (".lora_A.", ".lora_B."):
        if part in saved_key:
            return saved_key.replace(part, f"{part}{adapter}.")
    head, _, leaf = saved_key.rpartition(".")
    candidate = f"{head}.modules_to_save.{adapter}.{leaf}"
    return candidate if candidate in own else saved_key


def get_peft_model(model: Module, config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Freeze ``model`` and add a LoRA adapter to the layers ``config`` targets."""
    return PeftModel(model, config, adapter_name)
