"""Hand-written reverse-mode automatic differentiation on NumPy / CuPy arrays.

Reading order: ``function.py`` (the Function pattern and the rules that make freezing real),
``tensor.py`` (the Tensor and the backward walk), then the ops — ``elementwise.py``,
``shape.py``, ``reduce.py``, ``nn_ops.py``, ``attention.py`` — each a forward with its backward
right under it — and ``functional.py``, the plain functions (``F.softmax``, ``F.cross_entropy``)
that the layers above call; ``checkpointing.py`` recomputes a segment in backward instead of
keeping its activations. Layer 1 of minift (docs/design.md): it imports only ``minift.backend``.
"""

from minift.autograd.checkpointing import checkpoint
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

__all__ = [
    "Context",
    "DEFAULT_DTYPE",
    "Function",
    "GraphFreedError",
    "ShapeError",
    "Tensor",
    "as_tensor",
    "checkpoint",
    "enable_grad",
    "is_grad_enabled",
    "no_grad",
    "op_counts",
]
