"""The layers of a Llama-style transformer: Linear, Embedding, RMSNorm, LayerNorm.

Each layer owns its Parameters and calls one fused op from ``minift.autograd.functional``; the math and
the backward formula live there. The exception is a ``Linear`` whose frozen weight is stored in 16
bits (``BASE_DTYPES``): it runs ``WidenedLinear``, below, which widens W for each product.
"""

from __future__ import annotations

import numpy

import minift.autograd.functional as F
from minift.autograd.elementwise import ShapeError, counted_matmul
from minift.autograd.function import Function
from minift.backend import xp
from minift.nn.module import Module, Parameter, normal_init

#: The storage types of a frozen base (``minift finetune --base-dtype``), by name.
BASE_DTYPES = ("float32", "bf16", "f16")
#: The NumPy names of the two 16-bit ones: a ``Linear`` whose weight has one runs ``WidenedLinear``.
NARROW_DTYPES = ("bfloat16", "float16")


def base_dtype(name: str) -> numpy.dtype:
    """The NumPy dtype of a storage type in ``BASE_DTYPES``.

    bfloat16 keeps float32's 8 exponent bits and 7 mantissa bits (Kalamkar et al. 2019), so no
    pretrained weight overflows; float16 keeps 10 mantissa bits but only 5 exponent bits (max
    65504, subnormal below 6e-5). NumPy has no bfloat16: ``ml_dtypes`` (the one JAX uses) adds
    it as a NumPy dtype. It is imported here, when asked for, so that ``import minift.nn`` still
    loads NumPy alone (tests/test_layers.py).
    """
    if name not in BASE_DTYPES:
        raise ValueError(f"base_dtype: unknown storage type {name!r}; choose one of {', '.join(BASE_DTYPES)}")
    if name == "bf16":
        import ml_dtypes  # noqa: PLC0415 - only a bf16 base needs it

        return numpy.dtype(ml_dtypes.bfloat16)
    return numpy.dtype(numpy.float16 if name == "f16" else numpy.float32)


class WidenedLinear(Function):
    """y = x W^T + b with W stored in 16 bits and widened to the input's float type per product.

        dx = g W        (W widened again into a temporary)
        db = sum of g over rows
        dW: none — a 16-bit W is frozen, so it is not an input of this op, only a setting.
    Saves: nothing; the 16-bit W is referenced, so the graph never keeps a float32 copy of it.
    Widening is exact (every bfloat16 and float16 number is a float32 number), so this is the
    float32 product with W rounded once, when it was stored — the same pattern as QLoRA's
    ``NF4Linear`` (minift/nn/linear4bit.py), with a rounding in place of a 4-bit code.
    """

    @staticmethod
    def forward(ctx, x, bias=None, *, weight):
        if x.shape[-1] != weight.shape[1]:
            raise ShapeError(f"linear: input of shape {x.shape} does not fit a {weight.dtype} weight of shape "
                             f"{weight.shape} (expected last input axis = {weight.shape[1]})")
        ctx.weight = weight
        w = weight.astype(x.dtype)  # exact: a float32 temporary, dropped after the product
        y = counted_matmul(x.reshape(-1, x.shape[-1]), w.T).reshape(*x.shape[:-1], w.shape[0])
        if bias is not None:
            y += bias
        return y

    @staticmethod
    def backward(ctx, g):
        needs = ctx.needs_input_grad
        dx = None
        if needs[0]:
            w = ctx.weight.astype(g.dtype)
            dx = counted_matmul(g.reshape(-1, g.shape[-1]), w).reshape(*g.shape[:-1], w.shape[1])
        grads = (dx,)
        if len(needs) == 2:
            grads += (g.reshape(-1, g.shape[-1]).sum(axis=0) if needs[1] else None,)
        return grads


class Linear(Module):
    """y = x W^T + b, W of shape (out_features, in_features) as in PyTorch checkpoints."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 std: float = 0.02, rng: numpy.random.Generator | None = None, dtype=numpy.float32):
        super().__init__()
        rng = rng if rng is not None else numpy.random.default_rng(0)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(normal_init((out_features, in_features), std, rng, dtype))
        self.bias = Parameter(xp.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x):
        if self.weight.dtype.name not in NARROW_DTYPES:
            return F.linear(x, self.weight, self.bias)
        if self.weight.requires_grad:
            raise TypeError(
                f"Linear(in={self.in_features}, out={self.out_features}): the weight is trainable but stored in "
                f"{self.weight.dtype}; only a frozen weight may be 16-bit. AdamW's updates are ~lr times smaller "
                f"than the weight and 16 bits round most of them away (bfloat16 keeps 8 significant bits), so "
                f"keep trainable weights in float32: freeze it first, or cast it back (weight.data.astype(float32))")
        inputs = (x,) if self.bias is None else (x, self.bias)
        return WidenedLinear.apply(*inputs, weight=self.weight.data)

    def __repr__(self) -> str:
        return f"Linear(in={self.in_features}, out={self.out_features}, bias={self.bias is not None})"


class Embedding(Module):
    """A (num_embeddings, dim) table; ``forward(ids)`` picks one row per token id."""

    def __init__(self, num_embeddings: int, dim: int, *, std: float = 0.02,
                 rng: numpy.random.Generator | None = None, dtype=numpy.float32):
        super().__init__()
        rng = rng if rng is not None else numpy.random.default_rng(0)
        self.weight = Parameter(normal_init((num_embeddings, dim), std, rng, dtype))

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    def __repr__(self) -> str:
        return f"Embedding{tuple(self.weight.shape)}"


class RMSNorm(Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019); weight starts at 1."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=numpy.float32):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(xp.ones(dim, dtype=dtype))

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.eps)

    def __repr__(self) -> str:
        return f"RMSNorm({self.weight.shape[0]}, eps={self.eps})"


class LayerNorm(Module):
    """(x - mean) / sqrt(var + eps) * weight + bias (Ba et al. 2016)."""

    def __init__(self, dim: int, eps: float = 1e-5, dtype=numpy.float32):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(xp.ones(dim, dtype=dtype))
        self.bias = Parameter(xp.zeros(dim, dtype=dtype))

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def __repr__(self) -> str:
        return f"LayerNorm({self.weight.shape[0]}, eps={self.eps})"
