"""Ops that move numbers around without changing them: reshape, permute, index, concatenate.

Their backward passes move the gradient back the same way: reshape back, permute by the
inverse permutation, scatter into the indexed positions, split along the joined axis.
"""

from __future__ import annotations

from minift.autograd.elementwise import ShapeError
from minift.autograd.function import Function
from minift.backend import xp


class Reshape(Function):
    """y = x viewed with a new shape.  dx = g reshaped to x's shape.  Saves: x's shape."""

    @staticmethod
    def forward(ctx, x, *, shape):
        ctx.x_shape = x.shape
        try:
            return x.reshape(shape)
        except ValueError:
            raise ShapeError(f"reshape: cannot view {x.shape} ({x.size} numbers) as {shape}") from None

    @staticmethod
    def backward(ctx, g):
        return (g.reshape(ctx.x_shape),)


class Permute(Function):
    """y = x with its axes reordered.  dx = g permuted by the inverse order.  Saves: the order."""

    @staticmethod
    def forward(ctx, x, *, axes):
        if sorted(a % x.ndim for a in axes) != list(range(x.ndim)):
            raise ShapeError(f"permute: {axes} is not an ordering of the {x.ndim} axes of {x.shape}")
        ctx.axes = axes
        return xp.transpose(x, axes)

    @staticmethod
    def backward(ctx, g):
        inverse = xp.argsort(xp.asarray([a % g.ndim for a in ctx.axes])).tolist()
        return (xp.transpose(g, inverse),)


def _is_basic_index(index) -> bool:
    """Slices, integers, None and Ellipsis select a view with no repeated elements."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, (int, slice)) or p is None or p is Ellipsis for p in parts)


class GetItem(Function):
    """y = x[index] (slices, integers or integer arrays).

    dx is zero everywhere except the selected positions, which receive g. With an integer-array
    index the same element may be picked twice, so the scatter *adds* (``add.at``) rather than
    assigns. Saves: the index and x's shape and dtype.
    """

    @staticmethod
    def forward(ctx, x, *, index):
        ctx.index, ctx.x_shape, ctx.x_dtype = index, x.shape, x.dtype
        return x[index]

    @staticmethod
    def backward(ctx, g):
        dx = xp.zeros(ctx.x_shape, dtype=ctx.x_dtype)
        if _is_basic_index(ctx.index):
            dx[ctx.index] = g
        else:
            xp.add.at(dx, ctx.index, g)
        return (dx,)


class Concatenate(Function):
    """y = [x1, x2, ...] joined along ``axis``.  dx_i = the matching slice of g.  Saves: sizes."""

    @staticmethod
    def forward(ctx, *xs, axis):
        ctx.axis = axis
        ctx.sizes = [x.shape[axis] for x in xs]
        try:
            return xp.concatenate(xs, axis=axis)
        except ValueError:
            shapes = [x.shape for x in xs]
            raise ShapeError(f"concatenate along axis {axis}: shapes {shapes} do not fit") from None

    @staticmethod
    def backward(ctx, g):
        bounds = xp.cumsum(xp.asarray(ctx.sizes[:-1])).tolist()
        pieces = xp.split(g, bounds, axis=ctx.axis)
        return tuple(p if need else None for p, need in zip(pieces, ctx.needs_input_grad, strict=True))


class Stack(Function):
    """y = [x1, x2, ...] stacked along a new ``axis``.  dx_i = g taken at i.  Saves: the axis."""

    @staticmethod
    def forward(ctx, *xs, axis):
        ctx.axis = axis
        if len({x.shape for x in xs}) != 1:
            raise ShapeError(f"stack: all shapes must be equal, got {[x.shape for x in xs]}")
        return xp.stack(xs, axis=axis)

    @staticmethod
    def backward(ctx, g):
        pieces = xp.moveaxis(g, ctx.axis, 0)
        return tuple(p if need else None for p, need in zip(pieces, ctx.needs_input_grad, strict=True))
