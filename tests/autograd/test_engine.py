"""The backward walk itself: accumulation, no_grad, freed graphs, errors, freezing, dtypes, depth.

What "frozen" saves is proved by counting: ``op_counts["matmul"]`` counts every matrix product
minift runs, so a skipped gradient product is visible as a number, not taken on trust.
"""

from __future__ import annotations

import gc
import importlib.util
import re
import sys
import weakref

import numpy as np
import pytest

import minift.autograd.functional as F
from minift import backend as B
from minift.autograd import GraphFreedError, ShapeError, Tensor, enable_grad, no_grad, op_counts
from minift.autograd.function import Node
from minift.backend import to_numpy, xp


def leaf(shape, seed=0, requires_grad=True, dtype=np.float64):
    data = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    return Tensor(xp.asarray(data), requires_grad=requires_grad)


def graph_nodes(root):
    """Every Node under ``root`` (collected before backward, which unlinks them)."""
    nodes, stack, seen = [], [root._node], set()
    while stack:
        vertex = stack.pop()
        if not isinstance(vertex, Node) or id(vertex) in seen:
            continue  # a leaf tensor or a constant (None)
        seen.add(id(vertex))
        nodes.append(vertex)
        stack.extend(vertex.inputs)
    return nodes


def matmuls_in(fn):
    """How many matrix products ``fn()`` ran."""
    before = op_counts["matmul"]
    fn()
    return op_counts["matmul"] - before


# ---- accumulation -----------------------------------------------------------------------------
def test_gradients_accumulate_across_two_backward_calls(backend):
    x = leaf((3, 4))
    F.sum(x * x).backward()
    first = to_numpy(x.grad).copy()
    np.testing.assert_allclose(first, 2 * to_numpy(x.data), rtol=1e-15)
    F.sum(3.0 * x).backward()  # a second graph over the same leaf: its gradient is added
    np.testing.assert_allclose(to_numpy(x.grad), first + 3.0, rtol=1e-15)


def test_a_leaf_used_twice_in_one_graph_gets_both_contributions(backend):
    x = leaf((5,))
    y = x * 2.0
    F.sum(y * x + F.exp(x) + y).backward()  # d/dx = 4x + exp(x) + 2
    xs = to_numpy(x.data)
    np.testing.assert_allclose(to_numpy(x.grad), 4 * xs + np.exp(xs) + 2, rtol=1e-14)


def test_leaf_without_requires_grad_gets_no_grad(backend):
    w, c = leaf((3,), 1), leaf((3,), 2, requires_grad=False)
    F.sum(w * c + c).backward()
    assert c.grad is None
    np.testing.assert_array_equal(to_numpy(w.grad), to_numpy(c.data))


def test_detach_cuts_the_graph(backend):
    x = leaf((3,))
    F.sum(x * (x * 2.0).detach()).backward()  # the detached factor is a constant
    np.testing.assert_allclose(to_numpy(x.grad), 2 * to_numpy(x.data), rtol=1e-15)


# ---- no_grad ----------------------------------------------------------------------------------
def test_no_grad_builds_no_graph(backend):
    x = leaf((2, 3))
    with no_grad():
        y = F.sum(F.softmax(x * 2.0) @ leaf((3, 2)))
        with enable_grad():
            z = x * 2.0
    assert not y.requires_grad and y.is_leaf and y._node is None
    assert z.requires_grad and z._node is not None  # enable_grad re-enables inside no_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()
    w = x * 2.0  # recording is back on after the block
    assert w._node is not None


def test_no_grad_is_restored_after_an_exception(backend):
    with pytest.raises(ShapeError), no_grad():
        F.add(leaf((2,)), leaf((3,)))
    assert (leaf((2,)) * 2.0)._node is not None


# ---- freed graphs -------------------------------------------------------------------------------
def test_second_backward_through_a_freed_graph_raises(backend):
    x = leaf((3,))
    loss = F.sum(F.exp(x) * x)
    loss.backward()
    with pytest.raises(GraphFreedError, match=r"second time.*retain_graph=True"):
        loss.backward()


def test_backward_through_a_shared_freed_subgraph_raises(backend):
    x = leaf((3,))
    h = F.exp(x)
    F.sum(h).backward()
    with pytest.raises(GraphFreedError, match="Exp"):  # the message names the freed op
        F.sum(h * 2.0).backward()


def test_retain_graph_allows_a_second_backward(backend):
    x = leaf((4, 5))
    targets = xp.asarray([1, -100, 4, 0])
    loss = F.cross_entropy(F.layer_norm(x, leaf((5,), 1), leaf((5,), 2)) * 3.0, targets) + F.sum(x * x)
    loss.backward(retain_graph=True)
    first = to_numpy(x.grad).copy()
    loss.backward(retain_graph=True)  # a retained graph gives the same gradient again
    np.testing.assert_allclose(to_numpy(x.grad), 2 * first, rtol=1e-12)
    loss.backward()
    np.testing.assert_allclose(to_numpy(x.grad), 3 * first, rtol=1e-12)
    with pytest.raises(GraphFreedError):
        loss.backward()


def test_backward_releases_saved_arrays(backend):
    x, w = leaf((2, 3, 4)), leaf((5, 4), 1)
    loss = F.cross_entropy(F.linear(F.rms_norm(x, leaf((4,), 2)), w), xp.asarray([[0, 1, 2], [3, 4, 0]]))
    nodes = graph_nodes(loss)
    assert len(nodes) >= 3 and any(n.ctx.saved for n in nodes)
    assert not any(n.ctx.freed for n in nodes)
    loss.backward()
    for n in nodes:
        assert n.ctx.freed, n.function.__name__
        assert n.ctx.saved == ()
        assert not n.ctx.__dict__, f"{n.function.__name__} kept {list(n.ctx.__dict__)}"


def test_retain_graph_keeps_saved_arrays(backend):
    x = leaf((3,))
    loss = F.sum(F.exp(x) * x)
    nodes = graph_nodes(loss)
    loss.backward(retain_graph=True)
    assert not any(n.ctx.freed for n in nodes)


def test_backward_lets_go_of_intermediate_activations(backend):
    """Once backward has passed, the graph no longer keeps the forward's tensors alive.

    A loss that is still referenced (the next micro-batch's forward runs before ``loss`` is
    rebound) must not pin every activation of the previous step in memory.
    """
    x = leaf((4, 8))
    h = F.silu(x @ leaf((8, 8), 1))
    probe = weakref.ref(h.data)
    loss = F.sum(F.softmax(h) * h)
    del h
    gc.collect()
    assert probe() is not None  # before backward the graph needs h (saved by the product)
    loss.backward()
    gc.collect()
    assert probe() is None, "the freed graph still holds an intermediate activation"
    assert x.grad is not None and np.isfinite(loss.item())


def test_the_graph_keeps_only_what_backward_saved_not_every_intermediate(backend):
    """An add saves no array, so its operand is freed as soon as the forward code drops it —
    the graph links nodes, not tensors. The gradient still flows through it."""
    x = leaf((4, 8))
    a = x + 1.0
    probe = weakref.ref(a.data)
    loss = F.sum(a + 2.0)
    del a
    gc.collect()
    assert probe() is None, "the graph pins an activation that no backward formula needs"
    loss.backward()
    assert np.array_equal(to_numpy(x.grad), np.ones((4, 8), dtype=np.float32))


# ---- errors -------------------------------------------------------------------------------------
def test_backward_on_a_non_scalar_needs_a_gradient(backend):
    x = leaf((2, 3))
    y = x * 2.0
    with pytest.raises(RuntimeError, match=re.escape("non-scalar tensor of shape (2, 3)")):
        y.backward()
    with pytest.raises(ValueError, match=re.escape("(3,) != tensor shape (2, 3)")):
        y.backward(xp.ones(3))
    y.backward(xp.ones((2, 3)))  # with dL/dy given explicitly it works
    np.testing.assert_array_equal(to_numpy(x.grad), np.full((2, 3), 2.0))


def test_backward_on_a_constant_raises(backend):
    with pytest.raises(RuntimeError, match="does not require grad"):
        F.sum(leaf((3,), requires_grad=False)).backward()


def _shape_error_cases():
    return {
        "add": (lambda: F.add(leaf((2, 3)), leaf((4,))), "add", (2, 3), (4,)),
        "matmul": (lambda: F.matmul(leaf((2, 3)), leaf((4, 5))), "matmul", (2, 3), (4, 5)),
        "matmul_batch": (lambda: leaf((2, 2, 3)) @ leaf((3, 3, 4)), "matmul", (2, 2, 3), (3, 3, 4)),
        "linear": (lambda: F.linear(leaf((2, 3)), leaf((5, 4))), "linear", (2, 3), (5, 4)),
        "concatenate": (lambda: F.concatenate([leaf((2, 3)), leaf((2, 4))], axis=0), "concatenate",
                        (2, 3), (2, 4)),
        "cross_entropy": (lambda: F.cross_entropy(leaf((4, 5)), xp.asarray([0, 1, 2])), "cross_entropy",
                          (4, 5), (3,)),
        "cross_entropy_3d": (lambda: F.cross_entropy(leaf((2, 3, 5)), xp.zeros((3, 2), dtype=int)),
                             "cross_entropy", (2, 3, 5), (3, 2)),
    }


@pytest.mark.parametrize("case", list(_shape_error_cases()))
def test_shape_errors_name_the_op_and_both_shapes(backend, case):
    make, op, shape_a, shape_b = _shape_error_cases()[case]
    with pytest.raises(ShapeError) as info:
        make()
    message = str(info.value)
    assert message.startswith(op), message
    assert str(shape_a) in message and str(shape_b) in message, message


def test_shape_error_is_a_value_error(backend):
    with pytest.raises(ValueError, match=r"stack: all shapes must be equal"):
        F.stack([leaf((2,)), leaf((3,))])


# ---- frozen means frozen, by counting ---------------------------------------------------------
@pytest.mark.parametrize(
    ("x_grad", "w_grad", "expected"),
    [(True, False, 1), (False, True, 1), (True, True, 2)],
    ids=["W frozen: dx only", "x constant: dW only", "both trained"],
)
def test_linear_runs_only_the_wanted_backward_matmuls(backend, x_grad, w_grad, expected):
    x, w = leaf((2, 3, 4), requires_grad=x_grad), leaf((5, 4), 1, requires_grad=w_grad)
    y = F.linear(x, w)
    loss = F.sum(y * y)
    assert matmuls_in(loss.backward) == expected
    assert (x.grad is not None) == x_grad and (w.grad is not None) == w_grad


def test_linear_with_only_the_bias_trained_runs_no_backward_matmul(backend):
    x, w, b = leaf((3, 4), requires_grad=False), leaf((5, 4), requires_grad=False), leaf((5,))
    loss = F.sum(F.linear(x, w, b) ** 2)
    assert matmuls_in(loss.backward) == 0
    assert b.grad is not None and w.grad is None


@pytest.mark.parametrize(
    ("x_grad", "w_grad", "expected"),
    [(True, False, 1), (False, True, 1), (True, True, 2)],
    ids=["W frozen: dx only", "x constant: dW only", "both trained"],
)
@pytest.mark.parametrize("x_shape", [(3, 4), (2, 3, 4)], ids=["2-D", "batched"])
def test_matmul_runs_only_the_wanted_backward_matmuls(backend, x_grad, w_grad, expected, x_shape):
    x, w = leaf(x_shape, requires_grad=x_grad), leaf((4, 5), 1, requires_grad=w_grad)
    loss = F.sum(x @ w)
    assert matmuls_in(loss.backward) == expected


@pytest.mark.parametrize(
    "build",
    [F.linear, lambda x, w: x @ w.T],
    ids=["linear", "matmul"],
)
def test_all_frozen_builds_no_graph(backend, build):
    x, w = leaf((2, 4), requires_grad=False), leaf((3, 4), 1, requires_grad=False)
    assert matmuls_in(lambda: build(x, w)) == 1  # the forward product only
    y = build(x, w)
    assert not y.requires_grad and y._node is None


@pytest.mark.parametrize(
    ("trained", "expected"),
    [("q", 2), ("k", 2), ("v", 1), ("qk", 3), ("qkv", 4)],
)
def test_attention_with_frozen_inputs_skips_their_products(backend, trained, expected):
    """Backward products: dV = P^T dO (1); dP = dO V^T shared by dQ = dS K and dK = dS^T Q."""
    q = leaf((1, 4, 3, 2), 0, requires_grad="q" in trained)
    k = leaf((1, 2, 3, 2), 1, requires_grad="k" in trained)
    v = leaf((1, 2, 3, 2), 2, requires_grad="v" in trained)
    loss = F.sum(F.scaled_dot_product_attention(q, k, v) ** 2)
    assert matmuls_in(loss.backward) == expected
    assert [t.grad is not None for t in (q, k, v)] == [name in trained for name in "qkv"]


def test_attention_with_all_inputs_frozen_builds_no_graph(backend):
    q, k, v = (leaf((1, 2, 3, 2), s, requires_grad=False) for s in range(3))
    assert matmuls_in(lambda: F.scaled_dot_product_attention(q, k, v)) == 2
    assert F.scaled_dot_product_attention(q, k, v)._node is None


# ---- dtypes -------------------------------------------------------------------------------------
SCALAR_EXPRESSIONS = {
    "x * 2.0": lambda x: x * 2.0,
    "2.0 * x": lambda x: 2.0 * x,
    "2.0 - x": lambda x: 2.0 - x,
    "x - 1": lambda x: x - 1,
    "x + 0.5": lambda x: x + 0.5,
    "x / 3": lambda x: x / 3,
    "1 / x": lambda x: 1 / x,
    "x ** 2": lambda x: x**2,
    "x ** 0.5": lambda x: F.pow(x * x + 1.0, 0.5),
    "x * np.float64(2)": lambda x: x * np.float64(2.0),
}


@pytest.mark.parametrize("expr", list(SCALAR_EXPRESSIONS))
def test_float32_stays_float32_with_python_scalars(backend, expr):
    x = leaf((3,), dtype=np.float32)
    y = SCALAR_EXPRESSIONS[expr](x)
    assert y.dtype == np.float32
    F.sum(y).backward()
    assert x.grad.dtype == np.float32


FLOAT32_OPS = {
    "mean": lambda x, w: F.mean(x),
    "max": lambda x, w: F.max(x, axis=-1),
    "softmax": lambda x, w: F.softmax(x) * x,
    "log_softmax": lambda x, w: F.log_softmax(x),
    "cross_entropy": lambda x, w: F.cross_entropy(x, xp.asarray([[0, 1], [2, -100]])),
    "rms_norm": F.rms_norm,
    "layer_norm": lambda x, w: F.layer_norm(x, w, w),
    "gelu": lambda x, w: F.gelu(x) + F.gelu(x, approximate="none"),
    "silu": lambda x, w: F.silu(x),
    "linear": lambda x, w: F.linear(x, F.reshape(w, 1, 3), w[:1]),
    "rsqrt": lambda x, w: F.rsqrt(x * x + 1.0),
    "dropout": lambda x, w: F.dropout(x, 0.5, xp.random.default_rng(0)),
    "rope": lambda x, w: F.rope(x[..., :2], *F.rope_tables(xp.arange(2), 2)),
    "attention": lambda x, w: F.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None]),
}


@pytest.mark.parametrize("op", list(FLOAT32_OPS))
def test_float32_ops_keep_float32_values_and_gradients(backend, op):
    x, w = leaf((2, 2, 3), dtype=np.float32), leaf((3,), 1, dtype=np.float32)
    y = FLOAT32_OPS[op](x, w)
    assert y.dtype == np.float32
    F.sum(y * y).backward()
    assert x.grad.dtype == np.float32
    assert w.grad is None or w.grad.dtype == np.float32


def test_float64_stays_float64_through_full_reductions(backend):
    """NumPy returns a numpy.float64 scalar for a full reduction; it must not become float32."""
    x = leaf((2, 3))
    for y in (F.sum(x), F.mean(x), F.max(x), x[0, 0] * x[1, 1], F.cross_entropy(x, xp.asarray([0, 2]))):
        assert y.dtype == np.float64
    assert Tensor(np.float64(1.5)).dtype == np.float64
    assert Tensor(1.5).dtype == np.float32  # a Python number takes the default dtype


# ---- depth ---------------------------------------------------------------------------------------
def test_a_deep_chain_backprops_without_recursion(backend):
    """5000 nodes in a row: the topological sort and the walk are loops, not recursion."""
    assert sys.getrecursionlimit() < 5000  # a recursive walk would fail on this chain
    x = leaf((), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y * 1.0001 + 0.0
    y.backward()
    np.testing.assert_allclose(to_numpy(x.grad), 1.0001**5000, rtol=1e-10)
    del y
    gc.collect()


# ---- backends ----------------------------------------------------------------------------------
def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match=r"unknown backend 'foo'.*numpy.*cupy"):
        B.set_backend("foo")
    assert B.get_backend() == "numpy"


@pytest.mark.skipif(B.cupy_available(), reason="CuPy and a GPU are present: the error cannot occur here")
def test_cupy_without_cupy_or_gpu_says_what_is_missing():
    missing = "CuPy package" if importlib.util.find_spec("cupy") is None else "GPU"
    with pytest.raises(B.BackendUnavailableError, match=missing):
        B.set_backend("cupy")
    assert B.get_backend() == "numpy"  # no silent switch and no half-switched state
    assert B.xp.asarray([1.0]).__class__ is np.ndarray


def test_a_query_that_may_see_no_key_gets_zero_output_not_nan():
    """Left padding + causal mask: the pad query at position 0 sees only a masked key."""
    import numpy as np

    import minift.autograd.functional as F
    from minift.autograd import Tensor

    rng = np.random.default_rng(0)
    q = Tensor(rng.normal(size=(1, 2, 3, 4)), requires_grad=True)
    k = Tensor(rng.normal(size=(1, 1, 3, 4)), requires_grad=True)
    v = Tensor(rng.normal(size=(1, 1, 3, 4)), requires_grad=True)
    key_padding = np.array([[False, True, True]])
    out = F.scaled_dot_product_attention(q, k, v, mask=key_padding)
    assert np.isfinite(out.data).all()
    np.testing.assert_array_equal(out.data[:, :, 0], 0.0)
    F.sum(out * out).backward()
    assert all(np.isfinite(t.grad).all() for t in (q, k, v))


def test_two_leaves_never_share_one_grad_array():
    """Add passes the same gradient array to both inputs; in-place edits of one .grad
    (clipping, scaling) must not change the other."""
    import numpy as np

    from minift.autograd import Tensor

    a = Tensor(np.ones(3), requires_grad=True)
    b = Tensor(np.ones(3), requires_grad=True)
    (a + b).backward(np.ones(3))
    assert a.grad is not b.grad
    a.grad *= 10
    np.testing.assert_array_equal(b.grad, np.ones(3))
