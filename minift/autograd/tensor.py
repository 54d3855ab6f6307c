"""``Tensor``: an array of the active backend plus what reverse-mode autograd needs.

A Tensor wraps ``data`` (a ``numpy.ndarray`` or ``cupy.ndarray``). A *leaf* tensor is one you
made yourself (a weight, an input); if ``requires_grad`` is True, ``backward()`` leaves
``dL/dleaf`` in its ``.grad``. A tensor made by an op remembers its ``_node`` (the op, what it
saved, and the nodes or leaves its inputs came from) so the chain rule can be walked backwards.

Gradients *accumulate*: a second ``backward()`` adds to ``.grad`` instead of replacing it (this
is what makes gradient accumulation over micro-batches work). Clear them with the optimizer's
``zero_grad()`` between steps — forgetting to is the classic bug.
"""

from __future__ import annotations

import numbers

import numpy

from minift.autograd.function import Node
from minift.backend import asarray, to_numpy, xp

DEFAULT_DTYPE = numpy.float32


class Tensor:
    __slots__ = ("data", "grad", "requires_grad", "_node", "name", "__weakref__")
    __array_priority__ = 1000  # so `ndarray * Tensor` calls Tensor.__rmul__

    def __init__(self, data, requires_grad: bool = False, dtype=None, name: str | None = None):
        if isinstance(data, Tensor):
            data = data.data
        # Python numbers and lists get the default dtype. A NumPy scalar (numpy.float64(...), what
        # NumPy returns for a full reduction or for arithmetic on 0-d arrays) keeps its own dtype.
        from_python = isinstance(data, (numbers.Number, list, tuple)) and not isinstance(data, numpy.generic)
        if dtype is None and from_python:
            dtype = DEFAULT_DTYPE
        self.data = asarray(data, dtype=dtype)
        if requires_grad and not xp.issubdtype(self.data.dtype, xp.floating):
            raise TypeError(f"only floating-point tensors can require gradients, got {self.dtype}")
        self.requires_grad = requires_grad
        self.grad = None
        self._node: Node | None = None
        self.name = name

    # ---- plain array facts -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def is_leaf(self) -> bool:
        return self._node is None

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{grad})"

    def numpy(self) -> numpy.ndarray:
        """The values as a NumPy array (a copy off the GPU under CuPy)."""
        return to_numpy(self.data)

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> Tensor:
        """Same values, cut from the graph (no gradient flows through the result)."""
        return Tensor(self.data)

    def grad_target(self):
        """Where a gradient for this tensor goes in the graph: the node that made it, the tensor
        itself if it is a leaf that wants a gradient, or None (a constant)."""
        if self._node is not None:
            return self._node
        return self if self.requires_grad else None

    def requires_grad_(self, flag: bool = True) -> Tensor:
        if not self.is_leaf:
            raise RuntimeError("requires_grad can only be changed on a leaf tensor")
        self.requires_grad = flag
        if not flag:
            self.grad = None
        return self

    # ---- the backward walk -------------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Compute d(self)/d(leaf) for every leaf that requires a gradient; add it to ``.grad``.

        ``grad`` is dL/d(self); it may be omitted only when ``self`` holds a single number
        (a loss). The graph's saved arrays are released as the walk goes, unless
        ``retain_graph`` — so a second backward through the same graph is an error.
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward() on a tensor that does not require grad: no parameter of the "
                "expression has requires_grad=True (or it was computed under no_grad())"
            )
        if grad is None:
            if self.size != 1:
                raise RuntimeError(
                    f"backward() on a non-scalar tensor of shape {self.shape} needs an explicit "
                    "gradient: pass grad=dL/d(this tensor), or reduce it to a scalar first"
                )
            grad = xp.ones_like(self.data)
        else:
            grad = asarray(grad.data if isinstance(grad, Tensor) else grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward(): grad shape {grad.shape} != tensor shape {self.shape}")

        if self._node is None:  # a leaf: the gradient of itself with respect to itself
            _accumulate(self, grad, set())
            return
        grads = {id(self._node): grad}
        given_to_leaves = set()  # ids of arrays already stored in some leaf's .grad
        order = _reverse_topological_order(self._node)
        for i, vertex in enumerate(order):
            order[i] = None  # the walk no longer pins this vertex (nor, below, its inputs)
            g = grads.pop(id(vertex), None)
            if g is None:
                continue
            if isinstance(vertex, Tensor):
                _accumulate(vertex, g, given_to_leaves)
                continue
            inputs = vertex.inputs
            input_grads = vertex.run_backward(g, release=not retain_graph)
            if not retain_graph:
                vertex.release()
            for parent, parent_grad in zip(inputs, input_grads, strict=True):
                if parent_grad is None or parent is None:
                    continue
                if isinstance(parent, Tensor) and not parent.requires_grad:  # frozen after the forward
                    continue
                if parent_grad.shape != parent.shape:
                    raise RuntimeError(
                        f"{vertex.function.__name__}.backward gave a gradient of shape "
                        f"{parent_grad.shape} for an input of shape {parent.shape}"
                    )
                key = id(parent)
                grads[key] = parent_grad if key not in grads else grads[key] + parent_grad

    # ---- operators: each one is an op of minift.autograd.functional ------------------
    # ``a + b`` builds the same graph node as ``F.add(a, b)``; a Python number on either side
    # becomes a constant of the tensor's dtype (so float32 stays float32).
    def __add__(self, other):
        return F.add(self, other)

    __radd__ = __add__

    def __sub__(self, other):
        return F.sub(self, other)

    def __rsub__(self, other):
        return F.sub(F._lift(other, self), self)

    def __mul__(self, other):
        return F.mul(self, other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return F.div(self, other)

    def __rtruediv__(self, other):
        return F.div(F._lift(other, self), self)

    def __neg__(self):
        return F.neg(self)

    def __pow__(self, exponent: float):
        return F.pow(self, exponent)

    def __matmul__(self, other):
        return F.matmul(self, other)

    def __rmatmul__(self, other):
        return F.matmul(as_tensor(other), self)

    def __getitem__(self, index):
        return F.getitem(self, index)

    def exp(self):
        return F.exp(self)

    def log(self):
        return F.log(self)

    def sqrt(self):
        return F.sqrt(self)

    def rsqrt(self):
        return F.rsqrt(self)

    def sum(self, axis=None, keepdims=False):
        return F.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return F.mean(self, axis, keepdims)

    def max(self, axis=None, keepdims=False):
        return F.max(self, axis, keepdims)

    def reshape(self, *shape):
        return F.reshape(self, *shape)

    def permute(self, *axes):
        return F.permute(self, *axes)

    def transpose(self, axis0: int = -2, axis1: int = -1):
        return F.transpose(self, axis0, axis1)

    @property
    def T(self):
        return F.transpose(self)

    def softmax(self, axis: int = -1):
        return F.softmax(self, axis)

    def log_softmax(self, axis: int = -1):
        return F.log_softmax(self, axis)


def _accumulate(leaf: Tensor, g, given_to_leaves: set) -> None:
    """Add ``g`` to ``leaf.grad`` (gradients accumulate until ``zero_grad``)."""
    if leaf.grad is not None:
        leaf.grad = leaf.grad + g
    else:  # ops may pass one array to several inputs (a + b): never share a .grad
        leaf.grad = g.copy() if id(g) in given_to_leaves else g
        given_to_leaves.add(id(leaf.grad))


def _reverse_topological_order(root: Node) -> list:
    """The nodes and leaf tensors of the graph under ``root``, each before all of its inputs.

    Iterative depth-first search: a 30-layer model's graph is thousands of nodes deep, far past
    Python's recursion limit.
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        vertex, inputs_done = stack.pop()
        if inputs_done:
            order.append(vertex)
            continue
        if id(vertex) in visited:
            continue
        visited.add(id(vertex))
        stack.append((vertex, True))
        if isinstance(vertex, Node):
            for parent in vertex.inputs:
                if parent is not None and id(parent) not in visited:
                    stack.append((parent, False))
    order.reverse()
    return order


def as_tensor(value) -> Tensor:
    """Wrap arrays and Python numbers as constant Tensors; pass Tensors through."""
    if isinstance(value, Tensor):
        return value
    return Tensor(value)


# The operators above call the functional ops, which are built on Tensor: the two modules need
# each other, so functional is imported once Tensor exists (its functions are looked up at call time).
import minift.autograd.functional as F  # noqa: E402
