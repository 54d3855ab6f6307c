"""AdamW against its equations: closed forms, a plain-Python reference loop, memory, in-place."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from strategies import adamw_hyperparams, gradient_sequences

from minift.backend import asarray, to_numpy
from minift.nn.module import Parameter
from minift.optim import AdamW

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)


def adamw_reference(weights, grads, *, lr, betas, eps, weight_decay, amsgrad=False):
    """The AdamW equations, one float at a time, written from the paper's pseudo-code."""
    beta1, beta2 = betas
    p = [float(x) for x in np.ravel(weights)]
    m, v, v_max = [0.0] * len(p), [0.0] * len(p), [0.0] * len(p)
    for t, grad in enumerate(grads, start=1):
        for i, g in enumerate(float(x) for x in np.ravel(grad)):
            p[i] = p[i] - lr * weight_decay * p[i]
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            v_max[i] = max(v_max[i], v[i])
            m_hat = m[i] / (1 - beta1**t)
            v_hat = (v_max[i] if amsgrad else v[i]) / (1 - beta2**t)
            p[i] = p[i] - lr * m_hat / (math.sqrt(v_hat) + eps)
    return np.array(p).reshape(np.shape(weights))


def run_adamw(weights, grads, **hyper):
    p = Parameter(asarray(weights).copy())  # the update is in place: keep the caller's array
    opt = AdamW([p], **hyper)
    for g in grads:
        p.grad = asarray(g)
        opt.step()
    return to_numpy(p.data), opt


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-14), (np.float32, 2e-7)])
def test_first_step_moves_each_weight_by_lr_times_sign_of_grad_plus_decay(backend, dtype, rtol):
    # step 1: m_hat = g and v_hat = g^2, so the update is lr * g / (|g| + eps)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 5)).astype(dtype)
    g = (rng.normal(size=(4, 5)) * 10.0 ** rng.integers(-3, 3, size=(4, 5))).astype(dtype)
    lr, wd, eps = 1e-3, 0.1, 1e-8
    got, _ = run_adamw(w, [g], lr=lr, weight_decay=wd, eps=eps)
    w64, g64 = w.astype(np.float64), g.astype(np.float64)
    expected = w64 * (1 - lr * wd) - lr * g64 / (np.abs(g64) + eps)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=0)


@fixture_ok
@given(hyper=adamw_hyperparams(), run=gradient_sequences())
def test_matches_reference_loop(backend, hyper, run):
    weights, grads = run
    got, _ = run_adamw(weights, grads, **hyper)
    expected = adamw_reference(weights, grads, **hyper)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


@fixture_ok
@given(hyper=adamw_hyperparams(), run=gradient_sequences(max_steps=8))
def test_amsgrad_matches_reference_loop(backend, hyper, run):
    weights, grads = run
    got, _ = run_adamw(weights, grads, amsgrad=True, **hyper)
    expected = adamw_reference(weights, grads, amsgrad=True, **hyper)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_amsgrad_differs_from_adam_when_gradients_shrink(backend):
    # a big gradient then small ones: amsgrad remembers the big v and takes smaller steps
    grads = [np.array([10.0]), np.array([0.1]), np.array([0.1]), np.array([0.1])]
    plain, _ = run_adamw(np.array([0.0]), grads, lr=0.1, weight_decay=0.0)
    ams, _ = run_adamw(np.array([0.0]), grads, lr=0.1, weight_decay=0.0, amsgrad=True)
    assert abs(ams[0]) < abs(plain[0])


def test_decay_is_decoupled_a_zero_gradient_only_shrinks_the_weights(backend):
    # with g = 0 the Adam part is exactly 0 / (0 + eps) = 0; only p *= (1 - lr*wd) remains
    w = np.array([1.5, -2.0, 0.25])
    got, _ = run_adamw(w, [np.zeros(3)] * 5, lr=0.01, weight_decay=0.1)
    expected = w.copy()
    for _ in range(5):
        expected *= 1 - 0.01 * 0.1
    assert np.array_equal(got, expected)


def test_update_size_does_not_depend_on_gradient_scale(backend):
    # m_hat / sqrt(v_hat) is unchanged when every gradient is multiplied by c > 0 (eps = 0)
    rng = np.random.default_rng(1)
    w, grads = rng.normal(size=6), [rng.normal(size=6) for _ in range(4)]
    small, _ = run_adamw(w, grads, lr=1e-2, eps=0.0, weight_decay=0.0)
    large, _ = run_adamw(w, [g * 1e4 for g in grads], lr=1e-2, eps=0.0, weight_decay=0.0)
    np.testing.assert_allclose(large, small, rtol=1e-13, atol=0)


def test_step_counter_is_per_parameter(backend):
    # b gets its first gradient on step 3: its bias correction is that of a first step
    a, b = Parameter(asarray([1.0])), Parameter(asarray([1.0]))
    opt = AdamW([a, b], lr=0.1, weight_decay=0.0)
    for _ in range(2):
        a.grad = asarray([0.5])
        opt.step()
    a.grad, b.grad = asarray([0.5]), asarray([0.5])
    opt.step()
    assert opt.state[a]["step"] == 3 and opt.state[b]["step"] == 1
    np.testing.assert_allclose(to_numpy(b.data), [1.0 - 0.1 * 0.5 / (0.5 + 1e-8)], rtol=1e-15)


def test_update_is_in_place_and_builds_no_graph(backend):
    p = Parameter(asarray([1.0, 2.0]))
    array = p.data
    p.grad = asarray([1.0, -1.0])
    AdamW([p]).step()
    assert p.data is array and p.is_leaf


@pytest.mark.parametrize("amsgrad, bytes_per_param", [(False, 8), (True, 12)])
def test_state_memory_is_two_fp32_moments_per_trained_parameter(backend, amsgrad, bytes_per_param):
    # lecture 003: m and v are 8 bytes/param in fp32; + a 4-byte fp32 master copy = ~12 bytes
    trained = Parameter(asarray(np.ones((10, 3), np.float32)))
    frozen = Parameter(asarray(np.ones((100, 3), np.float32)), requires_grad=False)
    opt = AdamW([trained, frozen], amsgrad=amsgrad)
    trained.grad = asarray(np.ones((10, 3), np.float32))
    opt.step()
    assert opt.state_nbytes() == bytes_per_param * trained.size
    assert all(v.dtype == np.float32 for k, v in opt.state[trained].items() if k != "step")


@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"eps": -1e-8}, {"weight_decay": -0.1},
                                 {"betas": (1.0, 0.999)}, {"betas": (0.9, -0.1)}])
def test_rejects_invalid_hyperparameters(bad):
    with pytest.raises(ValueError):
        AdamW([Parameter([1.0])], **bad)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_the_update_over_row_blocks_is_the_plain_equations_to_the_bit(monkeypatch, amsgrad):
    """``AdamW._update`` runs ``adamw_arithmetic`` over row blocks on threads with one scratch
    array; five float32 steps on shapes that split (forced: any size, 3 threads), do not split
    (a scalar, one row) and split unevenly must equal the equations written with temporaries."""
    from minift.autograd import parallel

    monkeypatch.setattr(parallel, "MIN_ELEMENTS_PER_THREAD", 1)
    monkeypatch.setattr(parallel, "blas_threads", lambda: 3)
    blocks = []
    plain_row_blocks = parallel.row_blocks
    monkeypatch.setattr(parallel, "row_blocks", lambda *a: blocks.append(plain_row_blocks(*a)) or blocks[-1])
    rng = np.random.default_rng(3)
    hyper = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    for shape in [(7, 5), (), (1, 6), (4, 3, 2)]:
        w = rng.normal(size=shape).astype(np.float32)
        grads = [rng.normal(size=shape).astype(np.float32) for _ in range(5)]
        got, _ = run_adamw(w, grads, amsgrad=amsgrad, **hyper)
        expected, m, v, v_max = w.copy(), np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)
        for t, g in enumerate(grads, start=1):  # the equations as AdamW's docstring writes them
            expected = expected * np.float32(1 - hyper["lr"] * hyper["weight_decay"])
            m = np.float32(0.9) * m + np.float32(1 - 0.9) * g
            v = np.float32(0.99) * v + np.float32(1 - 0.99) * (g * g)
            v_max = np.maximum(v_max, v)
            denom = np.sqrt(v_max if amsgrad else v) / np.float32(math.sqrt(1 - 0.99**t)) + np.float32(1e-8)
            expected = expected - np.float32(hyper["lr"] / (1 - 0.9**t)) * (m / denom)
        assert got.tobytes() == expected.astype(np.float32).tobytes(), shape
    assert any(len(b) == 3 for b in blocks)  # (7, 5) and (4, 3, 2) were cut into three row blocks
