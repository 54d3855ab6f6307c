"""NF4 quantize and dequantize throughput, minift vs bitsandbytes on the CPU, side by side.

    python benchmarks/nf4_throughput.py [--threads 2] [--repeat 7]

Weights N(0, 0.02) in float32, block size 64, double quantization on (QLoRA's setting), at
several sizes from one 576 x 576 projection to 16 M weights. For each size the same weights go
through:

* minift ``quantize_nf4`` and both dequantizations: ``dequantize_nf4`` (the plain reference:
  unpack, look up, scale) and ``dequantize_nf4_by_byte`` (a 256-entry table per byte — what
  ``Linear4bit`` runs on the CPU);
* bitsandbytes ``quantize_4bit`` / ``dequantize_4bit`` on CPU tensors.

GB/s counts the float32 side: 4 bytes per weight read by quantization, written by
dequantization. The median of ``--repeat`` runs after one warm-up. Both libraries get the same
number of threads. Also checks that the two sides' codes and weights agree bit for bit (they
should: tests/interop/test_bitsandbytes.py). Writes results/nf4_throughput.json and .png.
Needs the ``interop`` extra.
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


def median_seconds(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(shape, repeat: int) -> dict:
    import bitsandbytes.functional as bnb_f
    import torch

    from minift.quant.nf4 import dequantize_nf4, dequantize_nf4_by_byte, quantize_nf4

    weights = (np.random.default_rng(0).standard_normal(shape) * 0.02).astype(np.float32)
    tensor = torch.from_numpy(weights)
    packed, state = quantize_nf4(weights, BLOCK, double_quant=True)
    bnb_packed, bnb_state = bnb_f.quantize_4bit(tensor, blocksize=BLOCK, compress_statistics=True, quant_type="nf4")
    ours = dequantize_nf4_by_byte(packed, state)
    theirs = bnb_f.dequantize_4bit(bnb_packed, bnb_state).numpy()
    gb = weights.nbytes / 1e9
    seconds = {
        "minift quantize": median_seconds(lambda: quantize_nf4(weights, BLOCK, double_quant=True), repeat),
        "bnb quantize": median_seconds(lambda: bnb_f.quantize_4bit(tensor, blocksize=BLOCK, compress_statistics=True,
                                                                   quant_type="nf4"), repeat),
        "minift dequantize (plain)": median_seconds(lambda: dequantize_nf4(packed, state), repeat),
        "minift dequantize (byte table)": median_seconds(lambda: dequantize_nf4_by_byte(packed, state), repeat),
        "bnb dequantize": median_seconds(lambda: bnb_f.dequantize_4bit(bnb_packed, bnb_state), repeat),
    }
    return {"shape": list(shape), "weights": int(weights.size),
            "same_codes": bool(np.array_equal(packed.reshape(-1), bnb_packed.numpy().reshape(-1))),
            "max_weight_difference": float(np.abs(ours - theirs).max()),
            "seconds": seconds, "gb_per_s": {name: gb / s for name, s in seconds.items()}}


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
    args = parser.parse_args()
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        rows = {name: measure(shape, args.repeat) for name, shape in SIZES.items()}
    names = list(next(iter(rows.values()))["gb_per_s"])
    print(f"NF4 throughput, GB/s of float32 weights, {args.threads} threads, median of {args.repeat}")
    print(f"{'size':12}" + "".join(f"{n:>32}" for n in names) + "   same codes")
    for size, row in rows.items():
        print(f"{size:12}" + "".join(f"{row['gb_per_s'][n]:32.2f}" for n in names) + f"   {row['same_codes']}")
    for size, row in rows.items():
        ratio = row["gb_per_s"]["minift dequantize (byte table)"] / row["gb_per_s"]["bnb dequantize"]
        print(f"  {size}: minift byte-table dequantize / bitsandbytes = {ratio:.2f}")
    RESULTS.mkdir(exist_ok=True)
    summary = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores, {args.threads} threads", "block": BLOCK, "rows": rows}
    (RESULTS / "nf4_throughput.json").write_text(json.dumps(summary, indent=2))
    plot(rows, RESULTS / "nf4_throughput.png")


if __name__ == "__main__":
    main()
