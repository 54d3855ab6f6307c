"""``Module`` and ``Parameter``: how a model keeps track of its weights.

A ``Parameter`` is a leaf Tensor that a model owns and an optimizer may update. A ``Module``
registers every Parameter and sub-Module assigned to it as an attribute, so that
``named_parameters()`` can list them with dotted names — ``model.layers.0.self_attn.q_proj.weight``
— the names checkpoints, adapters and freezing patterns refer to.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy

from minift.autograd import Tensor
from minift.backend import asarray, xp


class Parameter(Tensor):
    """A trainable weight: a leaf Tensor with ``requires_grad=True`` unless frozen."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True, dtype=None):
        super().__init__(data, requires_grad=requires_grad, dtype=dtype)

    def __repr__(self) -> str:
        state = "trainable" if self.requires_grad else "frozen"
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, {state})"


class Module:
    """Base class of layers and models: a tree of sub-modules with parameters at the leaves."""

    def __init__(self):
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    # ---- walking the tree ---------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, trainable_only: bool = False) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter) pairs; a shared (tied) Parameter is listed once, first name."""
        seen = set()
        for module_name, module in self.named_modules():
            for name, param in module._parameters.items():
                if id(param) in seen or (trainable_only and not param.requires_grad):
                    continue
                seen.add(id(param))
                yield (f"{module_name}.{name}" if module_name else name), param

    def parameters(self, trainable_only: bool = False) -> list[Parameter]:
        return [p for _, p in self.named_parameters(trainable_only)]

    def get_submodule(self, dotted: str) -> Module:
        module = self
        for part in dotted.split(".") if dotted else []:
            if part not in module._modules:
                raise AttributeError(f"{type(module).__name__} has no sub-module {part!r} (in {dotted!r})")
            module = module._modules[part]
        return module

    def set_submodule(self, dotted: str, new: Module) -> None:
        """Replace the module at ``dotted`` — how LoRA and quantization swap layers in."""
        parent_name, _, child = dotted.rpartition(".")
        parent = self.get_submodule(parent_name)
        if child not in parent._modules:
            raise AttributeError(f"no sub-module {dotted!r} to replace")
        setattr(parent, child, new)

    # ---- counting and modes ---------------------------------------------------------------
    def num_parameters(self, trainable_only: bool = False) -> int:
        """Numbers in the model (or only the trainable ones). Weights stored outside Parameters —
        a 4-bit layer's codes — count through the layer's ``num_frozen_weights``."""
        count = sum(p.size for p in self.parameters(trainable_only))
        if not trainable_only:
            count += sum(getattr(m, "num_frozen_weights", 0) for _, m in self.named_modules())
        return count

    def train(self, mode: bool = True) -> Module:
        for _, module in self.named_modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def to(self, dtype) -> Module:
        """Cast every parameter to ``dtype`` in place (float64 for gradient checks)."""
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        return self

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """Name -> array for every (unique) parameter; arrays are the live ones, not copies."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters by name; shapes must match exactly.

        ``strict``: every parameter must be present and no unknown name may appear. Errors list
        the offending names so a mismatched checkpoint is diagnosed at once.
        """
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                           f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
        for name, saved in state.items():
            if name not in own:
                continue
            param, value = own[name], asarray(saved)
            if value.shape != param.shape:
                raise ValueError(f"load_state_dict: {name} has shape {value.shape} in the checkpoint "
                                 f"but {param.shape} in the model")
            param.data = value.astype(param.dtype, copy=True)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("]
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        for name, p in self._parameters.items():
            lines.append(f"  {name}: {p!r}")
        return "\n".join(lines) + ")" if len(lines) > 1 else f"{type(self).__name__}()"


class ModuleList(Module):
    """An indexable list of sub-modules, registered under the names "0", "1", ..."""

    def __init__(self, modules=()):
        super().__init__()
        for i, module in enumerate(modules):
            setattr(self, str(i), module)

    def __getitem__(self, i: int) -> Module:
        return self._modules[str(i % len(self))]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


def matching(names, pattern: str | None) -> list[str]:
    """Names that match ``pattern``: a regex searched anywhere in the dotted name (None = all)."""
    if pattern is None:
        return list(names)
    regex = re.compile(pattern)
    return [n for n in names if regex.search(n)]


def normal_init(shape, std: float, rng: numpy.random.Generator, dtype=numpy.float32):
    """N(0, std^2) weights drawn on the host from a seeded generator (same model on any backend)."""
    return xp.asarray(rng.normal(0.0, std, size=shape).astype(dtype))


class ModuleDict(Module):
    """Sub-modules registered by name (a LoRA layer keeps one ``lora_A`` per adapter name)."""

    def __init__(self, modules: dict | None = None):
        super().__init__()
        for name, module in (modules or {}).items():
            setattr(self, name, module)

    def __getitem__(self, name: str) -> Module:
        return self._modules[name]

    def __setitem__(self, name: str, module: Module) -> None:
        setattr(self, name, module)

    def __delitem__(self, name: str) -> None:
        delattr(self, name)

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def keys(self):
        return self._modules.keys()
