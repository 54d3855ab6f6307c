"""Many LoRA adapters in one batch: the shared base product plus a per-row gathered delta.

A batch of requests that use *different* adapters still shares the base weight W, so

    y[b] = W x[b] + s[i_b] * B[i_b] (A[i_b] x[b])        i_b = the adapter slot of row b

runs ``W x`` once for the whole batch (one big matmul) and only the thin LoRA part per row.
The LoRA weights of the adapters in use sit *stacked* in "slots" (``A_stack`` (S, R, d_in),
``B_stack`` (S, d_out, R)); each row gathers its slot by index. This is Punica's BGMV
("batched gather matrix-vector", Chen et al. 2023) and the batching trick of S-LoRA
(Sheng et al. 2023); lecture 004, "Batching Across Adapters". A row with slot -1 is a
base-model request and gets no delta at all.

Adapters of different ranks share one stack by zero-padding to the largest rank R: the extra
rows of A are zero, so (A x) has zeros in the padded places, and the extra columns of B are
zero, so those zeros are never picked up. The padded product is B A exactly, not approximately.

Legend: B batch rows, T tokens, S slots, R (padded) rank, d_in / d_out the layer's widths.
"""

from __future__ import annotations

import numpy

from minift.autograd import Tensor
from minift.backend import to_numpy, xp
from minift.cuda import kernels
from minift.nn import Linear, Linear4bit, Module

NO_ADAPTER = -1  #: slot index of a row that runs the base model alone


def lora_gather_delta(x, A_stack, B_stack, scales, slot_idx):
    """The per-row LoRA delta s_i B_i A_i x of a multi-adapter batch: (B, T, d_out).

    x (B, T, d_in); A_stack (S, R, d_in); B_stack (S, d_out, R); scales (S,); slot_idx (B,)
    ints, ``NO_ADAPTER`` for base rows (their delta is zero). The one place that chooses the
    path: the BGMV kernel (``kernels/bgmv.cu``) for float32 CuPy arrays, as ``LoraLinear``
    decides (``minift.cuda.kernels.use_lora_kernels``), else this reference: gather each row's A
    and B, then two batched products — ``einsum("btd,brd->btr")`` and ``("btr,bor->bto")`` written
    as ``matmul``, whose dispatch costs less than einsum's path search at decode sizes (T = 1).
    """
    if kernels.use_lora_kernels(x):
        return _bgmv_delta(x, A_stack, B_stack, scales, slot_idx)
    slot_idx = xp.asarray(slot_idx)
    delta = xp.zeros((*x.shape[:-1], B_stack.shape[1]), dtype=x.dtype)  # (B, T, d_out)
    rows = xp.nonzero(slot_idx != NO_ADAPTER)[0]
    if rows.size == 0:
        return delta
    slots = slot_idx[rows]
    a, b = A_stack[slots], B_stack[slots]  # (b, R, d_in), (b, d_out, R): gathered per row
    t = xp.matmul(x[rows], a.transpose(0, 2, 1))  # (b, T, R): the narrow middle
    t *= scales[slots][:, None, None]
    delta[rows] = xp.matmul(t, b.transpose(0, 2, 1))  # (b, T, d_out)
    return delta


def _bgmv_delta(x, A_stack, B_stack, scales, slot_idx):
    """``lora_gather_delta`` through the kernel: every token is one kernel row, with its
    request's slot (the kernel works on (M, d_in) rows, M = B * T)."""
    b, t, d_in = x.shape
    rows = xp.ascontiguousarray(x.reshape(b * t, d_in))
    idx = xp.asarray(numpy.repeat(to_numpy(slot_idx).astype(numpy.int32), t))  # (B * T,)
    delta = xp.zeros((b * t, B_stack.shape[1]), dtype=x.dtype)
    kernels.bgmv(rows, A_stack, B_stack, idx, scales, delta)
    return delta.reshape(b, t, -1)


class MultiLoraLinear(Module):
    """A frozen ``Linear`` (or NF4 ``Linear4bit``, QLoRA's base) whose forward adds, per batch
    row, the LoRA delta of that row's slot. Only ``W x`` depends on how W is stored, so one
    wrapper serves both: the delta is computed in float from the slots either way.

    Swapped in for the target layers by ``add_multi_lora`` (model surgery, as ``LoraLinear``
    is for training). The slot arrays are plain arrays, not Parameters: serving never trains,
    so the delta enters the graph as a constant. ``AdapterSlots`` allocates and fills them;
    the engine sets ``slot_idx`` (one entry per batch row) before each forward.
    """

    def __init__(self, base_layer: Linear | Linear4bit):
        super().__init__()
        self.base_layer = base_layer
        self.A_stack = self.B_stack = self.scales = None  # (S, R, d_in), (S, d_out, R), (S,)
        self.slot_idx = None  # (B,) ints, NO_ADAPTER for base rows; None = every row is base

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the base weight, whether it is stored in float or in NF4."""
        return self.base_layer.out_features, self.base_layer.in_features

    def forward(self, x):
        y = self.base_layer(x)  # W x once for the whole batch
        if self.slot_idx is None:
            return y
        raw = x.data if isinstance(x, Tensor) else x
        return y + Tensor(lora_gather_delta(raw, self.A_stack, self.B_stack, self.scales, self.slot_idx))

    def __repr__(self) -> str:
        slots = None if self.A_stack is None else tuple(self.A_stack.shape[:2])
        return f"MultiLoraLinear({self.base_layer!r}, slots x rank={slots})"


def add_multi_lora(model: Module, module_names) -> dict[str, MultiLoraLinear]:
    """Replace each named ``Linear`` or ``Linear4bit`` of ``model`` by a ``MultiLoraLinear``
    around it (in place)."""
    layers = {}
    for name in sorted(module_names):
        layer = model.get_submodule(name)
        if not isinstance(layer, MultiLoraLinear):
            if not isinstance(layer, (Linear, Linear4bit)):
                raise TypeError(f"multi-LoRA target {name!r} is a {type(layer).__name__}, not a Linear "
                                "or Linear4bit layer; adapters can only target the projections")
            layer = MultiLoraLinear(layer)
            model.set_submodule(name, layer)
        layers[name] = layer
    return layers


def set_batch_slots(layers, slot_idx) -> None:
    """Tell every wrapped layer which slot each row of the next forward uses (None = all base)."""
    idx = None if slot_idx is None else numpy.asarray(slot_idx, dtype=numpy.int64)
    if idx is not None and (idx == NO_ADAPTER).all():
        idx = None  # a batch of base rows only: skip the LoRA path entirely
    for layer in layers:
        layer.slot_idx = idx
