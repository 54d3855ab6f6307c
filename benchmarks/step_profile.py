"""Where the time of one LoRA training step on SmolLM2-135M goes: matmul vs everything else.

    python benchmarks/step_profile.py [--method lora] [--steps 3] [--threads 1] [--serial-rows]

The same step as benchmarks/step_vs_torch.py (batch 4 x 128 random tokens, float32, LoRA r=8 on
q, k, v, o; forward, cross-entropy, backward, clipping, AdamW, zero_grad), timed from inside:

* every ``Function``'s forward and backward (minift/autograd/function.py: every op of the
  graph goes through one), by class;
* every matrix product (``counted_matmul``, minift/autograd/elementwise.py: the one door all of
  them go through, the attention products included);
* clipping and the AdamW update.

Times are exclusive: a product inside ``Linear.forward`` counts as matmul, not as ``Linear``, so
an op's row is its own elementwise work (attention's row is its mask, softmax and reshapes; its
four products are matmul). What no timer covers (the graph walk, gradient accumulation, Python)
is the "engine and Python" row. This measures; it optimises nothing. Prints the table for
docs/benchmarks.md.

The elementwise ops that run over row blocks on the BLAS threads (minift/autograd/parallel.py:
RMSNorm, SwiGLU, RoPE, attention's softmax, the fused head's exponentials) do so as in training;
``--serial-rows`` keeps every one of them on the calling thread (no array is large enough to
split), the step as it was before the row blocks, for a side-by-side in one sitting. Whether the
blocks pay depends on OpenBLAS's worker threads: they spin after each product unless
``OPENBLAS_THREAD_TIMEOUT`` is low when NumPy loads, which is why minift is imported first here
(its ``__init__`` sets 4 unless the environment has a value; docs/benchmarks.md has both).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

# isort: off
import minift  # noqa: F401 - before NumPy, see the docstring
# isort: on
import numpy as np

BATCH, SEQ, VOCAB = 4, 128, 49152
LORA_R, LORA_ALPHA, LR = 8, 16, 1e-4
MATMUL = "matmul (every product)"


class ExclusiveTimer:
    """Seconds per label, each region's time minus the timed regions nested inside it."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._children: list[float] = []  # per open region: time spent in its timed children

    def wrap(self, label: str, fn):
        def timed(*args, **kwargs):
            self._children.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                inside = self._children.pop()
                self.seconds[label] += elapsed - inside
                if self._children:
                    self._children[-1] += elapsed

        return timed


def all_subclasses(cls) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *all_subclasses(sub)]
    return found


def instrument(timer: ExclusiveTimer) -> None:
    """Route every Function's forward/backward and every product through ``timer``."""
    from minift.autograd import elementwise
    from minift.autograd.function import Function

    for cls in all_subclasses(Function):
        for phase in ("forward", "backward"):
            if phase in cls.__dict__:  # wrap the class's own method once, not an inherited one again
                setattr(cls, phase, staticmethod(timer.wrap(cls.__name__, cls.__dict__[phase].__func__)))
    plain = elementwise.counted_matmul
    timed = timer.wrap(MATMUL, plain)
    for module in list(sys.modules.values()):
        if getattr(module, "counted_matmul", None) is plain:
            module.counted_matmul = timed


def build_step(method: str, timer: ExclusiveTimer):
    from minift import load_pretrained
    from minift.models import ATTENTION_PROJECTIONS
    from minift.optim import AdamW, clip_grad_norm_
    from minift.training.methods import MethodOptions, prepare_model

    base, _ = load_pretrained("smollm2")
    options = MethodOptions(lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_targets=tuple(ATTENTION_PROJECTIONS))
    model, _ = prepare_model(base, method, options)
    params = model.parameters(trainable_only=True)
    optimizer = AdamW(params, lr=LR, weight_decay=0.0)
    rng = np.random.default_rng(0)
    ids, targets = rng.integers(0, VOCAB, (BATCH, SEQ)), rng.integers(0, VOCAB, (BATCH, SEQ))
    clip = timer.wrap("clip_grad_norm_", clip_grad_norm_)
    update = timer.wrap("AdamW.step", optimizer.step)

    def step():
        model.loss(ids, targets).backward()  # the head fused with the loss, as minift trains
        clip(params, 1.0)
        update()
        optimizer.zero_grad()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora", choices=["full", "lora", "qlora"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--serial-rows", action="store_true", help="elementwise ops on one thread")
    args = parser.parse_args()
    if args.serial_rows:
        from minift.autograd import parallel

        parallel.MIN_ELEMENTS_PER_THREAD = sys.maxsize
    from threadpoolctl import threadpool_limits

    from minift.allocator import keep_freed_memory

    keep_freed_memory()  # as the Trainer and the CLI run: no page-fault storm in the elementwise ops
    timer = ExclusiveTimer()
    with threadpool_limits(args.threads):
        step = build_step(args.method, timer)
        instrument(timer)
        step()  # warm-up: optimizer state, first touch of the buffers
        timer.seconds.clear()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        total = (time.perf_counter() - start) / args.steps
    per_step = {label: s / args.steps for label, s in timer.seconds.items()}
    per_step["engine and Python (untimed)"] = total - sum(per_step.values())
    rows = "elementwise on one thread" if args.serial_rows else "elementwise over row blocks"
    print(f"{args.method} step on SmolLM2-135M, batch {BATCH}x{SEQ}, {args.threads} BLAS thread(s), {rows}, "
          f"mean of {args.steps} steps: {total:.2f} s; load average {os.getloadavg()[0]:.2f}")
    print(f"| {'part':30} | {'s per step':>10} | {'share':>6} |")
    print(f"|{'-' * 32}|{'-' * 11}:|{'-' * 7}:|")
    for label, s in sorted(per_step.items(), key=lambda item: -item[1]):
        print(f"| {label:30} | {s:10.3f} | {s / total:6.1%} |")


if __name__ == "__main__":
    main()
