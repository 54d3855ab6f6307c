"""Arithmetic, elementwise math and matrix products, each with its backward formula.

Naming legend for the docstrings: ``g`` is the incoming gradient dL/d(output); ``x``, ``a``,
``b`` are inputs. Broadcasting: an input that was stretched along an axis in the forward pass
receives the *sum* of the gradient along that axis (``unbroadcast``).
"""

from __future__ import annotations

from minift.autograd.function import Function, op_counts
from minift.backend import xp


class ShapeError(ValueError):
    """Operands whose shapes do not fit the op; the message names the op and both shapes."""


def broadcast_shape(op: str, a_shape, b_shape) -> tuple[int, ...]:
    try:
        return xp.broadcast_shapes(a_shape, b_shape)
    except ValueError:
        raise ShapeError(f"{op}: shapes {a_shape} and {b_shape} cannot be broadcast together") from None


def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape``: undo NumPy broadcasting in the backward pass.

    If y = x + b with b of shape (D,) and x of shape (B, T, D), every b[j] was used B*T times,
    so dL/db[j] is the sum of g[..., j] over the B and T axes.
    """
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(extra))) if extra else grad
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=stretched, keepdims=True) if stretched else grad


def counted_matmul(a, b):
    """``a @ b``, counted in ``op_counts["matmul"]`` so tests can see which products ran."""
    op_counts["matmul"] += 1
    return xp.matmul(a, b)


class Add(Function):
    """y = a + b.  da = g, db = g (each summed back to its own shape).  Saves: the shapes."""

    @staticmethod
    def forward(ctx, a, b):
        broadcast_shape("add", a.shape, b.shape)
        ctx.shapes = (a.shape, b.shape)
        return a + b

    @staticmethod
    def backward(ctx, g):
        a_shape, b_shape = ctx.shapes
        return (
            unbroadcast(g, a_shape) if ctx.needs_input_grad[0] else None,
            unbroadcast(g, b_shape) if ctx.needs_input_grad[1] else None,
        )


class Sub(Function):
    """y = a - b.  da = g, db = -g.  Saves: the shapes."""

    @staticmethod
    def forward(ctx, a, b):
        broadcast_shape("sub", a.shape, b.shape)
        ctx.shapes = (a.shape, b.shape)
        return a - b

    @staticmethod
    def backward(ctx, g):
        a_shape, b_shape = ctx.shapes
        return (
            unbroadcast(g, a_shape) if ctx.needs_input_grad[0] else None,
            unbroadcast(-g, b_shape) if ctx.needs_input_grad[1] else None,
        )


class Mul(Function):
    """y = a * b.  da = g * b, db = g * a.  Saves: each input only if the *other* needs a grad."""

    @staticmethod
    def forward(ctx, a, b):
        broadcast_shape("mul", a.shape, b.shape)
        need_a, need_b = ctx.needs_input_grad
        ctx.save_for_backward(a if need_b else None, b if need_a else None)
        ctx.shapes = (a.shape, b.shape)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved
        a_shape, b_shape = ctx.shapes
        return (
            unbroadcast(g * b, a_shape) if ctx.needs_input_grad[0] else None,
            unbroadcast(g * a, b_shape) if ctx.needs_input_grad[1] else None,
        )


class Div(Function):
    """y = a / b.  da = g / b, db = -g * a / b^2 = -g * y / b.  Saves: b, and y if b needs grad."""

    @staticmethod
    def forward(ctx, a, b):
        broadcast_shape("div", a.shape, b.shape)
        y = a / b
        ctx.save_for_backward(b, y if ctx.needs_input_grad[1] else None)
        ctx.shapes = (a.shape, b.shape)
        return y

    @staticmethod
    def backward(ctx, g):
        b, y = ctx.saved
        a_shape, b_shape = ctx.shapes
        return (
            unbroadcast(g / b, a_shape) if ctx.needs_input_grad[0] else None,
            unbroadcast(-g * y / b, b_shape) if ctx.needs_input_grad[1] else None,
        )


class Neg(Function):
    """y = -x.  dx = -g.  Saves: nothing."""

    @staticmethod
    def forward(ctx, x):
        return -x

    @staticmethod
    def backward(ctx, g):
        return (-g,)


class Pow(Function):
    """y = x ** p for a constant exponent p.  dx = g * p * x^(p-1).  Saves: x."""

    @staticmethod
    def forward(ctx, x, *, exponent: float):
        ctx.save_for_backward(x)
        ctx.exponent = exponent
        return x**exponent

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        p = ctx.exponent
        return (g * p * x ** (p - 1),)


class Exp(Function):
    """y = exp(x).  dx = g * y.  Saves: y."""

    @staticmethod
    def forward(ctx, x):
        y = xp.exp(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved
        return (g * y,)


class Log(Function):
    """y = log(x).  dx = g / x.  Saves: x."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return xp.log(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        return (g / x,)


class Sqrt(Function):
    """y = sqrt(x).  dx = g / (2 y).  Saves: y."""

    @staticmethod
    def forward(ctx, x):
        y = xp.sqrt(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved
        return (g / (2 * y),)


class Rsqrt(Function):
    """y = 1 / sqrt(x).  dx = -g * y^3 / 2.  Saves: y."""

    @staticmethod
    def forward(ctx, x):
        y = 1 / xp.sqrt(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved
        return (-0.5 * g * y**3,)


class MatMul(Function):
    """y = a @ b, batched over leading axes with broadcasting.

    da = g @ b^T and db = a^T @ g, each summed over the batch axes it was broadcast along.
    When ``b`` is a plain matrix shared by the whole batch (a weight), db is the sum over every
    row of the batch: one (K, N*) @ (N*, M) product instead of a batch of them.
    Each product runs only if that input needs a gradient: ``x @ W`` with W frozen costs one
    backward matmul (dx), not two. Saves: a if b needs grad, b if a needs grad.
    """

    @staticmethod
    def forward(ctx, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ShapeError(f"matmul needs 2-D or batched operands, got {a.shape} @ {b.shape}")
        if a.shape[-1] != b.shape[-2]:
            raise ShapeError(
                f"matmul: inner dimensions differ: {a.shape} @ {b.shape} "
                f"({a.shape[-1]} != {b.shape[-2]})"
            )
        try:
            xp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise ShapeError(
                f"matmul: batch axes of {a.shape} @ {b.shape} cannot be broadcast together "
                f"({a.shape[:-2]} vs {b.shape[:-2]})"
            ) from None
        need_a, need_b = ctx.needs_input_grad
        ctx.save_for_backward(a if need_b else None, b if need_a else None)
        ctx.shapes = (a.shape, b.shape)
        return counted_matmul(a, b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved
        a_shape, b_shape = ctx.shapes
        da = db = None
        if ctx.needs_input_grad[0]:
            da = unbroadcast(counted_matmul(g, xp.swapaxes(b, -1, -2)), a_shape)
        if ctx.needs_input_grad[1]:
            if len(b_shape) == 2:  # shared weight: flatten the batch, one big product
                db = counted_matmul(a.reshape(-1, a.shape[-1]).T, g.reshape(-1, g.shape[-1]))
            else:
                db = unbroadcast(counted_matmul(xp.swapaxes(a, -1, -2), g), b_shape)
        return da, db


class Linear(Function):
    """y = x W^T + b, the layer every projection in a transformer is made of.

    W is stored (out_features, in_features), as in PyTorch and Hugging Face checkpoints.
        dx = g W              (needed unless x is the frozen input of the first layer)
        dW = g^T x            summed over all B*T rows: one (out, N) @ (N, in) product
        db = sum of g over rows
    Every product is skipped when its input does not need a gradient — this is where a frozen
    layer saves compute. The (B, T, in) input is multiplied as one (B*T, in) matrix: NumPy runs a
    stacked product as one BLAS call per batch row, 10-15 % slower than one call on all rows.
    Saves: x if W needs grad, W if x needs grad.
    """

    @staticmethod
    def forward(ctx, x, weight, bias=None):
        if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
            raise ShapeError(
                f"linear: input of shape {x.shape} does not fit a weight of shape {weight.shape} "
                f"(expected last input axis = {weight.shape[-1] if weight.ndim else '?'})"
            )
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        ctx.x_shape = x.shape
        y = counted_matmul(x.reshape(-1, x.shape[-1]), weight.T).reshape(*x.shape[:-1], weight.shape[0])
        if bias is not None:
            y += bias
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved
        needs = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        dx = counted_matmul(g2, weight).reshape(ctx.x_shape) if needs[0] else None
        dw = counted_matmul(g2.T, x.reshape(-1, x.shape[-1])) if needs[1] else None
        grads = (dx, dw)
        if len(needs) == 3:
            grads += (g2.sum(axis=0) if needs[2] else None,)
        return grads
