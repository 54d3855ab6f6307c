"""LoRA: low-rank adaptation (Hu et al. 2022; lectures 000, 001, 003, 004).

A frozen weight W (d_out x d_in) gets a trainable low-rank update:

    h = W x + s * B (A x),     A: (r x d_in),  B: (d_out x r),  s = alpha / r

(s = alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023). Only A and B are trained: r (d_in + d_out)
numbers instead of d_in * d_out (lecture 003's count). B starts at zero, so the adapted model
starts exactly at the pretrained one; A starts random (PEFT's default: Kaiming-uniform, bound
1/sqrt(d_in); or Gaussian with std 1/r).

``B (A x)`` is computed as two thin products — x -> r numbers -> d_out numbers — never by forming
the d_out x d_in matrix BA. The scale is applied to the r-wide middle (cheapest place).
After training, ``merge`` folds s*BA into W once, and inference costs nothing extra.

QLoRA is the same layer over a 4-bit base (``minift.quant.Linear4bit``): only how W is stored
changes, so ``base_layer`` may be a ``Linear`` or a ``Linear4bit``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import numpy
import regex

import minift.autograd.functional as F
from minift.autograd import Function, is_grad_enabled, no_grad
from minift.backend import xp
from minift.cuda import kernels
from minift.nn import Linear, Module, ModuleDict
from minift.nn.linear4bit import Linear4bit

#: PEFT's default targets for Llama models: the query and value projections.
DEFAULT_TARGETS = ["q_proj", "v_proj"]


#: Seconds one ``target_modules`` regex may take to match one module name.
REGEX_TIMEOUT_S = 1.0


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_targets(targets) -> None:
    """A list of names, or one regex that compiles."""
    if isinstance(targets, str):
        try:
            regex.compile(targets)
        except regex.error as exc:
            raise ValueError(f"LoraConfig.target_modules {targets!r} is not a valid regex ({exc})") from None
    elif not (isinstance(targets, (list, tuple, set)) and all(isinstance(t, str) for t in targets)):
        raise ValueError(f"LoraConfig.target_modules must be a list of module names or a regex string, "
                         f"got {targets!r}")


@dataclass
class LoraConfig:
    """The fields users know from PEFT's ``LoraConfig``, validated on construction."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    layers_to_transform: list[int] | int | None = None
    base_model_name_or_path: str | None = None
    task_type: str = "CAUSAL_LM"
    seed: int = 0
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not _is_real(self.lora_alpha) or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig.lora_alpha must be a finite positive number, got {self.lora_alpha!r}")
        if not _is_real(self.lora_dropout) or not 0 <= self.lora_dropout < 1:  # NaN fails 0 <= x
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"LoraConfig.init_lora_weights must be True, False or 'gaussian', "
                             f"got {self.init_lora_weights!r}")
        if self.target_modules is None:
            self.target_modules = list(DEFAULT_TARGETS)
        _check_targets(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]

    def targets(self, name: str) -> bool:
        """Whether module ``name`` is a target, by PEFT's rules: a string is a regex that must
        match the whole name; a list matches a name equal to an entry or ending in "." + entry.

        The regex comes from a file someone else wrote, and a pattern such as ``((.|\\w)+)+X``
        backtracks for longer than the universe's age; the ``regex`` package's timeout turns
        that into an error naming the pattern."""
        if not isinstance(self.target_modules, str):
            return any(name == t or name.endswith("." + t) for t in self.target_modules)
        try:
            return regex.fullmatch(self.target_modules, name, timeout=REGEX_TIMEOUT_S) is not None
        except TimeoutError:
            raise ValueError(f"LoraConfig.target_modules regex {self.target_modules!r} took over {REGEX_TIMEOUT_S} s "
                             f"to match the module name {name!r} (catastrophic backtracking); write a simpler "
                             "pattern or list the module names") from None

    @property
    def scaling(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA (keeps updates stable as r grows)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_dict(self) -> dict:
        """The ``adapter_config.json`` content, with PEFT's field names."""
        d = {k: v for k, v in asdict(self).items() if k not in ("seed", "extra")}
        return {**self.extra, **d, "peft_type": "LORA", "fan_in_fan_out": False, "inference_mode": True,
                "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False}

    @classmethod
    def from_peft_dict(cls, d: dict) -> LoraConfig:
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"not a LoRA adapter: peft_type={d.get('peft_type')!r}")
        if d.get("use_dora"):
            raise ValueError("DoRA adapters are not supported")
        if d.get("rank_pattern") or d.get("alpha_pattern"):
            raise ValueError("per-module rank_pattern / alpha_pattern is not supported")
        known = {f for f in cls.__dataclass_fields__ if f not in ("extra", "seed")}
        init = d.get("init_lora_weights", True)
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["init_lora_weights"] = init if init in (True, False, "gaussian") else True
        return cls(**kwargs)


def init_lora_A(shape, how, rng: numpy.random.Generator):
    """PEFT's initialisations of A: Kaiming-uniform with a = sqrt(5) (bound = 1/sqrt(d_in), the
    default of a PyTorch Linear), or N(0, (1/r)^2) for "gaussian"; zeros for False (testing)."""
    r, d_in = shape
    if how == "gaussian":
        return rng.normal(0.0, 1.0 / r, size=shape)
    if how is False:
        return numpy.zeros(shape)
    bound = 1.0 / math.sqrt(d_in)
    return rng.uniform(-bound, bound, size=shape)


class LoraLinear(Module):
    """A frozen ``Linear`` (``base_layer``) plus named low-rank adapters ``lora_A[name]``,
    ``lora_B[name]`` — the parameter names PEFT uses, so adapters load in both directions."""

    def __init__(self, base_layer: Linear | Linear4bit):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = ModuleDict()
        self.lora_B = ModuleDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._rng = numpy.random.default_rng(0)

    @property
    def weight(self):
        return self.base_layer.weight

    def add_adapter(self, name: str, config: LoraConfig, rng: numpy.random.Generator) -> None:
        d_out, d_in = self.base_layer.out_features, self.base_layer.in_features
        if config.r > min(d_in, d_out):
            raise ValueError(f"LoRA rank r={config.r} is larger than the matrix it adapts "
                             f"({d_out} x {d_in}); a rank above min(d_out, d_in) adds nothing")
        dtype = _compute_dtype(self.base_layer)
        a, b = Linear(d_in, config.r, rng=rng, dtype=dtype), Linear(config.r, d_out, rng=rng, dtype=dtype)
        a.weight.data = xp.asarray(init_lora_A((config.r, d_in), config.init_lora_weights, rng).astype(dtype))
        b.weight.data = xp.zeros((d_out, config.r), dtype=dtype)
        self.lora_A[name], self.lora_B[name] = a, b
        self.scaling[name] = config.scaling
        self.dropout[name] = config.lora_dropout
        self._rng = numpy.random.default_rng(rng.integers(2**31))

    def delta_weight(self, name: str):
        """s * B A: the (d_out x d_in) update this adapter stands for (formed only to merge)."""
        return self.scaling[name] * (self.lora_B[name].weight.data @ self.lora_A[name].weight.data)

    def forward(self, x):
        y = self.base_layer(x)
        if self.disabled:
            return y
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            h = F.dropout(x, self.dropout[name], self._rng, self.training) if self.dropout[name] else x
            A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
            if kernels.use_lora_kernels(getattr(h, "data", h)):  # backend=cupy: the CUDA kernels
                y = LoraKernelUpdate.apply(y, h, A, B, scale=s)
                continue
            t = self.lora_A[name](h) * s  # (..., r): the narrow middle
            y = y + self.lora_B[name](t)
        return y

    def merge(self, names=None) -> None:
        """W <- W + s B A for each adapter not yet merged (lecture 003: zero-cost inference).

        On a 4-bit base (QLoRA) the sum is *re-quantized* to NF4: W + s B A is rounded to the
        16 levels again, so the merged layer is not exactly base + adapter (the logit drift is
        measured by ``minift.studies.qlora_merge.merge_drift``). For an exact merge, ``dequantize_model``
        first and merge into the float weights.
        """
        with no_grad():
            for name in names or self.active_adapters:
                if name not in self.merged_adapters:
                    self._add_to_base(self.delta_weight(name))
                    self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """W <- W - s B A, undoing ``merge`` (exact up to float rounding; on a 4-bit base it
        re-quantizes once more, so the base does not return to its original codes)."""
        with no_grad():
            while self.merged_adapters:
                self._add_to_base(-self.delta_weight(self.merged_adapters.pop()))

    def _add_to_base(self, delta) -> None:
        base = self.base_layer
        if isinstance(base, Linear4bit):
            base.requantize(base.dequantized_weight() + delta)
        else:
            base.weight.data = base.weight.data + delta

    def __repr__(self) -> str:
        ranks = {n: self.lora_A[n].weight.shape[0] for n in self.lora_A.keys()}
        return f"LoraLinear({self.base_layer!r}, adapters={ranks}, active={self.active_adapters})"


def _compute_dtype(layer):
    """The float type the adapters of ``layer`` are made in: its weight's, or for a 4-bit base
    the type its weight is dequantized to."""
    return layer.compute_dtype if isinstance(layer, Linear4bit) else layer.weight.dtype


def _layer_of(name: str) -> int | None:
    found = re.search(r"(?:^|\.)layers\.(\d+)\.", name + ".")
    return int(found.group(1)) if found else None


def target_module_names(model: Module, config: LoraConfig) -> list[str]:
    """Names of the Linear modules ``config`` selects, with PEFT's matching rules: a string is a
    regex that must match the whole module name; a list matches a name equal to an entry or
    ending with "." + entry. ``layers_to_transform`` keeps only those block numbers."""
    names = []
    for name, module in model.named_modules():
        if not config.targets(name):
            continue
        if config.layers_to_transform is not None and _layer_of(name) not in config.layers_to_transform:
            continue
        if not isinstance(module, (Linear, Linear4bit, LoraLinear)):
            raise TypeError(f"LoRA target {name!r} is a {type(module).__name__}, not a Linear layer")
        names.append(name)
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, (Linear, Linear4bit))][:6]
        raise ValueError(f"target_modules {config.target_modules!r} matched no Linear layer; "
                         f"Linear layers are named like {linears}")
    return names


def lora_layers(model: Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


# ---- the kernel path (backend=cupy): kernels/lora_shrink_expand.cu ---------------------------
class LoraKernelUpdate(Function):
    """out = y + s (x A^T) B^T on the CUDA kernels — the same update as the two Linear calls above.

    Backward (u = g B):  dy = g,  dx = s u A,  dA = s u^T x,  dB = s g^T t  (``kernels.lora_backward``),
    each kernel launched only if its gradient is wanted. With no gradient wanted at all (inference),
    the fused kernel runs and t never leaves shared memory. Saves: x, A, B and t = x A^T.
    """

    @staticmethod
    def forward(ctx, y, x, A, B, scale):
        xp = kernels.array_module(x)
        x2 = xp.ascontiguousarray(x.reshape(-1, x.shape[-1]))  # (M, d_in), M = all leading axes
        A, B = xp.ascontiguousarray(A), xp.ascontiguousarray(B)
        out = y.reshape(-1, y.shape[-1]).copy()  # (M, d_out); the kernels add into it
        if is_grad_enabled() and any(ctx.needs_input_grad[1:]):  # a backward will come: keep t
            t = kernels.lora_shrink(x2, A)
            kernels.lora_expand(t, B, out, scale)
            ctx.save_for_backward(x2, A, B, t)
            ctx.scale, ctx.x_shape = scale, x.shape
        else:
            kernels.lora_fused(x2, A, B, scale, out)
        return out.reshape(y.shape)

    @staticmethod
    def backward(ctx, g):
        x2, A, B, t = ctx.saved
        g2 = kernels.array_module(g).ascontiguousarray(g.reshape(-1, g.shape[-1]))
        dx, dA, dB = kernels.lora_backward(x2, A, B, t, g2, ctx.scale, needs=ctx.needs_input_grad[1:])
        return (g if ctx.needs_input_grad[0] else None, None if dx is None else dx.reshape(ctx.x_shape), dA, dB)
