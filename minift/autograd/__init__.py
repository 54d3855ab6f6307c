"""Hand-written reverse-mode automatic differentiation on NumPy / CuPy arrays.

Reading order: ``function.py`` (the Function pattern and the rules that make freezing real),
``tensor.py`` (the Tensor and the backward walk), then the ops — ``elementwise.py``,
``shape.py``, ``reduce.py``, ``nn_ops.py``, ``attention.py`` — each a forward with its backward
right under it.
"""

from minift.autograd.elementwise import ShapeError
from minift.autograd.function import (
    Context,
    Function,
    GraphFreedError,
    enable_grad,
    is_grad_enabled,
    no_grad,
    op_counts,
)
from minift.autograd.tensor import DEFAULT_DTYPE, Tensor, as_tensor


def _attach_operators() -> None:
    """Give Tensor its Python operators and methods, all routed through minift.functional."""
    import minift.functional as F  # noqa: PLC0415 - functional imports this package

    def rsub(a, b):
        return F.sub(F._lift(b, a), a)

    def rdiv(a, b):
        return F.div(F._lift(b, a), a)

    Tensor.__add__ = Tensor.__radd__ = F.add
    Tensor.__sub__ = F.sub
    Tensor.__rsub__ = rsub
    Tensor.__mul__ = Tensor.__rmul__ = F.mul
    Tensor.__truediv__ = F.div
    Tensor.__rtruediv__ = rdiv
    Tensor.__neg__ = F.neg
    Tensor.__pow__ = F.pow
    Tensor.__matmul__ = F.matmul
    Tensor.__rmatmul__ = lambda a, b: F.matmul(as_tensor(b), a)
    Tensor.__getitem__ = F.getitem
    for name in ("exp", "log", "sqrt", "rsqrt", "sum", "mean", "max", "reshape", "permute",
                 "transpose", "softmax", "log_softmax"):
        setattr(Tensor, name, getattr(F, name))
    Tensor.T = property(F.transpose)


_attach_operators()

__all__ = [
    "Context",
    "DEFAULT_DTYPE",
    "Function",
    "GraphFreedError",
    "ShapeError",
    "Tensor",
    "as_tensor",
    "enable_grad",
    "is_grad_enabled",
    "no_grad",
    "op_counts",
]
