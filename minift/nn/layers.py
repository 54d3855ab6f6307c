"""The layers of a Llama-style transformer: Linear, Embedding, RMSNorm, LayerNorm.

Each layer owns its Parameters and calls one fused op from ``minift.autograd.functional``; the math and
the backward formula live there. The exception is a frozen weight stored in 16 bits
(``BASE_DTYPES``): a ``Linear`` (or the tied head, ``Embedding.attend``) then runs ``WidenedLinear``,
below, which widens W for each product (``DecodedLinear``, minift/nn/decoded.py), and an
``Embedding`` widens only the rows it looks up.
"""

from __future__ import annotations

import numpy

import minift.autograd.functional as F
from minift.autograd.tensor import Tensor
from minift.backend import xp
from minift.nn.decoded import DecodedLinear
from minift.nn.module import Module, Parameter, normal_init

#: The storage types of a frozen base (``minift finetune --base-dtype``), by name.
BASE_DTYPES = ("float32", "bf16", "f16")
#: The NumPy names of the two 16-bit ones: a ``Linear`` whose weight has one runs ``WidenedLinear``,
#: an ``Embedding`` widens the rows it gathers.
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


class WidenedLinear(DecodedLinear):
    """y = x W^T + b with W stored in 16 bits and widened to the input's float type per product
    (forward and backward: ``DecodedLinear``). Widening is exact (every bfloat16 and float16 number
    is a float32 number), so this is the float32 product with W rounded once, when it was stored —
    QLoRA's ``NF4Linear`` (minift/nn/linear4bit.py) with a rounding in place of a 4-bit code."""

    op = "linear"

    @staticmethod
    def decode(dtype, *, weight):
        return weight.astype(dtype)


def refuse_trainable_narrow(weight, owner) -> None:
    """A 16-bit weight must be frozen: raise, saying why, if ``weight`` (of the layer ``owner``) would train."""
    if weight.requires_grad:
        raise TypeError(
            f"{owner!r}: the weight is trainable but stored in {weight.dtype}; only a frozen weight may be 16-bit. "
            f"AdamW's updates are ~lr times smaller than the weight and 16 bits round most of them away "
            f"(bfloat16 keeps 8 significant bits), so keep trainable weights in float32: freeze it first, or "
            f"cast it back (weight.data.astype(float32))")


def linear(x, weight, bias=None, *, owner=None):
    """y = x W^T + b for a float ``weight`` (``F.linear``) or a frozen 16-bit one (``WidenedLinear``).

    ``owner``, the layer, is named in the error for a trainable 16-bit weight. ``Linear`` runs its
    product here, and so does the tied output head (``Embedding.attend``), whose weight is the
    embedding table and may be stored in 16 bits as well.
    """
    if weight.dtype.name not in NARROW_DTYPES:
        return F.linear(x, weight, bias)
    refuse_trainable_narrow(weight, owner)
    inputs = (x,) if bias is None else (x, bias)
    return WidenedLinear.apply(*inputs, weight=weight.data)


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
        return linear(x, self.weight, self.bias, owner=self)

    def __repr__(self) -> str:
        return f"Linear(in={self.in_features}, out={self.out_features}, bias={self.bias is not None})"


class Embedding(Module):
    """A (num_embeddings, dim) table; ``forward(ids)`` picks one row per token id.

    A frozen table may be stored in 16 bits (``cast_frozen``): the lookup then gathers the 16-bit
    rows and widens only those, so a batch costs (tokens, dim) float32 numbers, never a float32
    copy of the table. Widening is exact, so the rows equal those of the float32 table rounded
    once. ``attend`` reuses the table as a tied output head.
    """

    def __init__(self, num_embeddings: int, dim: int, *, std: float = 0.02,
                 rng: numpy.random.Generator | None = None, dtype=numpy.float32):
        super().__init__()
        rng = rng if rng is not None else numpy.random.default_rng(0)
        self.weight = Parameter(normal_init((num_embeddings, dim), std, rng, dtype))

    @property
    def compute_dtype(self) -> numpy.dtype:
        """The float type the rows come out in: the table's own, or float32 for a 16-bit table."""
        dtype = self.weight.dtype
        return numpy.dtype(numpy.float32) if dtype.name in NARROW_DTYPES else dtype

    def forward(self, ids):
        if self.weight.dtype.name not in NARROW_DTYPES:
            return F.embedding(ids, self.weight)
        refuse_trainable_narrow(self.weight, self)
        rows = F.embedding(ids, self.weight)  # the 16-bit rows, and no graph: the table is frozen
        return Tensor(rows.data.astype(self.compute_dtype))

    def attend(self, h):
        """Logits h E^T: the table as the tied output head (Press & Wolf 2017), widened per
        product like a frozen 16-bit ``Linear`` weight when it is stored in 16 bits."""
        return linear(h, self.weight, owner=self)

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
