"""``DecodedLinear``: y = x W^T + b for a frozen W that is stored compressed and decoded per product.

Two layers keep a frozen weight in fewer bits than it is multiplied in: a 16-bit base
(``--base-dtype``, ``WidenedLinear`` in minift/nn/layers.py) and QLoRA's 4-bit base
(``NF4Linear`` in minift/nn/linear4bit.py; Dettmers et al. 2023, lecture 004). They differ only in
how the float W comes back out of its storage, so this Function owns everything else and each
subclass supplies one ``decode``:

    forward     W = decode(x.dtype, **stored)      a float temporary, dropped after the product
                y = x W^T + b
    backward    W = decode(g.dtype, **stored)      decoded again, not kept from the forward
                dx = g W
                db = sum of g over rows
                dW: none — the stored weight is frozen, so it is not an input of this op, only
                its setting

Saves: nothing. The stored parts (the 16-bit array; the NF4 codes and their QuantState) are
referenced on ``ctx``, never copied, so no float copy of W outlives either pass: that is the
whole memory saving, paid for with a second decode per step.

``forward`` and ``backward`` are classmethods rather than the usual staticmethods
(minift/autograd/function.py), so that they can call the subclass's ``decode``.
"""

from __future__ import annotations

from minift.autograd.elementwise import ShapeError, counted_matmul
from minift.autograd.function import Function


class DecodedLinear(Function):
    """The shared forward and backward; a subclass sets ``op`` (its name in error messages) and
    ``decode(dtype, **stored)``, which returns the float (out, in) W from the stored parts that
    ``apply`` receives as settings."""

    op = "decoded linear"

    @staticmethod
    def decode(dtype, **stored):
        raise NotImplementedError

    @classmethod
    def forward(cls, ctx, x, bias=None, **stored):
        w = cls.decode(x.dtype, **stored)
        if x.shape[-1] != w.shape[1]:
            raise ShapeError(f"{cls.op}: input of shape {x.shape} does not fit a weight of shape {w.shape} "
                             f"(expected last input axis = {w.shape[1]})")
        for name, part in stored.items():  # ctx.weight, or ctx.packed and ctx.state: referenced only
            setattr(ctx, name, part)
        ctx.stored_names = tuple(stored)
        y = counted_matmul(x.reshape(-1, x.shape[-1]), w.T).reshape(*x.shape[:-1], w.shape[0])
        if bias is not None:
            y += bias
        return y

    @classmethod
    def backward(cls, ctx, g):
        needs = ctx.needs_input_grad
        dx = None
        if needs[0]:
            w = cls.decode(g.dtype, **{name: getattr(ctx, name) for name in ctx.stored_names})
            dx = counted_matmul(g.reshape(-1, g.shape[-1]), w).reshape(*g.shape[:-1], w.shape[1])
        grads = (dx,)
        if len(needs) == 2:
            grads += (g.reshape(-1, g.shape[-1]).sum(axis=0) if needs[1] else None,)
        return grads
