"""Every op's backward against central finite differences, in float64.

For an op ``y = f(x1, x2, ...)`` the test builds the scalar ``L = sum(w * y)`` with fixed random
weights ``w`` (so no gradient is trivially zero: ``sum(softmax(x))`` is 1 whatever x is), runs
``L.backward()`` and compares each ``dL/dx_i`` with

    (L(x_i + eps e_k) - L(x_i - eps e_k)) / (2 eps)      for every element k.

Hypothesis draws the shapes (size-1 axes and broadcasting pairs included), the values, and which
inputs require a gradient (a frozen input must get no ``.grad`` and the others must be unchanged
by its absence).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import strategies as S
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minift.autograd.functional as F
from minift.autograd import Tensor, no_grad
from minift.backend import to_numpy, xp

# Tolerances for analytic vs numeric gradients, stated once. Central differences in float64 with
# eps = 1e-6 have truncation error ~eps^2 * |f'''| ~ 1e-11 and round-off ~1e-16 * |L| / eps,
# about 1e-8 for the |L| <= 100 of these small tests. A correct backward therefore agrees to
# ~1e-8; a wrong one (a missing term, a transposed product, a lost broadcast sum) is off by
# O(1) relative. rtol=1e-5 / atol=1e-6 sits well between the two.
RTOL = 1e-5
ATOL = 1e-6
EPS = 1e-6

# `backend` is a function-scoped fixture: it sets the backend once per test function, which is
# what every example of that test wants, so Hypothesis's health check about it does not apply.
gradcheck = settings(max_examples=40, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---- the checker --------------------------------------------------------------------------------
def numerical_grad(f, inputs, eps=EPS):
    """Central-difference gradient of the scalar ``f(*inputs)`` w.r.t. each array in ``inputs``.

    ``inputs`` are float64 NumPy arrays; each element is nudged by +-eps in turn (on a copy).
    """
    arrays = [np.array(a, dtype=np.float64, copy=True) for a in inputs]
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        for k in np.ndindex(a.shape):
            original = a[k]
            a[k] = original + eps
            plus = f(*arrays)
            a[k] = original - eps
            minus = f(*arrays)
            a[k] = original
            g[k] = (plus - minus) / (2 * eps)
        grads.append(g)
    return grads


def assert_grads_match(analytic, numeric, what):
    np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=ATOL, err_msg=f"gradient of {what}")


def check_gradients(op, *inputs, requires=None, seed=0, numeric_op=None):
    """Compare minift's backward of ``op`` with finite differences, for every input in ``inputs``.

    ``op`` maps Tensors to a Tensor. ``requires[i]`` says whether input i is a trainable leaf
    (default: all). ``numeric_op`` (NumPy arrays -> NumPy array) replaces ``op`` on the numeric
    side when the forward is only an approximation of the function the backward differentiates.
    Returns the leaves, for tests that inspect them further.
    """
    requires = requires or (True,) * len(inputs)
    leaves = [Tensor(xp.asarray(a), requires_grad=r) for a, r in zip(inputs, requires, strict=True)]
    out = op(*leaves)
    assert out.dtype == np.float64, f"float64 inputs gave a {out.dtype} output"
    weights = np.random.default_rng(seed).standard_normal(out.shape)
    loss = F.sum(out * Tensor(xp.asarray(weights)))
    loss.backward()

    def scalar_loss(*arrays):
        if numeric_op is not None:
            return float(np.sum(numeric_op(*arrays) * weights))
        with no_grad():
            y = op(*(Tensor(xp.asarray(a)) for a in arrays))
        return float(np.sum(to_numpy(y.data) * weights))

    numeric = numerical_grad(scalar_loss, inputs)
    for i, (leaf, num, r) in enumerate(zip(leaves, numeric, requires, strict=True)):
        if not r:
            assert leaf.grad is None, f"input {i} does not require grad but got one"
            continue
        assert leaf.grad is not None, f"input {i} requires grad but got none"
        assert leaf.grad.shape == leaf.shape
        assert leaf.grad.dtype == np.float64
        assert_grads_match(to_numpy(leaf.grad), num, f"input {i} (shape {leaf.shape})")
    return leaves


def requires_flags(n):
    """Which of n inputs require a gradient: any combination but all-frozen."""
    return st.tuples(*[st.booleans()] * n).filter(any)


# ---- arithmetic with broadcasting ---------------------------------------------------------------
BINARY = {"add": F.add, "sub": F.sub, "mul": F.mul, "div": F.div}


@pytest.mark.parametrize("name", list(BINARY))
@gradcheck
@given(data=st.data())
def test_binary_ops_with_broadcasting(backend, name, data):
    shape_a, shape_b = data.draw(S.broadcastable_pair())
    a = data.draw(S.arrays(shape_a))
    b = data.draw(S.nonzero_arrays(shape_b) if name == "div" else S.arrays(shape_b))
    check_gradients(BINARY[name], a, b, requires=data.draw(requires_flags(2)), seed=data.draw(S.seeds))


@gradcheck
@given(data=st.data())
def test_python_operators_and_scalars(backend, data):
    """The operators route to the same Functions; a Python scalar on either side is a constant."""
    x = data.draw(S.nonzero_arrays(data.draw(S.shapes())))
    check_gradients(lambda t: (2.0 - t) * 3 + t / 1.5 - 1 / t + (-t) ** 2, x)


@gradcheck
@given(data=st.data())
def test_neg(backend, data):
    check_gradients(F.neg, data.draw(S.arrays(data.draw(S.shapes()))))


@gradcheck
@given(data=st.data(), exponent=st.sampled_from([2, 3, 1, 0.5, 1.5, -1, -2.5]))
def test_pow_scalar_exponent(backend, data, exponent):
    shape = data.draw(S.shapes())
    integer_power = float(exponent).is_integer() and exponent > 0
    x = data.draw(S.arrays(shape) if integer_power else S.positive_arrays(shape))
    check_gradients(lambda t: F.pow(t, exponent), x, seed=data.draw(S.seeds))


@gradcheck
@given(data=st.data())
def test_exp(backend, data):
    check_gradients(F.exp, data.draw(S.arrays(data.draw(S.shapes()), -2.0, 2.0)))


@pytest.mark.parametrize("op", [F.log, F.sqrt, F.rsqrt], ids=["log", "sqrt", "rsqrt"])
@gradcheck
@given(data=st.data())
def test_functions_of_positive_inputs(backend, op, data):
    check_gradients(op, data.draw(S.positive_arrays(data.draw(S.shapes()))), seed=data.draw(S.seeds))


# ---- products -----------------------------------------------------------------------------------
@gradcheck
@given(data=st.data())
def test_matmul_plain_batched_and_broadcast(backend, data):
    shape_a, shape_b = data.draw(S.matmul_shapes())
    a, b = data.draw(S.arrays(shape_a)), data.draw(S.arrays(shape_b))
    requires = data.draw(requires_flags(2))
    check_gradients(F.matmul, a, b, requires=requires, seed=data.draw(S.seeds))


@gradcheck
@given(data=st.data(), bias=st.booleans())
def test_linear_with_and_without_bias(backend, data, bias):
    batch = data.draw(S.shapes(0, 3, 3))
    n_in, n_out = data.draw(S.small_dims), data.draw(S.small_dims)
    inputs = [data.draw(S.arrays((*batch, n_in))), data.draw(S.arrays((n_out, n_in)))]
    if bias:
        inputs.append(data.draw(S.arrays((n_out,))))
    requires = data.draw(requires_flags(len(inputs)))
    check_gradients(F.linear, *inputs, requires=requires, seed=data.draw(S.seeds))


# ---- reductions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("op", [F.sum, F.mean], ids=["sum", "mean"])
@gradcheck
@given(data=st.data(), keepdims=st.booleans())
def test_sum_and_mean_over_axes(backend, op, data, keepdims):
    x = data.draw(S.arrays(data.draw(S.shapes(0, 3, 4))))
    axis = data.draw(S.reduction_axes(x.ndim))
    check_gradients(lambda t: op(t, axis=axis, keepdims=keepdims), x, seed=data.draw(S.seeds))


@gradcheck
@given(data=st.data(), keepdims=st.booleans())
def test_max_without_ties(backend, data, keepdims):
    x = data.draw(S.distinct_arrays(data.draw(S.shapes(1, 3, 4))))
    axis = data.draw(S.reduction_axes(x.ndim))
    check_gradients(lambda t: F.max(t, axis=axis, keepdims=keepdims), x, seed=data.draw(S.seeds))


@gradcheck
@given(data=st.data(), keepdims=st.booleans())
def test_max_ties_share_the_gradient_equally(backend, data, keepdims):
    """At a tie max is not differentiable; minift splits g evenly among the tied winners."""
    x = data.draw(S.tied_arrays(data.draw(S.shapes(1, 3, 4))))
    axis = data.draw(S.reduction_axes(x.ndim))
    axes = tuple(range(x.ndim)) if axis is None else tuple(np.atleast_1d(axis) % x.ndim)
    t = Tensor(xp.asarray(x), requires_grad=True)
    y = F.max(t, axis=axis, keepdims=keepdims)
    g = np.random.default_rng(data.draw(S.seeds)).standard_normal(y.shape)
    y.backward(xp.asarray(g))

    m = x.max(axis=axes, keepdims=True)
    winners = x == m
    share = np.expand_dims(g, axes) if not keepdims else g
    expected = winners * share / winners.sum(axis=axes, keepdims=True)
    np.testing.assert_allclose(to_numpy(t.grad), expected, rtol=1e-12, atol=0)
    # the shares add back up to g: the gradient of the max is neither lost nor duplicated
    np.testing.assert_allclose(to_numpy(t.grad).sum(axis=axes, keepdims=True), share, rtol=1e-12, atol=1e-15)


def test_max_tie_example(backend):
    t = Tensor(xp.asarray([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]), requires_grad=True)
    F.sum(F.max(t, axis=1)).backward()
    np.testing.assert_allclose(to_numpy(t.grad), [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-15)


# ---- moving numbers around ----------------------------------------------------------------------
@gradcheck
@given(data=st.data())
def test_reshape(backend, data):
    shape = data.draw(S.shapes(1, 3, 4))
    size = int(np.prod(shape))
    target = data.draw(st.sampled_from([(size,), (1, size), (size, 1), (-1,), tuple(reversed(shape)),
                                        (*shape[:-1], 1, shape[-1])]))
    check_gradients(lambda t: F.reshape(t, target), data.draw(S.arrays(shape)), seed=data.draw(S.seeds))


@gradcheck
@given(data=st.data())
def test_permute_and_transpose(backend, data):
    shape = data.draw(S.shapes(2, 4, 3))
    axes = data.draw(st.permutations(range(len(shape))))
    axes = tuple(a - len(shape) if data.draw(st.booleans()) else a for a in axes)  # negative too
    i, j = data.draw(st.lists(st.integers(-len(shape), len(shape) - 1), min_size=2, max_size=2))
    x = data.draw(S.arrays(shape))
    seed = data.draw(S.seeds)
    check_gradients(lambda t: F.permute(t, axes), x, seed=seed)
    check_gradients(lambda t: F.transpose(t, i, j), x, seed=seed)
    check_gradients(lambda t: t.T, x, seed=seed)


@gradcheck
@given(data=st.data())
def test_getitem_slices_ints_and_repeated_integer_arrays(backend, data):
    shape = data.draw(S.shapes(1, 3, 4))
    index = on_backend(data.draw(S.basic_and_advanced_indices(shape)))
    check_gradients(lambda t: t[index], data.draw(S.arrays(shape)), seed=data.draw(S.seeds))


def on_backend(index):
    """The index with its integer arrays moved to the active backend."""
    if isinstance(index, tuple):
        return tuple(on_backend(i) for i in index)
    return xp.asarray(index) if isinstance(index, np.ndarray) else index


def test_getitem_repeated_index_adds_up(backend):
    t = Tensor(xp.asarray([1.0, 2.0, 3.0]), requires_grad=True)
    F.sum(t[xp.asarray([0, 2, 0, 0])]).backward()
    np.testing.assert_array_equal(to_numpy(t.grad), [3.0, 0.0, 1.0])


@gradcheck
@given(data=st.data())
def test_concatenate(backend, data):
    shape = data.draw(S.shapes(1, 3, 3))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    sizes = data.draw(st.lists(S.small_dims, min_size=1, max_size=3))
    pieces = [data.draw(S.arrays(shape[:axis % len(shape)] + (n,) + shape[axis % len(shape) + 1:]))
              for n in sizes]
    requires = data.draw(requires_flags(len(pieces)))
    check_gradients(lambda *ts: F.concatenate(ts, axis=axis), *pieces, requires=requires,
                    seed=data.draw(S.seeds))


@gradcheck
@given(data=st.data())
def test_stack(backend, data):
    shape = data.draw(S.shapes(0, 3, 3))
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)))
    pieces = [data.draw(S.arrays(shape)) for _ in range(data.draw(st.integers(1, 3)))]
    requires = data.draw(requires_flags(len(pieces)))
    check_gradients(lambda *ts: F.stack(ts, axis=axis), *pieces, requires=requires, seed=data.draw(S.seeds))


@gradcheck
@given(data=st.data())
def test_embedding_with_repeated_ids(backend, data):
    vocab, dim = data.draw(st.integers(1, 5)), data.draw(S.small_dims)
    ids = data.draw(S.repeated_ids(vocab, data.draw(S.shapes(1, 2, 4).filter(lambda s: np.prod(s) >= 2))))
    ids_x = xp.asarray(ids)
    weight = data.draw(S.arrays((vocab, dim)))
    check_gradients(lambda w: F.embedding(ids_x, w), weight, seed=data.draw(S.seeds))


def test_embedding_repeated_id_row_gets_the_sum(backend):
    w = Tensor(xp.asarray(np.arange(6.0).reshape(3, 2)), requires_grad=True)
    out = F.embedding(xp.asarray([[2, 0, 2], [2, 1, 0]]), w)
    g = np.arange(12.0).reshape(2, 3, 2)
    out.backward(xp.asarray(g))
    expected = np.stack([g[0, 1] + g[1, 2], g[1, 1], g[0, 0] + g[0, 2] + g[1, 0]])
    np.testing.assert_array_equal(to_numpy(w.grad), expected)


# ---- softmax and losses ------------------------------------------------------------------------
@pytest.mark.parametrize("op", [F.softmax, F.log_softmax], ids=["softmax", "log_softmax"])
@gradcheck
@given(data=st.data())
def test_softmax_and_log_softmax(backend, op, data):
    x = data.draw(S.arrays(data.draw(S.shapes(1, 3, 4)), -4.0, 4.0))
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    check_gradients(lambda t: op(t, axis=axis), x, seed=data.draw(S.seeds))


@gradcheck
@given(data=st.data())
def test_cross_entropy_with_ignored_rows(backend, data):
    lead = data.draw(S.shapes(1, 2, 4))  # (N,) rows, or (B, T) positions of a batch
    vocab = data.draw(st.integers(1, 5))
    logits = data.draw(S.arrays((*lead, vocab), -4.0, 4.0))
    targets = data.draw(S.ids(vocab, lead))
    ignore_index = data.draw(st.sampled_from([-100, vocab]))  # the default, and a custom id
    ignored = data.draw(S.bool_masks(lead))  # a random subset of the rows
    ignored.flat[0] = False  # at least one counted row (the all-ignored case is tested below)
    targets = np.where(ignored, ignore_index, targets)
    targets_x = xp.asarray(targets)
    check_gradients(lambda z: F.cross_entropy(z, targets_x, ignore_index=ignore_index), logits,
                    seed=data.draw(S.seeds))


def test_cross_entropy_value_is_the_mean_over_counted_rows(backend):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 4))
    targets = np.array([1, -100, 3, 0, -100])
    loss = F.cross_entropy(Tensor(xp.asarray(logits)), xp.asarray(targets))
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -np.mean([log_p[0, 1], log_p[2, 3], log_p[3, 0]])
    assert loss.shape == ()
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-12)


def test_cross_entropy_all_ignored_batch_gives_zero_loss_and_zero_grad(backend):
    logits = Tensor(xp.asarray(np.random.default_rng(1).standard_normal((2, 3, 5))), requires_grad=True)
    loss = F.cross_entropy(logits, xp.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None
    np.testing.assert_array_equal(to_numpy(logits.grad), np.zeros((2, 3, 5)))


@gradcheck
@given(data=st.data())
def test_log_sigmoid(backend, data):
    x = data.draw(S.arrays(data.draw(S.shapes(1, 2, 4)), -6.0, 6.0))
    check_gradients(F.log_sigmoid, x, seed=data.draw(S.seeds))


def test_log_sigmoid_is_finite_and_exact_far_out(backend):
    x = np.array([-800.0, -30.0, 0.0, 30.0, 800.0])
    got = to_numpy(F.log_sigmoid(Tensor(xp.asarray(x))).data)
    np.testing.assert_allclose(got, [-800.0, -30.0 - np.log1p(np.exp(-30.0)), -np.log(2.0), -np.exp(-30.0), 0.0],
                               rtol=1e-12, atol=1e-300)


@gradcheck
@given(data=st.data())
def test_token_logprobs_with_ignored_positions(backend, data):
    lead = data.draw(S.shapes(1, 2, 4))
    vocab = data.draw(st.integers(1, 5))
    logits = data.draw(S.arrays((*lead, vocab), -4.0, 4.0))
    targets = np.where(data.draw(S.bool_masks(lead)), -100, data.draw(S.ids(vocab, lead)))
    targets_x = xp.asarray(targets)
    check_gradients(lambda z: F.token_logprobs(z, targets_x), logits, seed=data.draw(S.seeds))


def test_token_logprobs_is_log_softmax_picked_at_the_target_and_zero_where_ignored(backend):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 6)) * 3
    targets = np.array([[1, -100, 5], [0, 2, -100]])
    got = to_numpy(F.token_logprobs(Tensor(xp.asarray(logits)), xp.asarray(targets)).data)
    log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    expected = np.where(targets == -100, 0.0, np.take_along_axis(log_p, np.maximum(targets, 0)[..., None], -1)[..., 0])
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


# ---- the fused head + log-softmax (vocabulary chunks, online logsumexp) ---------------------------
@gradcheck
@given(data=st.data())
def test_linear_token_logprobs_in_chunks(backend, data):
    """Gradients for h and the head W, through 1 to vocab-many chunks (``chunk_elements`` small),
    with ignored positions; either input may be frozen."""
    lead = data.draw(S.shapes(1, 2, 3))
    dim, vocab = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 7))
    h = data.draw(S.arrays((*lead, dim), -2.0, 2.0))
    weight = data.draw(S.arrays((vocab, dim), -2.0, 2.0))
    targets = xp.asarray(np.where(data.draw(S.bool_masks(lead)), -100, data.draw(S.ids(vocab, lead))))
    chunk = data.draw(st.integers(1, 2 * vocab)) * int(np.prod(lead))  # 1 to `vocab` columns per chunk
    check_gradients(lambda x, w: F.linear_token_logprobs(x, w, targets, chunk_elements=chunk), h, weight,
                    requires=data.draw(requires_flags(2)), seed=data.draw(S.seeds))


@pytest.mark.parametrize("chunk_elements", [1, 12, 10**9])  # one column per chunk, 3 columns, whole
def test_linear_token_logprobs_equals_the_unfused_head_then_log_softmax(backend, chunk_elements):
    rng = np.random.default_rng(0)
    h, weight = rng.standard_normal((2, 2, 5)) * 3, rng.standard_normal((11, 5))
    targets = xp.asarray(np.array([[1, -100], [10, 0]]))
    fused = F.linear_token_logprobs(Tensor(xp.asarray(h)), Tensor(xp.asarray(weight)), targets,
                                    chunk_elements=chunk_elements)
    plain = F.token_logprobs(F.linear(Tensor(xp.asarray(h)), Tensor(xp.asarray(weight))), targets)
    assert fused.shape == (2, 2)
    np.testing.assert_allclose(to_numpy(fused.data), to_numpy(plain.data), rtol=1e-13, atol=1e-13)
    assert to_numpy(fused.data)[0, 1] == 0.0


def test_linear_cross_entropy_equals_cross_entropy_of_the_logits_and_its_gradients(backend):
    rng = np.random.default_rng(1)
    h, weight = rng.standard_normal((3, 4, 6)), rng.standard_normal((50, 6))
    targets = xp.asarray(np.where(rng.random((3, 4)) < 0.3, -100, rng.integers(0, 50, (3, 4))))
    grads = []
    for loss_of in (lambda x, w: F.linear_cross_entropy(x, w, targets, chunk_elements=24),
                    lambda x, w: F.cross_entropy(F.linear(x, w), targets)):
        x, w = Tensor(xp.asarray(h), requires_grad=True), Tensor(xp.asarray(weight), requires_grad=True)
        loss = loss_of(x, w)
        loss.backward()
        grads.append((loss.item(), to_numpy(x.grad), to_numpy(w.grad)))
    (fused_loss, fused_dx, fused_dw), (plain_loss, plain_dx, plain_dw) = grads
    np.testing.assert_allclose(fused_loss, plain_loss, rtol=1e-13)
    np.testing.assert_allclose(fused_dx, plain_dx, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(fused_dw, plain_dw, rtol=1e-11, atol=1e-15)


def test_linear_cross_entropy_all_ignored_gives_zero_loss_and_zero_grad(backend):
    h = Tensor(xp.asarray(np.random.default_rng(2).standard_normal((2, 3, 4))), requires_grad=True)
    weight = Tensor(xp.asarray(np.random.default_rng(3).standard_normal((9, 4))))
    loss = F.linear_cross_entropy(h, weight, xp.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()
    np.testing.assert_array_equal(to_numpy(h.grad), np.zeros((2, 3, 4)))


def test_linear_cross_entropy_refuses_a_target_outside_the_vocabulary(backend):
    h, weight = Tensor(xp.zeros((2, 4))), Tensor(xp.zeros((9, 4)))
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 9\)"):
        F.linear_cross_entropy(h, weight, xp.asarray(np.array([3, 9])))


def test_a_16_bit_head_is_widened_per_chunk_to_the_same_result():
    """A bf16-stored frozen head gives what its float32 widening gives (each chunk is widened).
    NumPy only: bfloat16 is an ``ml_dtypes`` NumPy dtype (``--base-dtype`` is host-only)."""
    import ml_dtypes  # noqa: PLC0415 - imported where bf16 is used, as minift does
    rng = np.random.default_rng(4)
    h = rng.standard_normal((6, 8)).astype(np.float32)
    narrow = rng.standard_normal((40, 8)).astype(ml_dtypes.bfloat16)
    targets = xp.asarray(rng.integers(0, 40, 6))
    x = Tensor(xp.asarray(h), requires_grad=True)
    got = F.linear_cross_entropy(x, Tensor(xp.asarray(narrow)), targets, chunk_elements=60)
    got.backward()
    wide = Tensor(xp.asarray(narrow.astype(np.float32)))
    x_ref = Tensor(xp.asarray(h), requires_grad=True)
    expected = F.linear_cross_entropy(x_ref, wide, targets, chunk_elements=60)
    expected.backward()
    assert got.dtype == np.float32
    assert got.item() == expected.item()
    np.testing.assert_array_equal(to_numpy(x.grad), to_numpy(x_ref.grad))


# ---- norms and activations ---------------------------------------------------------------------
@gradcheck
@given(data=st.data())
def test_rms_norm(backend, data):
    shape = data.draw(S.shapes(1, 3, 5))
    x, w = data.draw(S.arrays(shape)), data.draw(S.arrays(shape[-1:]))
    eps = data.draw(st.sampled_from([1e-6, 1e-2]))
    requires = data.draw(requires_flags(2))
    check_gradients(lambda a, b: F.rms_norm(a, b, eps=eps), x, w, requires=requires, seed=data.draw(S.seeds))


@gradcheck
@given(data=st.data())
def test_layer_norm(backend, data):
    shape = data.draw(S.shapes(1, 3, 5))
    x = data.draw(S.arrays(shape))
    w, b = data.draw(S.arrays(shape[-1:])), data.draw(S.arrays(shape[-1:]))
    eps = data.draw(st.sampled_from([1e-5, 1e-2]))
    requires = data.draw(requires_flags(3))
    check_gradients(lambda *ts: F.layer_norm(*ts, eps=eps), x, w, b, requires=requires,
                    seed=data.draw(S.seeds))


@pytest.mark.parametrize("op", [F.silu, lambda t: F.gelu(t, approximate="tanh")], ids=["silu", "gelu_tanh"])
@gradcheck
@given(data=st.data())
def test_silu_and_gelu_tanh(backend, op, data):
    check_gradients(op, data.draw(S.arrays(data.draw(S.shapes()), -5.0, 5.0)), seed=data.draw(S.seeds))


@gradcheck
@given(data=st.data())
def test_swiglu_fused_matches_finite_differences_and_the_two_op_version(backend, data):
    shape = data.draw(S.shapes())
    gate, up = data.draw(S.arrays(shape, -5.0, 5.0)), data.draw(S.arrays(shape))
    requires = data.draw(requires_flags(2))
    check_gradients(F.swiglu, gate, up, requires=requires, seed=data.draw(S.seeds))
    fused = [Tensor(xp.asarray(a), requires_grad=True) for a in (gate, up)]
    plain = [Tensor(xp.asarray(a), requires_grad=True) for a in (gate, up)]
    g = xp.asarray(np.random.default_rng(0).standard_normal(shape))
    y_fused, y_plain = F.swiglu(*fused), F.silu(plain[0]) * plain[1]
    np.testing.assert_allclose(to_numpy(y_fused.data), to_numpy(y_plain.data), rtol=1e-12, atol=1e-12)
    y_fused.backward(g)
    y_plain.backward(g)
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(to_numpy(a.grad), to_numpy(b.grad), rtol=1e-12, atol=1e-12)


def _exact_gelu(x):
    """x * Phi(x) with the standard library's erf: the function GELU(approximate="none") means."""
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


@gradcheck
@given(data=st.data())
def test_gelu_exact(backend, data):
    """approximate="none": the backward is the derivative of x Phi(x), checked against finite
    differences of that exact function. The forward evaluates erf by Abramowitz & Stegun 7.1.26,
    whose error (< 1.5e-7) is checked separately: its derivative (~5e-7) would blur a finite-
    difference check of the forward itself."""
    x = data.draw(S.arrays(data.draw(S.shapes()), -5.0, 5.0))
    check_gradients(lambda t: F.gelu(t, approximate="none"), x, numeric_op=_exact_gelu,
                    seed=data.draw(S.seeds))
    y = to_numpy(F.gelu(Tensor(xp.asarray(x)), approximate="none").data)
    np.testing.assert_allclose(y, _exact_gelu(x), rtol=0, atol=0.5 * 1.5e-7 * max(1.0, np.abs(x).max()))


# ---- dropout -----------------------------------------------------------------------------------
@gradcheck
@given(data=st.data(), p=st.sampled_from([0.1, 0.5, 0.9]), seed=S.seeds)
def test_dropout_seeded_mask_and_gradient(backend, data, p, seed):
    x = data.draw(S.nonzero_arrays(data.draw(S.shapes(1, 3, 5))))
    scale = 1 / (1 - p)

    def drop(t):  # a fresh generator with the same seed each time: the same mask
        return F.dropout(t, p, xp.random.default_rng(seed))

    leaf = Tensor(xp.asarray(x), requires_grad=True)
    y = drop(leaf)
    again = to_numpy(drop(Tensor(xp.asarray(x))).data)
    np.testing.assert_array_equal(to_numpy(y.data), again)  # same seed -> same mask
    keep = to_numpy(y.data) != 0  # x has no zeros, so a zero output is a dropped element
    np.testing.assert_allclose(to_numpy(y.data), x * keep * scale, rtol=1e-15)
    g = np.random.default_rng(0).standard_normal(x.shape)
    y.backward(xp.asarray(g))
    np.testing.assert_allclose(to_numpy(leaf.grad), g * keep * scale, rtol=1e-15)
    check_gradients(drop, x, seed=seed)


def test_dropout_rate_and_off_switches(backend):
    x = Tensor(xp.ones((200_000,)), requires_grad=True)
    y = F.dropout(x, 0.3, xp.random.default_rng(0))
    kept = float(to_numpy(y.data != 0).mean())
    assert abs(kept - 0.7) < 0.01  # 0.01 is about 7 standard deviations of the kept fraction
    other = F.dropout(x, 0.3, xp.random.default_rng(1))
    assert not np.array_equal(to_numpy(y.data), to_numpy(other.data))  # another seed, another mask
    assert F.dropout(x, 0.3, xp.random.default_rng(0), training=False) is x
    assert F.dropout(x, 0.0, xp.random.default_rng(0)) is x


# ---- rotary embeddings and attention ---------------------------------------------------------
@gradcheck
@given(data=st.data())
def test_rope(backend, data):
    lead = data.draw(S.shapes(0, 2, 2))
    t, half = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))
    start = data.draw(st.integers(0, 50))  # positions after a prefix / KV cache
    theta = data.draw(st.sampled_from([10.0, 1e4]))
    cos, sin = F.rope_tables(xp.arange(start, start + t), 2 * half, theta=theta, dtype="float64")
    x = data.draw(S.arrays((*lead, t, 2 * half)))
    check_gradients(lambda a: F.rope(a, cos, sin), x, seed=data.draw(S.seeds))
    # a rotation: each pair (i, i + d/2) keeps its length
    y = to_numpy(F.rope(Tensor(xp.asarray(x)), cos, sin).data)
    pair_norms = y[..., :half] ** 2 + y[..., half:] ** 2
    np.testing.assert_allclose(pair_norms, x[..., :half] ** 2 + x[..., half:] ** 2, rtol=1e-12, atol=1e-12)


def naive_attention(q, k, v, causal, allowed):
    """Reference in NumPy: repeat each key/value head for its G query heads, mask, softmax."""
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    tq, tk = q.shape[2], k.shape[2]
    ok = np.ones((tq, tk), dtype=bool)
    if causal:
        ok = np.arange(tk)[None, :] <= np.arange(tq)[:, None] + (tk - tq)
    ok = ok if allowed is None else ok & allowed
    s = np.where(ok, s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ v


@gradcheck
@given(data=st.data(), causal=st.booleans(), mask_kind=st.sampled_from(["none", "padding", "full"]))
def test_scaled_dot_product_attention(backend, data, causal, mask_kind):
    b, hq, hkv, tq, tk, d = data.draw(S.attention_shapes())
    q = data.draw(S.arrays((b, hq, tq, d)))
    k, v = data.draw(S.arrays((b, hkv, tk, d))), data.draw(S.arrays((b, hkv, tk, d)))
    mask = allowed = None
    if mask_kind == "padding":  # key-padding mask (B, Tk); key 0 stays visible to every query
        mask = data.draw(S.bool_masks((b, tk)))
        mask[:, 0] = True
        allowed = mask[:, None, None, :]
    elif mask_kind == "full":  # one (Tq, Tk) mask per batch row
        mask = data.draw(S.bool_masks((b, tq, tk)))
        mask[:, :, 0] = True
        allowed = mask[:, None]
    mask_x = None if mask is None else xp.asarray(mask)

    def attend(*qkv):
        return F.scaled_dot_product_attention(*qkv, causal=causal, mask=mask_x)

    out = to_numpy(attend(*(Tensor(xp.asarray(a)) for a in (q, k, v))).data)
    np.testing.assert_allclose(out, naive_attention(q, k, v, causal, allowed), rtol=1e-12, atol=1e-12)
    check_gradients(attend, q, k, v, requires=data.draw(requires_flags(3)), seed=data.draw(S.seeds))


@pytest.mark.parametrize("groups", [1, 2], ids=["Hq=Hkv", "Hq=2Hkv"])
def test_attention_gqa_and_kv_offset_fixed_case(backend, groups):
    """A fixed case of each head layout with Tq < Tk (a KV cache) and a key-padding mask."""
    rng = np.random.default_rng(groups)
    q = rng.standard_normal((2, 2 * groups, 2, 3))
    k, v = rng.standard_normal((2, 2, 5, 3)), rng.standard_normal((2, 2, 5, 3))
    mask = np.array([[True, True, True, False, True], [True, False, True, True, True]])
    check_gradients(lambda *t: F.scaled_dot_product_attention(*t, mask=xp.asarray(mask)), q, k, v)
