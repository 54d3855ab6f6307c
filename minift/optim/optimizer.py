"""``Optimizer``: the bookkeeping every update rule shares.

After ``loss.backward()`` each trainable parameter holds ``dL/dp`` in ``.grad``; an optimizer
turns those gradients into a change of the weights (lecture 000: the optimizer decides how far
each parameter moves). The arithmetic lives in the subclasses (``SGD``, ``AdamW``); this base
class keeps what they have in common, with the same shapes as ``torch.optim.Optimizer``:

* ``param_groups`` — a list of dicts, each ``{"params": [...], "lr": ..., ...}``. Passing a plain
  list of tensors makes one group; passing dicts makes several, and any hyper-parameter a dict
  leaves out is filled from the constructor's defaults. Groups are how one optimizer gives
  biases no weight decay, or an adapter a larger learning rate, than the rest.
* ``state`` — per-parameter memory (momentum buffers, Adam's moments), keyed by the parameter.
  It is created lazily, on a parameter's first update, and only for parameters with
  ``requires_grad=True``: a frozen weight never gets state, so freezing saves optimizer memory
  as well as backward compute (lecture 000, layer freezing).
* ``state_dict()`` / ``load_state_dict()`` — everything needed to resume a run bit for bit.
"""

from __future__ import annotations

from minift.autograd import Tensor
from minift.backend import xp


class Optimizer:
    """Base class: holds ``param_groups`` and ``state``; subclasses implement ``_update``."""

    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        self.param_groups: list[dict] = []
        self.state: dict[Tensor, dict] = {}
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Tensors or of dicts, not a single Tensor "
                            "(wrap it in a list)")
        groups = list(params)
        if not groups:
            raise ValueError("the optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)
        if not any(group["params"] for group in self.param_groups):
            raise ValueError("every parameter group is empty: there is nothing to optimize "
                             "(are all parameters frozen?)")

    def add_param_group(self, group: dict) -> None:
        """Append a group; missing hyper-parameters come from ``defaults``.

        A parameter may belong to one group only: in two groups it would be updated twice per
        step, with two different sets of hyper-parameters.
        """
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"a parameter group must be a dict with a 'params' key, got {group!r}")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if not isinstance(p, Tensor):
                hint = " (pass parameters(), not named_parameters())" if isinstance(p, tuple) else ""
                raise TypeError(f"the optimizer can only update Tensors, got {type(p).__name__}{hint}")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len({id(p) for p in params}) != len(params) or seen & {id(p) for p in params}:
            raise ValueError("a parameter appears more than once in the optimizer's parameter groups")
        self.param_groups.append({**self.defaults, **group, "params": params})

    def zero_grad(self) -> None:
        """Forget every parameter's gradient (``.grad = None``).

        ``backward()`` *adds* to ``.grad``, so gradients pile up from step to step until they
        are cleared; forgetting this call is the classic training bug (each update then follows
        the sum of all past gradients). Setting ``None`` rather than zeros frees the memory and
        lets ``step()`` tell "no gradient" from "a zero gradient".
        """
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def step(self) -> None:
        """Update every trainable parameter that has a gradient, in place on ``.data``.

        Frozen parameters (``requires_grad=False``) and parameters that got no gradient this
        step are skipped entirely: no update, no state. The update reads and writes plain
        arrays, so it builds no autograd graph.
        """
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and p.grad is not None:
                    self._update(p, group)

    def _update(self, p: Tensor, group: dict) -> None:
        raise NotImplementedError

    def state_nbytes(self) -> int:
        """Bytes held by the optimizer's state arrays (AdamW in fp32: 8 per trained parameter)."""
        return sum(v.nbytes for s in self.state.values() for v in s.values() if hasattr(v, "nbytes"))

    # ---- saving and resuming ----------------------------------------------------------
    def _params_in_order(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        """A snapshot ``{"state": {index: {...}}, "param_groups": [{..., "params": [index, ...]}]}``.

        Parameters are named by their position in the concatenation of all groups (0, 1, 2, ...
        across groups, as in torch), so the snapshot holds no Tensor objects and can be loaded
        into a fresh optimizer built over a freshly built model. State arrays are *copied*: the
        optimizer updates its arrays in place, and a snapshot that changed as training went on
        would not be a snapshot.
        """
        index = {id(p): i for i, p in enumerate(self._params_in_order())}
        state = {index[id(p)]: {k: _copy(v) for k, v in s.items()} for p, s in self.state.items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [index[id(p)] for p in g["params"]]} for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a ``state_dict()`` snapshot into this optimizer (same groups, same sizes).

        Hyper-parameters (including a scheduler's current ``lr`` and ``initial_lr``) are taken
        from the snapshot; the parameters stay this optimizer's own. State arrays are copied to
        the active backend in each parameter's dtype. Index keys may be ints or digit strings
        (JSON turns dict keys into strings).
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the snapshot has {len(saved_groups)} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")
        for i, (saved, own) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(own["params"]):
                raise ValueError(f"parameter group {i} has {len(saved['params'])} parameters in the "
                                 f"snapshot and {len(own['params'])} here: a different model?")
        # the i-th index listed in the snapshot's groups names this optimizer's i-th parameter
        saved_indices = [int(i) for g in saved_groups for i in g["params"]]
        by_index = dict(zip(saved_indices, self._params_in_order(), strict=True))
        state = {}
        for key, saved_state in state_dict["state"].items():
            if int(key) not in by_index:
                raise ValueError(f"the snapshot has state for parameter {key}, which none of its "
                                 "parameter groups lists")
            p = by_index[int(key)]
            state[p] = {k: _restore(v, p, f"state[{key}][{k!r}]") for k, v in saved_state.items()}
        self.state = state  # only now, so that a snapshot that fails to load changes nothing
        self.param_groups = [{**{k: v for k, v in saved.items() if k != "params"}, "params": own["params"]}
                             for saved, own in zip(saved_groups, self.param_groups, strict=True)]

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("]
        for i, group in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={v}" for k, v in group.items() if k != "params")
            lines.append(f"  group {i}: {len(group['params'])} tensors, {hyper}")
        return "\n".join(lines + [")"])


def _is_array(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _copy(value):
    return value.copy() if _is_array(value) else value


def _restore(value, p: Tensor, where: str):
    """A saved state entry as it must live next to ``p``: same shape, dtype and device."""
    if not _is_array(value):
        return value
    if tuple(value.shape) != tuple(p.shape):
        raise ValueError(f"{where} has shape {tuple(value.shape)} but the parameter has shape "
                         f"{tuple(p.shape)}: the snapshot belongs to a different model")
    dtype = p.dtype if xp.issubdtype(value.dtype, xp.floating) else value.dtype
    return xp.array(value, dtype=dtype, copy=True)
