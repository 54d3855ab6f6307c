"""Optimizers, gradient clipping and learning-rate schedules (lecture 000).

One training step, after ``loss.backward()``::

    clip_grad_norm_(params, 1.0)     # cap the gradient's length          (clip.py)
    optimizer.step()                 # AdamW moves the weights            (adamw.py; adamw8bit.py
                                     #   keeps its moments in 8 bits)
    scheduler.step()                 # next lr: warmup, then decay        (schedules.py)
    optimizer.zero_grad()            # gradients accumulate until cleared (optimizer.py)

Read ``optimizer.py`` first (groups, state, snapshots), then ``sgd.py``, then ``adamw.py``, then
``adamw8bit.py``.
"""

from minift.optim.adamw import AdamW
from minift.optim.adamw8bit import AdamW8bit, state_nbytes_8bit
from minift.optim.clip import clip_grad_norm_
from minift.optim.grouping import NO_DECAY, weight_decay_groups
from minift.optim.optimizer import Optimizer
from minift.optim.schedules import (
    SCHEDULES,
    LambdaLR,
    get_constant_schedule,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    get_scheduler,
    warmup_steps_from_ratio,
)
from minift.optim.sgd import SGD

__all__ = [
    "NO_DECAY",
    "SCHEDULES",
    "SGD",
    "AdamW",
    "AdamW8bit",
    "LambdaLR",
    "Optimizer",
    "clip_grad_norm_",
    "get_constant_schedule",
    "get_constant_schedule_with_warmup",
    "get_cosine_schedule_with_warmup",
    "get_linear_schedule_with_warmup",
    "get_scheduler",
    "state_nbytes_8bit",
    "warmup_steps_from_ratio",
    "weight_decay_groups",
]
