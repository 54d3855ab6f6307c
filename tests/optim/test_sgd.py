"""SGD against closed forms for a constant gradient."""

import numpy as np
import pytest

from minift.backend import asarray, to_numpy
from minift.nn.module import Parameter
from minift.optim import SGD


def run_sgd(w0, grad, n_steps, **hyper):
    p = Parameter(asarray(np.array(w0, dtype=np.float64)))
    opt = SGD([p], **hyper)
    for _ in range(n_steps):
        p.grad = asarray(np.array(grad, dtype=np.float64))
        opt.step()
    return to_numpy(p.data), opt, p


def test_plain_sgd_is_weight_minus_lr_times_grad(backend):
    got, opt, _ = run_sgd([1.0, -2.0], [0.5, 4.0], n_steps=3, lr=0.1)
    np.testing.assert_allclose(got, [1.0 - 3 * 0.05, -2.0 - 3 * 0.4], rtol=1e-15)
    assert opt.state == {}  # no momentum, no state


def test_momentum_buffer_starts_at_the_first_gradient(backend):
    _, opt, p = run_sgd([0.0], [2.0], n_steps=1, lr=0.1, momentum=0.9)
    assert to_numpy(opt.state[p]["momentum_buffer"]).tolist() == [2.0]
    assert to_numpy(p.data).tolist() == [-0.2]


@pytest.mark.parametrize("n_steps", [1, 2, 5])
def test_momentum_closed_form_for_a_constant_gradient(backend, n_steps):
    # b_k = g (1 + mu + ... + mu^(k-1)) = g (1 - mu^k) / (1 - mu);  p_n = p_0 - lr sum_k b_k
    lr, mu, g = 0.1, 0.9, 2.0
    got, _, _ = run_sgd([1.0], [g], n_steps, lr=lr, momentum=mu)
    expected = 1.0 - lr * sum(g * (1 - mu**k) / (1 - mu) for k in range(1, n_steps + 1))
    np.testing.assert_allclose(got, [expected], rtol=1e-14)


def test_nesterov_closed_form_for_a_constant_gradient(backend):
    # the step uses g + mu * b_k instead of b_k
    lr, mu, g, n = 0.1, 0.9, 2.0, 4
    got, _, _ = run_sgd([1.0], [g], n, lr=lr, momentum=mu, nesterov=True)
    expected = 1.0 - lr * sum(g + mu * g * (1 - mu**k) / (1 - mu) for k in range(1, n + 1))
    np.testing.assert_allclose(got, [expected], rtol=1e-14)


def test_weight_decay_is_added_to_the_gradient(backend):
    got, _, _ = run_sgd([2.0], [0.5], n_steps=1, lr=0.1, weight_decay=0.01)
    assert got.tolist() == [2.0 - 0.1 * (0.5 + 0.01 * 2.0)]


def test_momentum_buffer_does_not_alias_the_gradient(backend):
    # the same gradient array is kept for three steps; the buffer must be a copy of it
    p = Parameter(asarray([1.0]))
    p.grad = asarray([2.0])
    opt = SGD([p], lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.step()
    assert to_numpy(p.grad).tolist() == [2.0]
    np.testing.assert_allclose(to_numpy(p.data), [1.0 - 0.1 * (2.0 + 3.8 + 5.42)], rtol=1e-14)


@pytest.mark.parametrize("bad", [{"lr": -0.1}, {"lr": 0.1, "momentum": -0.5},
                                 {"lr": 0.1, "nesterov": True}, {"lr": 0.1, "weight_decay": -1.0}])
def test_rejects_invalid_hyperparameters(bad):
    with pytest.raises(ValueError):
        SGD([Parameter([1.0])], **bad)
