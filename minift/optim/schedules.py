"""Learning-rate schedules: warm up, reach the peak, decay (lecture 000).

A constant learning rate is rarely best. At the start of fine-tuning the optimizer knows nothing
about the gradients' scale (Adam's moments are empty) and the first gradients on new data can
be large and erratic, so full-size steps risk damaging what pre-training learned: the rate
ramps up from 0 over a *warmup* (lecture 000: 5-10% of the steps). Later, smaller steps let the
weights settle into a minimum instead of bouncing around it: the rate *decays*, linearly or
along a half cosine (Loshchilov & Hutter 2017, SGDR), to 0 at the last step.

Every schedule here is a ``LambdaLR``: a multiplier ``lambda(t)`` of each group's starting lr,
where ``t`` counts the optimizer steps taken so far. Names, arguments and numbers match
``transformers.get_*_schedule_with_warmup`` exactly; the object behaves like
``torch.optim.lr_scheduler.LambdaLR``. Call ``scheduler.step()`` once after each
``optimizer.step()``.
"""

from __future__ import annotations

import math
from functools import partial

# ---- the multipliers ----------------------------------------------------------------------


def constant_lambda(step: int) -> float:
    """lambda(t) = 1."""
    return 1.0


def warmup_fraction(step: int, num_warmup_steps: int) -> float:
    """lambda(t) = t / W during the warmup: 0 at t = 0, approaching 1 at t = W."""
    return float(step) / float(max(1, num_warmup_steps))


def constant_with_warmup_lambda(step: int, *, num_warmup_steps: int) -> float:
    """lambda(t) = t / W for t < W, then 1."""
    if step < num_warmup_steps:
        return warmup_fraction(step, num_warmup_steps)
    return 1.0


def linear_with_warmup_lambda(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    """lambda(t) = t / W for t < W, then (T - t) / (T - W), floored at 0.

    1 at the end of the warmup, 0 at the last step ``t = T``.
    """
    if step < num_warmup_steps:
        return warmup_fraction(step, num_warmup_steps)
    remaining = float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, remaining)


def cosine_with_warmup_lambda(step: int, *, num_warmup_steps: int, num_training_steps: int,
                              num_cycles: float) -> float:
    """lambda(t) = t / W for t < W, then 0.5 * (1 + cos(2 pi c s)), floored at 0.

    ``s = (t - W) / (T - W)`` is the progress through the decay and ``c`` the number of cosine
    cycles; the default c = 0.5 is half a period, 1 -> 0, with 0.5 halfway through the decay.
    """
    if step < num_warmup_steps:
        return warmup_fraction(step, num_warmup_steps)
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(2.0 * math.pi * num_cycles * progress)))


# ---- the scheduler ------------------------------------------------------------------------


class LambdaLR:
    """Sets each group's ``lr = initial_lr * lambda(t)``, with torch's ``LambdaLR`` semantics.

    On construction every param group gets ``initial_lr`` (its current ``lr``, unless a key is
    already there) and the scheduler makes its first step, ``t = 0``: the lr becomes
    ``initial_lr * lambda(0)`` — 0 when there is a warmup, so the very first optimizer step
    moves only Adam's moments. Each ``step()`` then advances ``t`` by one. ``last_epoch`` is
    torch's name for ``t``; it counts calls to ``step()``, not epochs.

    ``lr_lambda`` is one function for all groups or a list with one per group. The functions
    are not part of ``state_dict()``: rebuild the scheduler the same way, then load the state.
    """

    def __init__(self, optimizer, lr_lambda):
        groups = optimizer.param_groups
        lambdas = list(lr_lambda) if isinstance(lr_lambda, (list, tuple)) else [lr_lambda] * len(groups)
        if len(lambdas) != len(groups):
            raise ValueError(f"LambdaLR: {len(lambdas)} lr_lambdas for {len(groups)} parameter groups")
        self.optimizer, self.lr_lambdas = optimizer, lambdas
        for group in groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in groups]
        self.last_epoch = -1
        self.step()

    def step(self) -> None:
        """Advance ``t`` and write ``base_lr * lambda(t)`` into every group's ``lr``."""
        self.last_epoch += 1
        groups = self.optimizer.param_groups
        for group, base_lr, lr_lambda in zip(groups, self.base_lrs, self.lr_lambdas, strict=True):
            group["lr"] = base_lr * lr_lambda(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        """The lr of each group as set by the latest ``step()``."""
        return list(self._last_lr)

    def state_dict(self) -> dict:
        """``t``, the peak lr of each group and the lrs last set (plain numbers)."""
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs),
                "last_lr": list(self._last_lr)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore ``t`` and the base lrs. Group lrs come back with ``optimizer.load_state_dict``."""
        if len(state_dict["base_lrs"]) != len(self.base_lrs):
            raise ValueError(f"the snapshot schedules {len(state_dict['base_lrs'])} parameter groups, "
                             f"this optimizer has {len(self.base_lrs)}")
        self.last_epoch = state_dict["last_epoch"]
        self.base_lrs = list(state_dict["base_lrs"])
        self._last_lr = list(state_dict["last_lr"])


# ---- the schedules by name ----------------------------------------------------------------


def _check_steps(num_warmup_steps: int, num_training_steps: int | None = None) -> None:
    if num_warmup_steps < 0:
        raise ValueError(f"num_warmup_steps must be >= 0, got {num_warmup_steps}")
    if num_training_steps is None:
        return
    if num_training_steps <= 0:
        raise ValueError(f"num_training_steps must be positive, got {num_training_steps}")
    if num_warmup_steps > num_training_steps:
        raise ValueError(f"the warmup ({num_warmup_steps} steps) is longer than the whole run "
                         f"({num_training_steps} steps): the decay would never start")


def get_constant_schedule(optimizer) -> LambdaLR:
    """The optimizer's lr, unchanged."""
    return LambdaLR(optimizer, constant_lambda)


def get_constant_schedule_with_warmup(optimizer, num_warmup_steps: int) -> LambdaLR:
    """0 -> lr linearly over ``num_warmup_steps``, then constant."""
    _check_steps(num_warmup_steps)
    return LambdaLR(optimizer, partial(constant_with_warmup_lambda, num_warmup_steps=num_warmup_steps))


def get_linear_schedule_with_warmup(optimizer, num_warmup_steps: int, num_training_steps: int) -> LambdaLR:
    """0 -> lr over the warmup, then lr -> 0 in a straight line at ``num_training_steps``."""
    _check_steps(num_warmup_steps, num_training_steps)
    return LambdaLR(optimizer, partial(linear_with_warmup_lambda, num_warmup_steps=num_warmup_steps,
                                       num_training_steps=num_training_steps))


def get_cosine_schedule_with_warmup(optimizer, num_warmup_steps: int, num_training_steps: int,
                                    num_cycles: float = 0.5) -> LambdaLR:
    """0 -> lr over the warmup, then lr -> 0 along a half cosine (``num_cycles=0.5``).

    The cosine spends longer near the peak and near the end than a straight line does.
    """
    _check_steps(num_warmup_steps, num_training_steps)
    return LambdaLR(optimizer, partial(cosine_with_warmup_lambda, num_warmup_steps=num_warmup_steps,
                                       num_training_steps=num_training_steps, num_cycles=num_cycles))


def warmup_steps_from_ratio(warmup_ratio: float, num_training_steps: int) -> int:
    """``ceil(warmup_ratio * num_training_steps)``, as ``transformers.TrainingArguments`` does.

    The product is taken in floating point, so a ratio with no exact binary form can land just
    above an integer and round up: 0.07 * 100 = 7.000000000000001 gives 8 warmup steps, as in
    transformers.
    """
    if not 0 <= warmup_ratio <= 1:
        raise ValueError(f"warmup_ratio must lie in [0, 1], got {warmup_ratio}")
    return math.ceil(num_training_steps * warmup_ratio)


SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def get_scheduler(name: str, optimizer, num_warmup_steps: int | None = None,
                  num_training_steps: int | None = None, warmup_ratio: float | None = None) -> LambdaLR:
    """The schedule called ``name`` (one of ``SCHEDULES``), like ``transformers.get_scheduler``.

    The warmup length is ``num_warmup_steps`` when given, else ``warmup_ratio`` of
    ``num_training_steps`` (an explicit step count wins, as in transformers). ``"constant"``
    has no warmup and ignores both.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    if name == "constant":
        return get_constant_schedule(optimizer)
    if num_warmup_steps is None:
        if warmup_ratio is None:
            raise ValueError(f"the {name!r} schedule needs num_warmup_steps or warmup_ratio")
        if num_training_steps is None:
            raise ValueError("warmup_ratio needs num_training_steps to turn into a number of steps")
        num_warmup_steps = warmup_steps_from_ratio(warmup_ratio, num_training_steps)
    if name == "constant_with_warmup":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps)
    if num_training_steps is None:
        raise ValueError(f"the {name!r} schedule needs num_training_steps")
    make = get_linear_schedule_with_warmup if name == "linear" else get_cosine_schedule_with_warmup
    return make(optimizer, num_warmup_steps, num_training_steps)
