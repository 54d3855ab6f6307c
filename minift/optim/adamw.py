"""AdamW: Adam's per-parameter step sizes plus weight decay kept apart from the gradient.

Lecture 000 names AdamW the default optimizer for fine-tuning LLMs: momentum, a step size
adapted to each parameter, and weight decay as a regularizer. Adam is Kingma & Ba (2015);
the "W" — decoupled weight decay — is Loshchilov & Hutter (2019).
"""

from __future__ import annotations

import functools
import math

from minift.autograd import Tensor
from minift.autograd.parallel import over_row_blocks
from minift.backend import xp
from minift.optim.optimizer import Optimizer


class AdamW(Optimizer):
    """AdamW with the exact semantics of ``torch.optim.AdamW``.

    For each parameter ``p`` with gradient ``g``, at its step ``t = 1, 2, ...``::

        p     = p - lr * wd * p                       (decoupled weight decay, applied first)
        m     = beta1 * m + (1 - beta1) * g           (first moment: momentum)
        v     = beta2 * v + (1 - beta2) * g**2        (second moment: gradient scale)
        m_hat = m / (1 - beta1**t)                    (bias corrections: m and v start at 0,
        v_hat = v / (1 - beta2**t)                     so early averages are too small)
        p     = p - lr * m_hat / (sqrt(v_hat) + eps)

    ``eps`` is added *after* the bias correction, to ``sqrt(v_hat)``. With ``amsgrad`` the
    denominator uses the running maximum of ``v`` instead of ``v`` (Reddi et al. 2018), which
    can only make steps smaller.

    ``m_hat / sqrt(v_hat)`` does not depend on the scale of the gradient: each parameter
    typically moves by about ``lr`` or less per step, whether its gradients are 1e-6 or 1e3 —
    on step 1 by exactly ``lr * g / (|g| + eps)``, i.e. ``lr`` times the sign of ``g``. That is
    the "adaptive learning rate" of lecture 000.

    Why decay is decoupled: Adam with an L2 penalty adds ``wd * p`` to ``g``, and the penalty
    then gets divided by ``sqrt(v_hat)`` like the rest of the gradient — parameters with large
    gradients are barely regularized. Loshchilov & Hutter (2019) shrink the weights directly,
    by the factor ``1 - lr * wd`` each step, outside the adaptive machinery. Every weight then
    decays at the same relative rate, and the paper finds that good values of ``wd`` and ``lr``
    become far less entangled than with L2-in-Adam.

    Memory: two moments the size of the parameter, ``m`` and ``v`` — 8 bytes per trained
    parameter in fp32 (``state_nbytes()``), 12 with ``amsgrad``. Mixed-precision training also
    keeps an fp32 master copy of the weights next to the fp16/bf16 model, and together with the
    moments that is lecture 003's ~12 bytes per parameter (7B parameters x 12 B = 84 GB;
    the half-precision weights and gradients come on top).
    minift trains in fp32 throughout, so the weights themselves are the master copy. Frozen
    parameters get no state at all.
    """

    def __init__(self, params, lr: float = 1e-3, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False):
        beta1, beta2 = betas
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"AdamW: lr, eps and weight_decay must be >= 0, got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"AdamW: betas must lie in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": (beta1, beta2), "eps": eps,
                                  "weight_decay": weight_decay, "amsgrad": amsgrad})

    def _new_state(self, p: Tensor, amsgrad: bool) -> dict:
        """Zero moments in the parameter's dtype; ``step`` counts this parameter's updates."""
        state = {"step": 0, "exp_avg": xp.zeros_like(p.data), "exp_avg_sq": xp.zeros_like(p.data)}
        if amsgrad:
            state["max_exp_avg_sq"] = xp.zeros_like(p.data)
        return state

    def _update(self, p: Tensor, group: dict) -> None:
        state = self.state.get(p)
        if state is None:
            state = self.state[p] = self._new_state(p, group["amsgrad"])
        state["step"] += 1
        step = functools.partial(adamw_arithmetic, t=state["step"], lr=group["lr"], betas=group["betas"],
                                 eps=group["eps"], weight_decay=group["weight_decay"])
        # One scratch array holds every intermediate; the rows are updated on the BLAS threads
        # (elementwise arithmetic: the same bits as one call, minift/autograd/parallel.py).
        over_row_blocks(step, p.data, p.grad, state["exp_avg"], state["exp_avg_sq"], xp.empty_like(p.data),
                        state.get("max_exp_avg_sq"))


def adamw_arithmetic(w, g, m, v, scratch, max_v=None, *, t: int, lr: float, betas: tuple[float, float],
                     eps: float, weight_decay: float) -> None:
    """AdamW's step ``t`` (the class docstring's equations), in place on matching slices of a
    weight ``w``, its gradient ``g`` and moments ``m``, ``v`` (and, with amsgrad, ``max_v``).

    Every intermediate goes through ``scratch`` (shaped and typed like ``w``): one extra array instead
    of a fresh one per operation, and each value is read and written fewer times. The operations
    and their order are those of the equations, so the result is the same to the bit as writing
    them with temporaries. ``AdamW8bit`` runs this on each decoded chunk of its moments."""
    beta1, beta2 = betas
    if weight_decay != 0:
        w *= 1 - lr * weight_decay
    m *= beta1
    xp.multiply(g, 1 - beta1, out=scratch)
    m += scratch
    v *= beta2
    xp.multiply(g, g, out=scratch)
    scratch *= 1 - beta2
    v += scratch
    if max_v is not None:
        xp.maximum(max_v, v, out=max_v)
        v = max_v
    # m_hat / (sqrt(v_hat) + eps), with the two bias corrections folded into scalars
    xp.sqrt(v, out=scratch)
    scratch /= math.sqrt(1 - beta2**t)
    scratch += eps
    xp.divide(m, scratch, out=scratch)
    scratch *= lr / (1 - beta1**t)
    w -= scratch
