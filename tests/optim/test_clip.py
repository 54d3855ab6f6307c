"""clip_grad_norm_: the global norm, scaling only above max_norm, non-finite norms."""

import math

import numpy as np
import pytest

from minift.backend import asarray, to_numpy
from minift.nn.module import Parameter
from minift.optim import clip_grad_norm_


def with_grads(*grads):
    params = []
    for g in grads:
        p = Parameter(asarray(np.zeros(np.shape(g))))
        p.grad = asarray(np.array(g, dtype=np.float64))
        params.append(p)
    return params


def test_returns_the_global_norm_over_all_gradients(backend):
    params = with_grads([3.0], [[0.0, 4.0], [12.0, 0.0]])  # sqrt(9 + 16 + 144) = 13
    norm = clip_grad_norm_(params, max_norm=100.0)
    assert type(norm) is float and norm == 13.0


def test_gradients_below_max_norm_are_untouched(backend):
    params = with_grads([3.0], [4.0])
    clip_grad_norm_(params, max_norm=5.1)
    assert [to_numpy(p.grad).tolist() for p in params] == [[3.0], [4.0]]


def test_gradients_above_max_norm_are_scaled_by_max_over_norm(backend):
    params = with_grads([3.0], [4.0])
    norm = clip_grad_norm_(params, max_norm=1.0)
    coef = 1.0 / (5.0 + 1e-6)
    assert norm == 5.0  # the norm *before* clipping
    assert [to_numpy(p.grad).tolist() for p in params] == [[3.0 * coef], [4.0 * coef]]
    assert math.hypot(*(to_numpy(p.grad)[0] for p in params)) == pytest.approx(1.0, rel=1e-6, abs=0)


def test_parameters_without_gradient_are_ignored(backend):
    params = with_grads([3.0], [4.0])
    params.append(Parameter(asarray([100.0])))
    assert clip_grad_norm_(params, max_norm=10.0) == 5.0
    assert params[-1].grad is None
    assert clip_grad_norm_([Parameter(asarray([1.0]))], max_norm=1.0) == 0.0


def test_infinite_max_norm_only_measures(backend):
    params = with_grads([3e10], [4e10])
    assert clip_grad_norm_(params, max_norm=math.inf) == 5e10
    assert to_numpy(params[0].grad).tolist() == [3e10]


def test_parameters_of_one_sum_are_each_scaled_once(backend):
    # y = a + b: Add hands both inputs the same gradient; each parameter must be scaled exactly once
    a, b = Parameter(asarray([3.0])), Parameter(asarray([0.0]))
    (a + b).sum().backward()
    norm = clip_grad_norm_([a, b], max_norm=0.5)
    coef = 0.5 / (norm + 1e-6)
    assert to_numpy(a.grad).tolist() == [coef] and to_numpy(b.grad).tolist() == [coef]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_norm(backend, bad):
    params = with_grads([1.0], [bad])
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    norm = clip_grad_norm_(params, 1.0)
    assert not math.isfinite(norm)
    assert to_numpy(params[0].grad).tolist() == [1.0]  # left for the caller to handle


def test_max_norm_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        clip_grad_norm_(with_grads([1.0]), 0.0)
