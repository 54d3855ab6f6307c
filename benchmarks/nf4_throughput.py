"""NF4 quantize and dequantize throughput, minift vs bitsandbytes on the CPU, and what it costs a
QLoRA step on SmolLM2-135M, side by side in one run.

    python benchmarks/nf4_throughput.py [--threads 2] [--repeat 7] [--steps 3]

Part 1. Weights N(0, 0.02) in float32, block size 64, double quantization on (QLoRA's setting),
at several sizes from one 576 x 576 projection to 16 M weights. For each size the same weights
go through:

* minift ``quantize_nf4`` and three dequantizations: ``dequantize_nf4`` (the plain reference:
  unpack, look up, decode the absmax, scale), ``dequantize_nf4_by_byte`` (NumPy's fast path: a
  256-entry table per byte, row blocks on a thread pool) and ``dequantize_nf4_compiled`` (what
  ``Linear4bit`` runs on the CPU: kernels/nf4_decode_cpu.cpp, a compiled SIMD loop, blocks split
  over C++ threads), the last two at 1 thread and at ``--threads``;
* bitsandbytes ``quantize_4bit`` / ``dequantize_4bit`` on CPU tensors, at ``--threads`` (and
  ``dequantize_4bit`` at 1 thread as well).

GB/s counts the float32 side: 4 bytes per weight read by quantization, written by
dequantization. The median of ``--repeat`` runs after one warm-up. Also checks that the two
sides' codes and weights agree bit for bit (they should: tests/interop/test_bitsandbytes.py), and
minift's three decoders with each other.

Part 2 (skip with ``--steps 0``), at ``--step-threads`` (1 by default: on a shared 2-core
machine a second BLAS thread that waits for a busy core can make a step several times slower,
see ``minift/cli.py``'s ``DEFAULT_THREADS``). The real SmolLM2-135M, batch 4 x 128 random tokens, one
``Trainer.train_step`` each (forward, loss, backward, clipping, AdamW): LoRA (r = 8 on q, k, v,
o; the float base) and QLoRA (the same LoRA on an NF4 base), QLoRA with each CPU decoder swapped
in: the compiled one, NumPy's by-byte one and the plain reference. The four take turns step by step, so a neighbour's
load falls on all of them alike; the median of ``--steps`` after one warm-up step each, and the
seconds per step spent decoding NF4. The load average is printed before and after: on a shared
machine it says how far to trust the numbers.

Writes results/nf4_throughput.json and .png. Needs the ``interop`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SIZES = {"576 x 576": (576, 576), "1536 x 576": (1536, 576), "2048 x 2048": (2048, 2048), "4096 x 4096": (4096, 4096)}
BLOCK = 64
STEP_BATCH, STEP_TOKENS = 4, 128


def median_seconds(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(shape, threads: int, repeat: int) -> dict:
    import bitsandbytes.functional as bnb_f
    import torch

    from minift.cuda.cpu_decode import best_version, dequantize_nf4_compiled
    from minift.quant.nf4 import dequantize_nf4, dequantize_nf4_by_byte, quantize_nf4

    weights = (np.random.default_rng(0).standard_normal(shape) * 0.02).astype(np.float32)
    tensor = torch.from_numpy(weights)
    packed, state = quantize_nf4(weights, BLOCK, double_quant=True)
    bnb_packed, bnb_state = bnb_f.quantize_4bit(tensor, blocksize=BLOCK, compress_statistics=True, quant_type="nf4")
    ours = dequantize_nf4_by_byte(packed, state, threads=threads)
    compiled = dequantize_nf4_compiled(packed, state, threads=threads)
    theirs = bnb_f.dequantize_4bit(bnb_packed, bnb_state).numpy()
    gb = weights.nbytes / 1e9
    seconds = {
        "minift quantize": median_seconds(lambda: quantize_nf4(weights, BLOCK, double_quant=True), repeat),
        "bnb quantize": median_seconds(lambda: bnb_f.quantize_4bit(tensor, blocksize=BLOCK, compress_statistics=True,
                                                                   quant_type="nf4"), repeat),
        "minift dequantize (reference)": median_seconds(lambda: dequantize_nf4(packed, state), repeat),
        "minift dequantize (fast, 1 thread)": median_seconds(lambda: dequantize_nf4_by_byte(packed, state, threads=1),
                                                             repeat),
        f"minift dequantize (fast, {threads} threads)": median_seconds(
            lambda: dequantize_nf4_by_byte(packed, state, threads=threads), repeat),
        "minift dequantize (compiled, 1 thread)": median_seconds(
            lambda: dequantize_nf4_compiled(packed, state, threads=1), repeat),
        f"minift dequantize (compiled, {threads} threads)": median_seconds(
            lambda: dequantize_nf4_compiled(packed, state, threads=threads), repeat),
        f"bnb dequantize ({threads} threads)": median_seconds(lambda: bnb_f.dequantize_4bit(bnb_packed, bnb_state),
                                                             repeat),
    }
    torch.set_num_threads(1)
    seconds["bnb dequantize (1 thread)"] = median_seconds(lambda: bnb_f.dequantize_4bit(bnb_packed, bnb_state), repeat)
    torch.set_num_threads(threads)
    return {"shape": list(shape), "weights": int(weights.size),
            "same_codes": bool(np.array_equal(packed.reshape(-1), bnb_packed.numpy().reshape(-1))),
            "fast_equals_reference": bool(ours.tobytes() == dequantize_nf4(packed, state).tobytes()),
            "compiled_equals_reference": bool(compiled.tobytes() == dequantize_nf4(packed, state).tobytes()),
            "compiled_version": best_version(BLOCK),
            "max_weight_difference": float(np.abs(ours - theirs).max()),
            "seconds": seconds, "gb_per_s": {name: gb / s for name, s in seconds.items()}}


def step_times(steps: int) -> dict:
    """Seconds per training step of LoRA and QLoRA (each CPU decoder) on SmolLM2-135M, taking
    turns step by step, and the seconds per step spent decoding NF4."""
    import copy

    from minift import load_pretrained
    from minift.cuda.cpu_decode import dequantize_nf4_compiled
    from minift.data import DataLoader
    from minift.nn import linear4bit
    from minift.quant.nf4 import dequantize_nf4, dequantize_nf4_by_byte
    from minift.training import TrainConfig, Trainer
    from minift.training.methods import prepare_model

    base, _ = load_pretrained("smollm2")
    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(0, base.config.vocab_size, STEP_TOKENS),
             "labels": rng.integers(0, base.config.vocab_size, STEP_TOKENS)} for _ in range(STEP_BATCH)]
    trainers = {method: Trainer(prepare_model(copy.deepcopy(base), method)[0],
                                TrainConfig(max_steps=steps + 1, lr=1e-4, progress=False),
                                DataLoader(rows, STEP_BATCH, pad_id=0)) for method in ("lora", "qlora")}
    chosen_decoder = linear4bit.cpu_decoder
    decoding = {"seconds": 0.0}

    def timed(decoder):
        def decode(*args, **kwargs):
            start = time.perf_counter()
            weight = decoder(*args, **kwargs)
            decoding["seconds"] += time.perf_counter() - start
            return weight
        return decode

    runs = {"LoRA": ("lora", dequantize_nf4_compiled), "QLoRA (compiled decoder)": ("qlora", dequantize_nf4_compiled),
            "QLoRA (NumPy by-byte decoder)": ("qlora", dequantize_nf4_by_byte),
            "QLoRA (reference decoder)": ("qlora", dequantize_nf4)}
    seconds = {name: [] for name in runs}
    decode_seconds = {name: [] for name in runs}
    for step in range(steps + 1):
        for name, (method, decoder) in runs.items():
            timed_decoder = timed(decoder)
            linear4bit.cpu_decoder = lambda chosen=timed_decoder: chosen  # what Linear4bit asks for on the CPU
            decoding["seconds"] = 0.0
            start = time.perf_counter()
            trainers[method].train_step()
            if step:  # the first step of each warms caches and allocations
                seconds[name].append(time.perf_counter() - start)
                decode_seconds[name].append(decoding["seconds"])
    linear4bit.cpu_decoder = chosen_decoder
    return {name: {"median_s": statistics.median(seconds[name]), "all_s": seconds[name],
                   "decode_s": statistics.median(decode_seconds[name])} for name in runs}


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(rows.values()))["gb_per_s"])
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = np.arange(len(rows)) + (i - (len(names) - 1) / 2) * width
        ax.bar(xs, [row["gb_per_s"][name] for row in rows.values()], width, label=name)
    ax.set_xticks(range(len(rows)), list(rows))
    ax.set_ylabel("GB/s of float32 weights")
    ax.set_title(f"NF4 (block {BLOCK}, double quantization) on the CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per method (0: skip part 2)")
    parser.add_argument("--step-threads", type=int, default=1, help="BLAS (and NF4 decoder) threads in part 2")
    args = parser.parse_args()
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with threadpool_limits(args.threads):  # BLAS, and with it minift's NF4 decoder (blas_threads)
        rows = {name: measure(shape, args.threads, args.repeat) for name, shape in SIZES.items()}
    with threadpool_limits(args.step_threads):
        steps = step_times(args.steps) if args.steps else {}
    load_after = os.getloadavg()
    names = list(next(iter(rows.values()))["gb_per_s"])
    fast = f"minift dequantize (fast, {args.threads} threads)"
    compiled = f"minift dequantize (compiled, {args.threads} threads)"
    print(f"NF4 throughput, GB/s of float32 weights, {args.threads} threads, median of {args.repeat}")
    print(f"{'size':12}" + "".join(f"{n:>42}" for n in names)
          + "   same codes  fast == reference  compiled == reference")
    for size, row in rows.items():
        print(f"{size:12}" + "".join(f"{row['gb_per_s'][n]:42.2f}" for n in names)
              + f"   {row['same_codes']!s:10}  {row['fast_equals_reference']!s:17}  {row['compiled_equals_reference']}")
    print(f"  (compiled loop: the {next(iter(rows.values()))['compiled_version']} version on this CPU)")
    for size, row in rows.items():
        speed = row["gb_per_s"]
        bnb, bnb_1 = speed[f"bnb dequantize ({args.threads} threads)"], speed["bnb dequantize (1 thread)"]
        print(f"  {size}: minift / bitsandbytes dequantize: compiled {speed[compiled] / bnb:.2f} at "
              f"{args.threads} threads, {speed['minift dequantize (compiled, 1 thread)'] / bnb_1:.2f} at 1 thread; "
              f"NumPy fast {speed[fast] / bnb:.2f} at {args.threads} threads, "
              f"{speed['minift dequantize (fast, 1 thread)'] / bnb_1:.2f} at 1 thread")
    for name, row in steps.items():
        print(f"{name:>26}: {row['median_s']:.2f} s/step (steps {', '.join(f'{s:.2f}' for s in row['all_s'])}), "
              f"NF4 decoding {row['decode_s']:.3f} s/step")
    if steps:
        print(f"  (training steps at {args.step_threads} thread(s))")
        for name in ("QLoRA (compiled decoder)", "QLoRA (NumPy by-byte decoder)", "QLoRA (reference decoder)"):
            print(f"  {name} / LoRA = {steps[name]['median_s'] / steps['LoRA']['median_s']:.2f}")
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}, on {os.cpu_count()} cores")
    RESULTS.mkdir(exist_ok=True)
    summary = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores, {args.threads} threads", "load_average_before": load_before,
               "load_average_after": load_after, "block": BLOCK, "rows": rows,
               "steps": {"batch": [STEP_BATCH, STEP_TOKENS], "threads": args.step_threads, **steps}}
    (RESULTS / "nf4_throughput.json").write_text(json.dumps(summary, indent=2))
    plot(rows, RESULTS / "nf4_throughput.png")


if __name__ == "__main__":
    main()
