"""Reductions: sum, mean and max over axes, with their backward formulas.

A reduction's gradient is *broadcast back*: every input element that contributed to an output
element receives that output's gradient (times 1/n for a mean; only the winners for a max).
"""

from __future__ import annotations

from minift.autograd.function import Function
from minift.backend import xp


def _normalize_axis(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(a % ndim for a in axes)


def _expand_back(g, x_shape, axes, keepdims):
    """Put the reduced axes back (size 1) so that ``g`` broadcasts against the input."""
    if not keepdims:
        for a in sorted(axes):
            g = xp.expand_dims(g, a)
    return xp.broadcast_to(g, x_shape)


class Sum(Function):
    """y = sum of x over ``axis``.  dx = g broadcast back to x's shape.  Saves: x's shape."""

    @staticmethod
    def forward(ctx, x, *, axis=None, keepdims=False):
        ctx.x_shape, ctx.axes, ctx.keepdims = x.shape, _normalize_axis(axis, x.ndim), keepdims
        return xp.sum(x, axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        return (_expand_back(g, ctx.x_shape, ctx.axes, ctx.keepdims).copy(),)


class Mean(Function):
    """y = mean of x over ``axis`` (n elements each).  dx = g / n, broadcast back.  Saves: shape."""

    @staticmethod
    def forward(ctx, x, *, axis=None, keepdims=False):
        ctx.x_shape, ctx.axes, ctx.keepdims = x.shape, _normalize_axis(axis, x.ndim), keepdims
        return xp.mean(x, axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        n = 1
        for a in ctx.axes:
            n *= ctx.x_shape[a]
        return (_expand_back(g / n, ctx.x_shape, ctx.axes, ctx.keepdims).copy(),)


class Max(Function):
    """y = max of x over ``axis``.

    dx = g at the positions that hold the maximum, 0 elsewhere; when several positions tie,
    they share g equally (the subgradient that keeps sum(dx) = g). Saves: the 0/1 winner mask.
    """

    @staticmethod
    def forward(ctx, x, *, axis=None, keepdims=False):
        axes = _normalize_axis(axis, x.ndim)
        y = xp.max(x, axis=axes, keepdims=True)
        winners = (x == y).astype(x.dtype)
        winners /= winners.sum(axis=axes, keepdims=True)
        ctx.save_for_backward(winners)
        ctx.x_shape, ctx.axes, ctx.keepdims = x.shape, axes, keepdims
        return y if keepdims else xp.squeeze(y, axis=axes)

    @staticmethod
    def backward(ctx, g):
        (winners,) = ctx.saved
        return (_expand_back(g, ctx.x_shape, ctx.axes, ctx.keepdims) * winners,)
