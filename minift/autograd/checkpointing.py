"""Activation (gradient) checkpointing: keep a segment's inputs, recompute the rest in backward.

A training step keeps every activation that some backward formula saved, from the forward
until the backward walk reaches it — for a decoder, tens of arrays per block, most of them
(B, T, ffn) or (B, H, T, T). ``checkpoint(fn, *inputs)`` trades compute for that memory
(Chen et al. 2016, "Training deep nets with sublinear memory cost"): the forward runs ``fn``
under ``no_grad``, so nothing inside it is saved, and keeps only ``inputs``. When backward
reaches the segment, it runs ``fn`` again on those inputs *with* a graph, walks that local
graph with the incoming gradient, and hands on the inputs' gradients. The cost is one extra
forward of the segment.

Two things make the recomputed graph the same as the one the forward would have built:

* freezing: the recomputed inputs want a gradient only where the outer graph asked for one, and
  frozen parameters are still frozen, so the local walk skips the same work (no ``dW`` for a
  frozen base under LoRA);
* randomness: every generator that ``F.dropout`` draws from inside the segment is noted with its
  state before the first draw; the recompute starts each from that state (the same masks) and
  then puts it back where the forward left it, so later draws are unchanged.
"""

from __future__ import annotations

import contextlib

from minift.autograd.function import Function, enable_grad, no_grad
from minift.autograd.tensor import Tensor

#: While a checkpointed forward runs: id(generator) -> (generator, its state before its first draw).
_noted_generators: dict | None = None


def note_generator(rng) -> None:
    """Called by ``F.dropout`` before it draws: inside a checkpointed forward, remember where
    ``rng`` stood so the recompute can draw the same mask."""
    if _noted_generators is not None and id(rng) not in _noted_generators:
        _noted_generators[id(rng)] = (rng, rng.bit_generator.state)


@contextlib.contextmanager
def _noting_generators():
    global _noted_generators
    previous, _noted_generators = _noted_generators, {}
    try:
        yield _noted_generators
    finally:
        _noted_generators = previous


@contextlib.contextmanager
def _replaying(generator_states: list):
    """Rewind each generator to its state at the forward, and restore its current state after."""
    now = [rng.bit_generator.state for rng, _ in generator_states]
    for rng, state in generator_states:
        rng.bit_generator.state = state
    try:
        yield
    finally:
        for (rng, _), state in zip(generator_states, now, strict=True):
            rng.bit_generator.state = state


class Checkpoint(Function):
    """y = fn(*inputs), saving only the inputs. Positional arrays: the ``n_inputs`` inputs, then
    the trainable parameters ``fn`` reads (listed only so that y requires a gradient when they
    do; the local backward adds to their ``.grad`` itself, so this node returns None for them).
    Saves: the inputs, ``fn`` and the generator states of its dropouts.
    """

    @staticmethod
    def forward(ctx, *arrays, fn, n_inputs):
        inputs = arrays[:n_inputs]
        with no_grad(), _noting_generators() as generators:
            out = fn(*(Tensor(a) for a in inputs))
        ctx.save_for_backward(*inputs)
        ctx.fn, ctx.generator_states = fn, list(generators.values())
        return out.data

    @staticmethod
    def backward(ctx, grad):
        n_inputs = len(ctx.saved)
        # With a retained graph the saved inputs must survive this backward: the local walk may
        # overwrite what its ops saved (Context.saved_is_scratch), so it gets copies.
        arrays = ctx.saved if ctx.saved_is_scratch else [a.copy() for a in ctx.saved]
        wanted = ctx.needs_input_grad[:n_inputs]
        inputs = [Tensor(a, requires_grad=need) for a, need in zip(arrays, wanted, strict=True)]
        with enable_grad(), _replaying(ctx.generator_states):
            out = ctx.fn(*inputs)
        if out.requires_grad:
            out.backward(grad)
        input_grads = tuple(x.grad if x.requires_grad else None for x in inputs)
        return input_grads + (None,) * (len(ctx.needs_input_grad) - n_inputs)


def checkpoint(fn, *inputs, parameters=()):
    """``fn(*inputs)`` (a Tensor) without keeping its activations; see the module docstring.

    ``parameters``: the parameters ``fn`` reads. Those that require a gradient make the result
    require one even when no input does (a LoRA block over a frozen embedding); their ``.grad``
    is filled by the recompute's backward. ``fn`` must be a pure function of its inputs, its
    parameters and the dropout generators (no KV cache: it would be appended to twice).
    """
    trainable = [p for p in parameters if p.requires_grad]
    return Checkpoint.apply(*inputs, *trainable, fn=fn, n_inputs=len(inputs))
