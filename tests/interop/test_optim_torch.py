"""minift.optim against torch.optim and transformers' schedules, step by step.

Everything runs in float64. The two implementations do the same arithmetic in slightly
different orders (torch updates ``m`` with ``lerp`` and the weights with a fused ``addcdiv``),
so weights agree to rounding: at most ~6e-15 relative after 20 steps when this was written.
The tolerance, 1e-12 relative, leaves room for that and nothing else: a wrong bias correction
or eps placement is off by 1e-4 or more. Learning rates must be bitwise equal: both libraries
compute ``initial_lr * lambda(t)`` with the same floating-point operations.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop extra not installed")
transformers_optimization = pytest.importorskip("transformers.optimization",
                                                reason="interop extra not installed")

from minift.nn.module import Parameter  # noqa: E402
from minift.optim import (  # noqa: E402
    SGD,
    AdamW,
    clip_grad_norm_,
    get_constant_schedule,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    warmup_steps_from_ratio,
)

pytestmark = pytest.mark.interop

RTOL = 1e-12
SHAPES = [(5, 3), (3,), (2, 2, 2)]
N_STEPS = 20


def twin_params(seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=s) for s in SHAPES]
    ours = [Parameter(a.copy()) for a in arrays]
    theirs = [torch.nn.Parameter(torch.tensor(a, dtype=torch.float64)) for a in arrays]
    return ours, theirs


def as_groups(params, group_options):
    """Split ``params`` into the groups of ``group_options`` ([(slice, options), ...]) or keep one list."""
    if group_options is None:
        return params
    return [{"params": params[sl], **options} for sl, options in group_options]


def run_both(make_ours, make_theirs, group_options=None, schedule=None):
    ours, theirs = twin_params()
    opt_ours = make_ours(as_groups(ours, group_options))
    opt_theirs = make_theirs(as_groups(theirs, group_options))
    scheds = schedule(opt_ours, opt_theirs) if schedule else None
    rng = np.random.default_rng(1)
    for step in range(N_STEPS):
        for p, q in zip(ours, theirs, strict=True):
            g = rng.normal(size=p.shape) * 10.0 ** rng.uniform(-3, 1)
            p.grad, q.grad = g.copy(), torch.tensor(g)
        opt_ours.step()
        opt_theirs.step()
        if scheds:
            scheds[0].step()
            scheds[1].step()
        for p, q in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=RTOL, atol=0,
                                       err_msg=f"step {step + 1}")


@pytest.mark.parametrize("options", [
    {"lr": 1e-2},                                       # torch's default weight decay 1e-2
    {"lr": 3e-3, "weight_decay": 0.0},
    {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True},
    {"lr": 5e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.3},
], ids=["default-wd", "no-wd", "amsgrad", "custom-betas"])
def test_adamw_matches_torch(options):
    run_both(lambda ps: AdamW(ps, **options), lambda ps: torch.optim.AdamW(ps, **options))


def test_adamw_two_param_groups_match_torch():
    groups = [(slice(0, 2), {"weight_decay": 0.1}), (slice(2, 3), {"lr": 3e-2, "weight_decay": 0.0})]
    run_both(lambda ps: AdamW(ps, lr=1e-2), lambda ps: torch.optim.AdamW(ps, lr=1e-2), groups)


def test_adamw_with_a_warmup_cosine_schedule_matches_torch_and_transformers():
    def schedules(ours, theirs):
        return (get_cosine_schedule_with_warmup(ours, 4, N_STEPS),
                transformers_optimization.get_cosine_schedule_with_warmup(theirs, 4, N_STEPS))

    groups = [(slice(0, 2), {}), (slice(2, 3), {"lr": 1e-1})]
    run_both(lambda ps: AdamW(ps, lr=3e-2), lambda ps: torch.optim.AdamW(ps, lr=3e-2), groups, schedules)


@pytest.mark.parametrize("options", [
    {"lr": 0.05},
    {"lr": 0.05, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
], ids=["plain", "momentum", "momentum-wd", "nesterov"])
def test_sgd_matches_torch(options):
    run_both(lambda ps: SGD(ps, **options), lambda ps: torch.optim.SGD(ps, **options))


def lr_run(make_schedule, n_steps, lrs=(3e-4, 1e-3)):
    """Per-group lrs used at each of ``n_steps`` steps, for one optimizer of either library."""
    schedule = make_schedule(lrs)
    sequence = []
    for _ in range(n_steps):
        sequence.append([g["lr"] for g in schedule.optimizer.param_groups])
        schedule.step()
    return np.array(sequence)


def ours_opt(lrs):
    return AdamW([{"params": [Parameter([1.0])], "lr": lr} for lr in lrs])


def torch_opt(lrs):
    return torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.ones(1))], "lr": lr} for lr in lrs])


T, W = 50, 7
SCHEDULES = {
    "constant": (get_constant_schedule, "get_constant_schedule", ()),
    "constant_with_warmup": (lambda o: get_constant_schedule_with_warmup(o, W),
                             "get_constant_schedule_with_warmup", (W,)),
    "linear": (lambda o: get_linear_schedule_with_warmup(o, W, T), "get_linear_schedule_with_warmup", (W, T)),
    "cosine": (lambda o: get_cosine_schedule_with_warmup(o, W, T), "get_cosine_schedule_with_warmup", (W, T)),
    "cosine-no-warmup": (lambda o: get_cosine_schedule_with_warmup(o, 0, T),
                         "get_cosine_schedule_with_warmup", (0, T)),
}


# only the schedule steps here, which torch warns about
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_matches_transformers_over_the_whole_run(name):
    ours, hf_name, args = SCHEDULES[name]
    hf = getattr(transformers_optimization, hf_name)
    expected = lr_run(lambda lrs: hf(torch_opt(lrs), *args), T + 5)
    got = lr_run(lambda lrs: ours(ours_opt(lrs)), T + 5)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("ratio, steps", [(0.05, 1000), (0.1, 25), (0.07, 100), (0.06, 333), (0.5, 3)])
def test_warmup_ratio_matches_training_arguments(tmp_path, ratio, steps):
    from transformers import TrainingArguments  # noqa: PLC0415 - slow import, only here

    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=ratio, report_to=[])
    assert warmup_steps_from_ratio(ratio, steps) == args.get_warmup_steps(steps)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-14), (np.float32, 1e-6)])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(dtype, rtol, max_norm):
    rng = np.random.default_rng(3)
    grads = [rng.normal(size=s).astype(dtype) for s in SHAPES]
    ours, theirs = [], []
    for g in grads:
        p, q = Parameter(np.zeros_like(g)), torch.nn.Parameter(torch.zeros_like(torch.from_numpy(g)))
        p.grad, q.grad = g.copy(), torch.from_numpy(g.copy())
        ours.append(p)
        theirs.append(q)
    norm = clip_grad_norm_(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert norm == pytest.approx(expected.item(), rel=rtol, abs=0)
    for p, q in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(p.grad, q.grad.numpy(), rtol=rtol, atol=0)
