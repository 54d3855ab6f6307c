"""Selective gradient checkpointing on SmolLM2-135M LoRA: step time against peak memory.

    python benchmarks/checkpointing_tradeoff.py [--blocks 0 10 20 30] [--rounds 5] [--threads 2]

``model.gradient_checkpointing_enable(blocks=N)`` checkpoints the bottom N of the 30 blocks
(minift/models/llama.py). Each checkpointed block trades its activations for one more forward
of itself, so between N = 0 and N = 30 both the peak and the step time should move in a
straight line; this measures the line, to pick the N that fits a time budget (issue 19 asks
for at most 1.35x the plain step).

One LoRA model (r=8 on q, k, v, o, as ``minift finetune --method lora``), one Trainer, batch
4 x 128 random tokens, float32. Time: after one warm-up step per N, ``--rounds`` rounds in which
every N takes one ``Trainer.train_step`` (forward, loss, backward, clipping, AdamW) in turn, so
a busy moment of a shared machine falls on all N alike; the median per N is reported. As in
``minift finetune``, glibc keeps freed memory for reuse (minift/allocator.py). Memory: then one
more step per N under ``tracemalloc``, whose peak counts the NumPy buffers the step allocates
and holds at once: activations, gradients, scratch — not the weights and optimizer state,
which exist before the step and are the same for every N.

Writes results/checkpointing_tradeoff.json and results/checkpointing_tradeoff.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import tracemalloc
from datetime import date
from pathlib import Path

# isort: off
import minift  # noqa: F401 - before NumPy: its __init__ sets OPENBLAS_THREAD_TIMEOUT (minift/__init__.py)
# isort: on
import numpy as np
from threadpoolctl import threadpool_limits

from minift import load_pretrained
from minift.allocator import keep_freed_memory
from minift.data import DataLoader
from minift.training import TrainConfig, Trainer
from minift.training.methods import prepare_model

BATCH, TOKENS = 4, 128
RESULTS = Path(__file__).parent / "results"


def lora_trainer() -> Trainer:
    base, _ = load_pretrained("smollm2")
    model, _ = prepare_model(base, "lora")
    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(0, base.config.vocab_size, TOKENS),
             "labels": rng.integers(0, base.config.vocab_size, TOKENS)} for _ in range(BATCH)]
    config = TrainConfig(max_steps=10**6, lr=1e-4, progress=False, plot=False)
    return Trainer(model, config, DataLoader(rows, BATCH, pad_id=0))


def timed_step(trainer: Trainer, blocks: int) -> float:
    trainer.model.gradient_checkpointing_enable(blocks)
    start = time.perf_counter()
    trainer.train_step()
    return time.perf_counter() - start


def traced_peak(trainer: Trainer, blocks: int) -> int:
    """Bytes the step holds at its peak on top of what existed before it."""
    trainer.model.gradient_checkpointing_enable(blocks)
    tracemalloc.start()
    try:
        trainer.train_step()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def measure(block_counts: list[int], rounds: int) -> dict[int, dict[str, float]]:
    trainer = lora_trainer()
    times: dict[int, list[float]] = {n: [] for n in block_counts}
    for n in block_counts:
        timed_step(trainer, n)  # warm-up: allocations, caches
    for _ in range(rounds):
        for n in block_counts:
            times[n].append(timed_step(trainer, n))
    peaks = {n: traced_peak(trainer, n) for n in block_counts}
    plain = statistics.median(times[block_counts[0]])
    return {n: {"seconds": statistics.median(times[n]), "time_ratio": statistics.median(times[n]) / plain,
                "peak_mib": peaks[n] / 2**20, "peak_ratio": peaks[n] / peaks[block_counts[0]],
                "all_seconds": times[n]} for n in block_counts}


def plot(rows: dict[int, dict[str, float]], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    seconds = [r["time_ratio"] for r in rows.values()]
    peaks = [r["peak_mib"] for r in rows.values()]
    ax.plot(seconds, peaks, "o-")
    for n, r in rows.items():
        ax.annotate(f"N={n}", (r["time_ratio"], r["peak_mib"]), textcoords="offset points", xytext=(6, 4))
    ax.axvline(1.35, color="grey", linestyle="--", label="issue 19's budget: 1.35x")
    ax.set_xlabel("step time / plain step (median)")
    ax.set_ylabel("step peak above weights + AdamW state (MiB)")
    ax.set_title(f"SmolLM2-135M LoRA, batch {BATCH} x {TOKENS}: the bottom N of 30 blocks checkpointed")
    ax.title.set_fontsize(9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 30], help="checkpointed block counts; "
                        "the first is the baseline of the ratios")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per count, taken round-robin")
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads")
    args = parser.parse_args()
    keep_freed_memory()
    with threadpool_limits(args.threads):
        rows = measure(args.blocks, args.rounds)
    for n, r in rows.items():
        print(f"N={n:>2}: {r['seconds']:.2f} s/step ({r['time_ratio']:.2f}x), peak {r['peak_mib']:.0f} MiB "
              f"({r['peak_ratio']:.2f}x)")
    RESULTS.mkdir(exist_ok=True)
    record = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "threads": args.threads, "batch": BATCH, "tokens": TOKENS,
              "rounds": args.rounds, "blocks": {str(n): r for n, r in rows.items()}}
    (RESULTS / "checkpointing_tradeoff.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(rows, RESULTS / "checkpointing_tradeoff.png")


if __name__ == "__main__":
    main()
