"""Stochastic gradient descent with optional momentum — the baseline AdamW improves on.

Plain SGD is lecture 000's "new weight = old weight - learning rate x gradient". Momentum keeps
a running sum of past gradients so that directions which agree from step to step build up speed
and noisy ones cancel (Polyak 1964; Sutskever et al. 2013 for the Nesterov form used here).
"""

from __future__ import annotations

from minift.autograd import Tensor
from minift.optim.optimizer import Optimizer


class SGD(Optimizer):
    """SGD with the exact semantics of ``torch.optim.SGD`` (dampening 0).

    With ``g`` the gradient, ``mu`` the momentum and ``lambda`` the weight decay::

        d = g + lambda * p                      (L2 penalty folded into the gradient)
        b = d                    on the first step
        b = mu * b + d           afterwards     (the momentum buffer)
        d = d + mu * b           if nesterov, else d = b
        p = p - lr * d

    Note that here weight decay is *coupled*: it passes through the momentum buffer like any
    gradient. AdamW decouples it (see ``adamw.py``). State: one buffer per parameter, only when
    ``momentum != 0`` — 4 bytes per parameter in fp32.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr, momentum and weight_decay must be >= 0, got "
                             f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov=True needs a positive momentum")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "nesterov": nesterov})

    def _update(self, p: Tensor, group: dict) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        d = p.grad if wd == 0 else p.grad + wd * p.data
        if mu != 0:
            state = self.state.get(p)
            if state is None:
                buf = d.copy()
                self.state[p] = {"momentum_buffer": buf}
            else:
                buf = state["momentum_buffer"]
                buf *= mu
                buf += d
            d = d + mu * buf if group["nesterov"] else buf
        p.data -= lr * d
