"""Learning-rate schedules against their closed forms (lecture 000: warmup, peak, decay)."""

import math

import pytest

from minift.nn.module import Parameter
from minift.optim import (
    SGD,
    LambdaLR,
    get_constant_schedule,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    get_scheduler,
    warmup_steps_from_ratio,
)

PEAK = 2e-4


def optimizer(lrs=(PEAK,)):
    return SGD([{"params": [Parameter([1.0])], "lr": lr} for lr in lrs], lr=PEAK)


def lr_sequence(sched, n_steps):
    """lr used by optimizer steps 0 .. n_steps-1 (the lr in force before each sched.step())."""
    lrs = []
    for _ in range(n_steps):
        lrs.append(sched.optimizer.param_groups[0]["lr"])
        sched.step()
    return lrs


def test_constant():
    assert lr_sequence(get_constant_schedule(optimizer()), 5) == [PEAK] * 5


def test_constant_with_warmup():
    lrs = lr_sequence(get_constant_schedule_with_warmup(optimizer(), num_warmup_steps=4), 8)
    assert lrs == [0.0, PEAK * 0.25, PEAK * 0.5, PEAK * 0.75] + [PEAK] * 4


def test_linear_with_warmup():
    lrs = lr_sequence(get_linear_schedule_with_warmup(optimizer(), 10, 110), 120)
    assert lrs[0] == 0.0  # warmup starts at 0
    assert lrs[5] == PEAK * 0.5
    assert lrs[10] == PEAK  # peak at the end of warmup
    assert lrs[60] == PEAK * 0.5
    assert lrs[110] == 0.0 and lrs[119] == 0.0  # 0 at the last step, and stays there
    assert all(a > b for a, b in zip(lrs[10:109], lrs[11:110], strict=True))


def test_cosine_with_warmup():
    lrs = lr_sequence(get_cosine_schedule_with_warmup(optimizer(), 10, 110), 111)
    assert lrs[0] == 0.0 and lrs[10] == PEAK
    assert lrs[60] == pytest.approx(0.5 * PEAK, rel=1e-15, abs=0)  # halfway through the decay
    assert lrs[35] == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-15, abs=0)
    assert lrs[110] == 0.0


def test_cosine_full_cycle_returns_to_the_peak():
    lrs = lr_sequence(get_cosine_schedule_with_warmup(optimizer(), 0, 100, num_cycles=1.0), 101)
    assert lrs[0] == PEAK and lrs[50] == 0.0 and lrs[100] == pytest.approx(PEAK, rel=1e-15, abs=0)


def test_no_warmup_starts_at_the_peak():
    assert lr_sequence(get_linear_schedule_with_warmup(optimizer(), 0, 4), 5) == [
        PEAK, PEAK * 0.75, PEAK * 0.5, PEAK * 0.25, 0.0]


def test_each_group_is_scaled_from_its_own_initial_lr():
    opt = optimizer(lrs=(1.0, 10.0))
    sched = get_linear_schedule_with_warmup(opt, 2, 10)
    assert [g["initial_lr"] for g in opt.param_groups] == [1.0, 10.0]
    sched.step()
    assert sched.get_last_lr() == [0.5, 5.0] == [g["lr"] for g in opt.param_groups]


def test_lambdalr_semantics():
    opt = optimizer(lrs=(1.0, 2.0))
    opt.param_groups[1]["initial_lr"] = 4.0  # an existing initial_lr is kept (setdefault)
    sched = LambdaLR(opt, [lambda t: t + 1, lambda t: 0.5**t])
    assert sched.last_epoch == 0 and sched.get_last_lr() == [1.0, 4.0]  # lambda(0) applied at once
    sched.step()
    assert sched.last_epoch == 1 and sched.get_last_lr() == [2.0, 2.0]
    with pytest.raises(ValueError, match="2 parameter groups"):
        LambdaLR(opt, [lambda t: 1.0])


def test_state_dict_round_trip_continues_the_schedule():
    sched = get_cosine_schedule_with_warmup(optimizer(), 3, 20)
    lr_sequence(sched, 7)
    opt_sd, sched_sd = sched.optimizer.state_dict(), sched.state_dict()
    rest = lr_sequence(sched, 13)
    fresh = get_cosine_schedule_with_warmup(optimizer(), 3, 20)
    fresh.optimizer.load_state_dict(opt_sd)
    fresh.load_state_dict(sched_sd)
    assert fresh.last_epoch == 7
    assert lr_sequence(fresh, 13) == rest


@pytest.mark.parametrize("ratio, steps, expected", [
    (0.05, 1000, 50), (0.1, 25, 3), (0.06, 10, 1), (0.0, 100, 0), (1.0, 7, 7),
    (0.07, 100, 8),  # 0.07 * 100 = 7.000000000000001 in floating point: rounds up, like transformers
])
def test_warmup_steps_from_ratio(ratio, steps, expected):
    assert warmup_steps_from_ratio(ratio, steps) == expected


def test_get_scheduler_by_name():
    assert lr_sequence(get_scheduler("linear", optimizer(), num_training_steps=20, warmup_ratio=0.1), 3) == [
        0.0, PEAK / 2, PEAK]
    explicit_wins = get_scheduler("cosine", optimizer(), num_warmup_steps=4, num_training_steps=20,
                                  warmup_ratio=0.5)
    assert lr_sequence(explicit_wins, 5)[4] == PEAK
    assert lr_sequence(get_scheduler("constant_with_warmup", optimizer(), num_warmup_steps=2), 3) == [
        0.0, PEAK / 2, PEAK]
    assert lr_sequence(get_scheduler("constant", optimizer(), warmup_ratio=0.5, num_training_steps=4), 2) == [
        PEAK, PEAK]


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "exponential", "num_warmup_steps": 0, "num_training_steps": 5}, "unknown schedule"),
    ({"name": "linear", "num_training_steps": 5}, "num_warmup_steps or warmup_ratio"),
    ({"name": "linear", "num_warmup_steps": 2}, "needs num_training_steps"),
    ({"name": "cosine", "warmup_ratio": 0.1}, "warmup_ratio needs num_training_steps"),
    ({"name": "linear", "num_warmup_steps": 6, "num_training_steps": 5}, "longer than the whole run"),
    ({"name": "linear", "num_warmup_steps": -1, "num_training_steps": 5}, ">= 0"),
    ({"name": "cosine", "num_warmup_steps": 0, "num_training_steps": 0}, "positive"),
    ({"name": "linear", "warmup_ratio": 1.5, "num_training_steps": 5}, r"\[0, 1\]"),
])
def test_get_scheduler_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_scheduler(optimizer=optimizer(), **kwargs)
