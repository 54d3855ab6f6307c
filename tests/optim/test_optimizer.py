"""The Optimizer base: groups, frozen parameters, zero_grad, and exact resume from a state_dict."""

import json

import numpy as np
import pytest

from minift.autograd import Tensor
from minift.backend import asarray, to_numpy
from minift.nn.module import Parameter
from minift.optim import SGD, AdamW, get_cosine_schedule_with_warmup


def make_params(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [Parameter(asarray(rng.normal(size=shape).astype(dtype))) for shape in [(3, 4), (4,), (2, 2)]]


def random_grads(params, rng):
    return [rng.normal(size=p.shape).astype(p.dtype) for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else asarray(g.copy())


# ---- groups ---------------------------------------------------------------------------------
def test_plain_list_makes_one_group_with_the_defaults(backend):
    params = make_params()
    opt = AdamW(params, lr=0.5, weight_decay=0.0)
    (group,) = opt.param_groups
    assert group["params"] == params
    assert {k: group[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad")} == {
        "lr": 0.5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}


def test_groups_override_defaults_and_use_their_own_lr(backend):
    a, b = Parameter(asarray([0.0])), Parameter(asarray([0.0]))
    opt = SGD([{"params": [a]}, {"params": b, "lr": 0.5}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    a.grad, b.grad = asarray([1.0]), asarray([1.0])
    opt.step()
    assert to_numpy(a.data).tolist() == [-0.1] and to_numpy(b.data).tolist() == [-0.5]


def test_rejects_bad_parameter_lists():
    p = Parameter([1.0])
    with pytest.raises(TypeError, match="single Tensor"):
        SGD(p, lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        SGD([], lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(ValueError, match="nothing to optimize"):
        SGD([{"params": []}], lr=0.1)
    with pytest.raises(TypeError, match="only update Tensors"):
        SGD([np.ones(3)], lr=0.1)


# ---- what step() skips ------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda ps: AdamW(ps, lr=0.1), lambda ps: SGD(ps, lr=0.1, momentum=0.9)])
def test_frozen_parameter_gets_no_state_and_stays_bitwise_unchanged(backend, make):
    trained = Parameter(asarray([1.0, 2.0]))
    frozen = Parameter(asarray([3.0, 4.0]), requires_grad=False)
    before = to_numpy(frozen.data).copy()
    opt = make([trained, frozen])
    for _ in range(3):
        trained.grad = asarray([0.5, -0.5])
        frozen.grad = asarray([0.5, -0.5])  # even a stray gradient must not move a frozen weight
        opt.step()
    assert frozen not in opt.state and trained in opt.state
    assert to_numpy(frozen.data).tobytes() == before.tobytes()


def test_parameter_without_gradient_is_skipped(backend):
    used, unused = Parameter(asarray([1.0])), Parameter(asarray([1.0]))
    opt = AdamW([used, unused], lr=0.1, weight_decay=0.5)
    used.grad = asarray([1.0])
    opt.step()
    assert unused not in opt.state
    assert to_numpy(unused.data).tolist() == [1.0]  # not even weight decay touches it


def test_zero_grad_clears_every_gradient(backend):
    params = make_params()
    opt = SGD(params, lr=0.1)
    set_grads(params, random_grads(params, np.random.default_rng(0)))
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_gradients_accumulate_until_zero_grad(backend):
    # the classic bug: two backward passes without zero_grad add their gradients
    w = Parameter(asarray([1.0, 2.0]))
    opt = SGD([w], lr=0.1)
    for _ in range(2):
        (w * Tensor(asarray([3.0, 3.0]))).sum().backward()
    assert to_numpy(w.grad).tolist() == [6.0, 6.0]
    opt.zero_grad()
    (w * Tensor(asarray([3.0, 3.0]))).sum().backward()
    assert to_numpy(w.grad).tolist() == [3.0, 3.0]


# ---- state_dict ---------------------------------------------------------------------------------
def build(params):
    """AdamW with two groups (one amsgrad) over three parameters plus a cosine schedule."""
    opt = AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 3e-2, "amsgrad": True}],
                lr=1e-2, weight_decay=0.1)
    return opt, get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=12)


def run(params, opt, sched, grads):
    history = []
    for step_grads in grads:
        set_grads(params, step_grads)
        opt.step()
        sched.step()
        history.append([to_numpy(p.data).copy() for p in params])
    return history


def test_state_dict_format_refers_to_parameters_by_position(backend):
    params = make_params()
    opt, _ = build(params)
    set_grads(params, [np.ones(params[0].shape, np.float32), None, np.ones((2, 2), np.float32)])
    opt.step()
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 2]  # parameter 1 had no gradient: no state
    assert set(sd["state"][2]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2]]
    # the schedule is in its warmup, where lambda(0) = 0; the peak is kept as initial_lr
    assert sd["param_groups"][1]["lr"] == 0.0 and sd["param_groups"][1]["initial_lr"] == 3e-2


def test_state_dict_is_a_snapshot(backend):
    params = make_params()
    opt, _ = build(params)
    set_grads(params, random_grads(params, np.random.default_rng(0)))
    opt.step()
    sd = opt.state_dict()
    saved = to_numpy(sd["state"][0]["exp_avg"]).copy()
    set_grads(params, random_grads(params, np.random.default_rng(1)))
    opt.step()
    assert np.array_equal(to_numpy(sd["state"][0]["exp_avg"]), saved)


@pytest.mark.parametrize("through_json", [False, True])
def test_resume_from_state_dict_gives_bitwise_identical_updates(backend, through_json):
    rng = np.random.default_rng(7)
    params = make_params()
    grads = [random_grads(params, rng) for _ in range(10)]
    grads[3][1] = None  # a step where one parameter gets no gradient
    opt, sched = build(params)
    run(params, opt, sched, grads[:5])
    weights = [to_numpy(p.data).copy() for p in params]
    opt_sd, sched_sd = opt.state_dict(), sched.state_dict()
    straight = run(params, opt, sched, grads[5:])

    if through_json:  # what a checkpoint does: keys become strings, tuples become lists
        opt_sd = {"state": {str(k): v for k, v in opt_sd["state"].items()},
                  "param_groups": json.loads(json.dumps(opt_sd["param_groups"]))}
        sched_sd = json.loads(json.dumps(sched_sd))
    fresh = [Parameter(asarray(w.copy())) for w in weights]
    opt2, sched2 = build(fresh)
    opt2.load_state_dict(opt_sd)
    sched2.load_state_dict(sched_sd)
    resumed = run(fresh, opt2, sched2, grads[5:])
    for a, b in zip(straight, resumed, strict=True):
        assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))


def test_loaded_state_lives_in_the_parameter_dtype_and_is_not_aliased(backend):
    params = make_params()
    opt, _ = build(params)
    set_grads(params, random_grads(params, np.random.default_rng(0)))
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = to_numpy(sd["state"][0]["exp_avg"]).astype(np.float64)
    opt.load_state_dict(sd)
    assert opt.state[params[0]]["exp_avg"].dtype == np.float32
    assert opt.state[params[2]]["exp_avg_sq"] is not sd["state"][2]["exp_avg_sq"]


def test_load_state_dict_rejects_a_different_model(backend):
    params = make_params()
    opt, _ = build(params)
    set_grads(params, random_grads(params, np.random.default_rng(0)))
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="groups"):
        AdamW(make_params()).load_state_dict(sd)
    with pytest.raises(ValueError, match="parameter group 1"):
        build(make_params() + [Parameter(asarray([1.0]))])[0].load_state_dict(sd)

    other = [Parameter(asarray(np.ones(s, np.float32))) for s in [(3, 5), (4,), (2, 2)]]
    opt_other, _ = build(other)
    set_grads(other, random_grads(other, np.random.default_rng(1)))
    opt_other.step()
    before = opt_other.state_dict()
    with pytest.raises(ValueError, match="shape"):
        opt_other.load_state_dict(sd)
    after = opt_other.state_dict()  # a failed load changes nothing
    assert after["param_groups"] == before["param_groups"] and sorted(after["state"]) == [0, 1, 2]
    assert np.array_equal(to_numpy(after["state"][0]["exp_avg"]), to_numpy(before["state"][0]["exp_avg"]))

    sd["state"][5] = sd["state"][0]
    with pytest.raises(ValueError, match="parameter 5"):
        opt.load_state_dict(sd)
