"""``checkpoint(fn, *inputs)``: the same gradients as running ``fn`` in the graph, with only the
inputs kept, and a retained graph that survives a second backward."""

import numpy as np

import minift.autograd.functional as F
from minift.autograd import Tensor, checkpoint, op_counts
from minift.backend import to_numpy


def leaf(shape, seed, requires_grad=True):
    return Tensor(np.random.default_rng(seed).standard_normal(shape), requires_grad=requires_grad)


def segment(w):
    return lambda x: F.silu(x @ w) @ w.T


def test_gradients_equal_the_recorded_segment_and_only_the_input_is_kept():
    x, w = leaf((4, 3), 0), leaf((3, 5), 1)
    (segment(w)(x) ** 2).sum().backward()
    expected = to_numpy(x.grad), to_numpy(w.grad)
    x.grad = w.grad = None
    y = checkpoint(segment(w), x, parameters=[w])
    assert [a is x.data for a in y._node.ctx.saved] == [True]  # nothing from inside the segment
    (y**2).sum().backward()
    assert np.array_equal(to_numpy(x.grad), expected[0]) and np.array_equal(to_numpy(w.grad), expected[1])


def test_a_parameter_makes_the_output_trainable_when_no_input_is():
    x, w = leaf((4, 3), 0, requires_grad=False), leaf((3, 5), 1)
    y = checkpoint(segment(w), x, parameters=[w])
    assert y.requires_grad
    y.sum().backward()
    assert w.grad is not None and x.grad is None
    frozen = leaf((3, 5), 1, requires_grad=False)
    assert not checkpoint(segment(frozen), x, parameters=[frozen]).requires_grad


def test_the_recompute_skips_a_frozen_weights_gradient():
    x, frozen = leaf((4, 3), 0), leaf((3, 5), 1, requires_grad=False)
    y = checkpoint(segment(frozen), x, parameters=[frozen])
    op_counts.clear()
    y.sum().backward()
    assert op_counts["matmul"] == 2 + 2  # the recompute's two products, then dx only for each
    assert frozen.grad is None


def test_retain_graph_keeps_the_saved_input_intact():
    x, w = leaf((4, 3), 0), leaf((3, 5), 1)
    loss = (checkpoint(segment(w), x, parameters=[w]) ** 2).sum()
    loss.backward(retain_graph=True)
    first = to_numpy(x.grad).copy()
    loss.backward()
    np.testing.assert_allclose(to_numpy(x.grad), 2 * first, rtol=1e-15)
