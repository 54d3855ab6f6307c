"""Gradient clipping by global norm: one bad batch must not throw the weights far away.

A batch with an outlier can produce a gradient many times larger than usual; following it
with the full learning rate can undo much of what was learned (lecture 000: early, unstable
gradients are why warmup exists — clipping guards every step). Clipping rescales the *whole*
gradient, every parameter by the same factor, so its direction is kept and only its length is
capped (Pascanu et al. 2013).
"""

from __future__ import annotations

import math

from minift.autograd import Tensor
from minift.backend import xp


def clip_grad_norm_(params, max_norm: float, eps: float = 1e-6, error_if_nonfinite: bool = False) -> float:
    """Scale all gradients so that their joint L2 norm is at most ``max_norm``; return the norm.

    ``total = sqrt(sum over parameters of ||p.grad||^2)``, computed before clipping, as in
    ``torch.nn.utils.clip_grad_norm_``. When ``c = max_norm / (total + eps)`` is below 1 every
    gradient is multiplied by ``c``; otherwise nothing changes. Parameters without a gradient
    are ignored; with no gradient at all the norm is 0.0. ``max_norm=math.inf`` only measures.

    A NaN/inf norm means some gradient is NaN/inf (or overflowed). With ``error_if_nonfinite``
    that raises; otherwise the gradients are left untouched and the caller must check the
    returned norm before stepping (torch would instead multiply them by NaN or by 0).

    The gradients are replaced, not scaled in place, because the autograd engine may hand one
    gradient array to several parameters (``a + b`` gives both the same ``g``); scaling in place
    would scale the shared array once per parameter.
    """
    if max_norm <= 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be positive, got {max_norm}")
    params = [params] if isinstance(params, Tensor) else list(params)
    with_grad = [p for p in params if p.grad is not None]
    total = math.hypot(*(float(xp.linalg.norm(p.grad)) for p in with_grad))
    if not math.isfinite(total):
        if error_if_nonfinite:
            raise RuntimeError(f"the total gradient norm is {total}: some gradient is NaN or infinite "
                               "(a diverging loss, or too high a learning rate)")
        return total
    coef = max_norm / (total + eps)
    if coef < 1:
        for p in with_grad:
            p.grad = p.grad * coef
    return total
