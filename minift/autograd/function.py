"""``Function``: one differentiable operation, its forward and its backward side by side.

Reverse-mode autograd in one paragraph. Every op records, on its output tensor, *which*
Function made it, *from which* input tensors, and whatever the backward formula will need (its
``ctx``). ``loss.backward()`` walks that record from the loss back to the leaves. At each node it
calls ``backward(ctx, dL/d(output))`` which returns ``dL/d(input)`` for each input — the chain
rule, one op at a time.

Two rules make "frozen" mean frozen (lecture 000: ``requires_grad = False`` means *no gradient
computation*):

* an output records its history only if some input requires a gradient, so a graph is never
  built through parts of the model that nobody trains;
* ``ctx.needs_input_grad[i]`` tells ``backward`` which input gradients are wanted, and every
  backward formula skips the work for the others (a frozen ``W`` in ``x @ W`` costs no ``dW``
  matmul).

An op is written like this (the whole of ``exp``)::

    class Exp(Function):
        @staticmethod
        def forward(ctx, x):
            y = xp.exp(x)
            ctx.save_for_backward(y)          # Saves: y (the output, reused)
            return y

        @staticmethod
        def backward(ctx, grad):
            (y,) = ctx.saved                   # d exp(x)/dx = exp(x)
            return (grad * y,)

``forward`` receives raw arrays (never Tensors); keyword arguments are non-differentiable
settings (axis, shape, eps ...). ``backward`` returns one gradient (or None) per positional
input.
"""

from __future__ import annotations

import contextlib
from collections import Counter

_grad_enabled = True

#: How many times each counted kernel ran (forward and backward). Tests use it to prove that a
#: frozen weight's gradient matmul was skipped, not merely thrown away.
op_counts: Counter = Counter()


def is_grad_enabled() -> bool:
    return _grad_enabled


@contextlib.contextmanager
def no_grad():
    """Run ops without recording a graph (inference, evaluation, optimizer updates)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


@contextlib.contextmanager
def enable_grad():
    """Undo an enclosing ``no_grad`` for a block."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, True
    try:
        yield
    finally:
        _grad_enabled = previous


class GraphFreedError(RuntimeError):
    """backward() reached a node whose saved arrays were already released."""


class Context:
    """What an op keeps between its forward and its backward.

    ``saved`` holds the arrays the backward formula needs; the engine drops them right after
    the node's backward runs, so memory for activations is released as the walk proceeds.

    ``saved_is_scratch`` is True only while a backward runs whose saved arrays will be dropped
    right after it (no ``retain_graph``): then, and only then, backward may overwrite them in
    place instead of allocating a new buffer. With a retained graph the next backward needs them
    intact.
    """

    __slots__ = ("needs_input_grad", "saved", "freed", "saved_is_scratch", "__dict__")

    def __init__(self, needs_input_grad: tuple[bool, ...]):
        self.needs_input_grad = needs_input_grad
        self.saved: tuple = ()
        self.freed = False
        self.saved_is_scratch = False

    def save_for_backward(self, *arrays) -> None:
        self.saved = arrays

    def release(self) -> None:
        self.saved = ()
        self.__dict__.clear()
        self.freed = True
        self.saved_is_scratch = False


class Function:
    """Base class of every differentiable op; see the module docstring for the pattern."""

    @staticmethod
    def forward(ctx: Context, *arrays, **settings):
        raise NotImplementedError

    @staticmethod
    def backward(ctx: Context, grad):
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **settings):
        """Run ``forward`` on the inputs' arrays and, if needed, record the node for backward."""
        from minift.autograd.tensor import Tensor, as_tensor  # noqa: PLC0415 - import cycle

        tensors = tuple(as_tensor(x) for x in inputs)
        needs = tuple(t.requires_grad for t in tensors)
        record = _grad_enabled and any(needs)
        ctx = Context(needs)
        out = cls.forward(ctx, *(t.data for t in tensors), **settings)
        if not record:
            return Tensor(out)
        result = Tensor(out, requires_grad=True)
        result._node = Node(cls, ctx, tuple(t.grad_target() for t in tensors), out.shape)
        return result


class Node:
    """A vertex of the graph: the Function that made a tensor, its saved context, and where the
    gradient of each input goes.

    ``inputs[i]`` is the *node* that made input i, or the input tensor itself when it is a leaf
    that requires a gradient (a parameter), or None for a constant. It is never an
    intermediate tensor: the graph keeps exactly what the backward formulas saved, and an
    activation nobody saved (the input of a frozen linear layer, the two operands of an add) is
    freed as soon as the forward code drops it — as in PyTorch, whose graph links
    ``grad_fn``s, not tensors. ``shape`` is the output's shape, to check the gradient against.
    """

    __slots__ = ("function", "ctx", "inputs", "shape")

    def __init__(self, function: type[Function], ctx: Context, inputs: tuple, shape: tuple):
        self.function = function
        self.ctx = ctx
        self.inputs = inputs
        self.shape = shape

    def run_backward(self, grad, release: bool = False):
        """dL/d(inputs) from dL/d(output); ``release``: the saved arrays are dropped afterwards."""
        if self.ctx.freed:
            raise GraphFreedError(
                f"backward through {self.function.__name__} a second time: its saved arrays were "
                "freed after the first backward. Call backward(retain_graph=True) the first time "
                "if you need to go through the same graph twice."
            )
        self.ctx.saved_is_scratch = release
        try:
            grads = self.function.backward(self.ctx, grad)
        finally:
            self.ctx.saved_is_scratch = False
        if not isinstance(grads, tuple):
            grads = (grads,)
        if len(grads) != len(self.inputs):
            raise RuntimeError(
                f"{self.function.__name__}.backward returned {len(grads)} gradients "
                f"for {len(self.inputs)} inputs"
            )
        return grads

    def release(self) -> None:
        """Drop the saved arrays *and* the links to the input tensors after backward.

        The inputs hold their forward values (the activations). Without this, a loss tensor
        that is still referenced — the next micro-batch's forward runs before ``loss`` is
        rebound — would keep every activation of the previous step alive.
        """
        self.ctx.release()
        self.inputs = ()
