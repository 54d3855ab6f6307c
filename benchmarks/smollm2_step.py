"""Seconds per training step of the real SmolLM2-135M on this CPU, per method, at batch 4 x 128.

    python benchmarks/smollm2_step.py [lora full freeze ...]

One step = forward, masked cross-entropy, backward, gradient clipping and the AdamW update,
exactly what ``Trainer.train_step`` runs. The first step (allocations, warm caches) is not
counted; the median of the next ``REPEAT`` is printed with the machine's core count and BLAS
thread setting, because both change the number a lot: on a shared 2-core machine OpenBLAS
threads that wait for a busy core can make a step ten times slower (``OPENBLAS_NUM_THREADS=1``
is the robust setting there).
"""

from __future__ import annotations

import copy
import os
import sys
import time

import numpy as np

from minift import load_pretrained
from minift.data import DataLoader
from minift.training import TrainConfig, Trainer
from minift.training.methods import prepare_model

BATCH, TOKENS, REPEAT = 4, 128, 3


def seconds_per_step(base, method: str) -> float:
    model, _ = prepare_model(copy.deepcopy(base), method)
    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(0, base.config.vocab_size, TOKENS),
             "labels": rng.integers(0, base.config.vocab_size, TOKENS)} for _ in range(BATCH)]
    config = TrainConfig(max_steps=REPEAT + 1, lr=1e-4, progress=False)
    trainer = Trainer(model, config, DataLoader(rows, BATCH, pad_id=0))
    trainer.train_step()
    times = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(methods: list[str]) -> None:
    base, _ = load_pretrained("smollm2")
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(f"SmolLM2-135M, batch {BATCH} x {TOKENS} tokens, {os.cpu_count()} cores, OPENBLAS_NUM_THREADS={threads}")
    for method in methods:
        print(f"{method:>8}: {seconds_per_step(base, method):.2f} s/step")


if __name__ == "__main__":
    main(sys.argv[1:] or ["lora", "full"])
