"""Autograd overhead: how much of a tiny model's training step is Python bookkeeping, minift vs PyTorch.

    python benchmarks/autograd_overhead.py [--repeat 30]

A Llama of width 64 (2 blocks, 4 query / 2 key-value heads, MLP 128, 256 tokens of vocabulary)
trains on batches of B x 16 tokens, B = 1, 2, 4, ..., 32, one thread. A step (forward, loss,
backward, clipping, AdamW) costs a fixed part — walking the graph, creating Tensors and nodes,
calling into NumPy once per op whatever the array size — plus a part that grows with the data.
Fitting  t(B) = fixed + per_row * B  separates the two; the fixed part's share of the step at
B = 1 is the share of time spent outside array kernels, where Python dispatch dominates.

The same is done for PyTorch on the same architecture (transformers' LlamaForCausalLM), whose
dispatch is C++. The count of recorded ops per step turns minift's fixed part into a cost per
op. Writes results/autograd_overhead.json and .png. Needs the ``interop`` extra for PyTorch.
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
BATCHES = [1, 2, 4, 8, 16, 32]
SEQ = 16
SHAPE = {"vocab_size": 256, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128}


def median_step(step, repeat: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def minift_steps(batch: int):
    import minift.autograd.functional as F
    from minift.models import LlamaConfig, LlamaForCausalLM
    from minift.optim import AdamW, clip_grad_norm_

    model = LlamaForCausalLM(LlamaConfig(**SHAPE, max_seq_len=SEQ))
    params = model.parameters()
    optimizer = AdamW(params, lr=1e-3)
    rng = np.random.default_rng(0)
    ids, targets = rng.integers(0, SHAPE["vocab_size"], (2, batch, SEQ))

    def step():
        F.cross_entropy(model(ids), targets).backward()
        clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step


def torch_steps(batch: int):
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["dim"],
                                      num_hidden_layers=SHAPE["n_layers"], num_attention_heads=SHAPE["n_heads"],
                                      num_key_value_heads=SHAPE["n_kv_heads"], intermediate_size=SHAPE["ffn_dim"],
                                      max_position_embeddings=SEQ, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    rng = np.random.default_rng(0)
    ids, targets = (torch.from_numpy(a) for a in rng.integers(0, SHAPE["vocab_size"], (2, batch, SEQ)))

    def step():
        logits = model(ids).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step


def ops_per_step() -> int:
    """Recorded ops (Function.apply calls that build a node) in one minift step at B = 1."""
    from minift.autograd import function

    count = [0]
    original = function.Function.apply.__func__

    def counting(cls, *inputs, **settings):
        out = original(cls, *inputs, **settings)
        count[0] += out._node is not None
        return out

    step = minift_steps(1)
    function.Function.apply = classmethod(counting)
    try:
        step()
    finally:
        function.Function.apply = classmethod(original)
    return count[0]


def fit(batches, seconds) -> tuple[float, float]:
    """Least-squares fixed + per_row * B."""
    per_row, fixed = np.polyfit(np.asarray(batches, float), np.asarray(seconds, float), 1)
    return float(fixed), float(per_row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    sides = {"minift": minift_steps, "PyTorch": torch_steps}
    result = {}
    with threadpool_limits(1):
        for side, make in sides.items():
            seconds = [median_step(make(b), args.repeat) for b in BATCHES]
            fixed, per_row = fit(BATCHES, seconds)
            result[side] = {"seconds": dict(zip(BATCHES, seconds)), "fixed_s": fixed, "per_row_s": per_row,
                            "fixed_share_at_b1": fixed / seconds[0]}
    ops = ops_per_step()
    result["minift"]["ops_per_step"] = ops
    result["minift"]["fixed_us_per_op"] = result["minift"]["fixed_s"] / ops * 1e6
    print(f"tiny Llama {SHAPE}, batches of B x {SEQ} tokens, one thread, median of {args.repeat}")
    print(f"{'B':>4}" + "".join(f"{side:>14}" for side in sides) + "   (ms per step)")
    for b in BATCHES:
        print(f"{b:4d}" + "".join(f"{result[s]['seconds'][b] * 1e3:14.2f}" for s in sides))
    for side in sides:
        r = result[side]
        print(f"{side}: fixed {r['fixed_s'] * 1e3:.2f} ms + {r['per_row_s'] * 1e3:.3f} ms per row; "
              f"outside array kernels at B=1: {r['fixed_share_at_b1']:.0%}")
    print(f"minift records {ops} ops per step: {result['minift']['fixed_us_per_op']:.1f} us of fixed cost per op "
          "(forward node + its backward + the optimizer's share)")
    RESULTS.mkdir(exist_ok=True)
    summary = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores, 1 thread", "shape": SHAPE, "seq": SEQ, **result}
    (RESULTS / "autograd_overhead.json").write_text(json.dumps(summary, indent=2))
    plot(result, sides, RESULTS / "autograd_overhead.png")


def plot(result: dict, sides, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for side in sides:
        r = result[side]
        ax.plot(BATCHES, [r["seconds"][b] * 1e3 for b in BATCHES], "o", label=f"{side} (measured)")
        ax.plot(BATCHES, [(r["fixed_s"] + r["per_row_s"] * b) * 1e3 for b in BATCHES], "-", alpha=0.6,
                label=f"{side}: {r['fixed_s'] * 1e3:.1f} ms fixed + {r['per_row_s'] * 1e3:.2f} ms/row")
    ax.set_xlabel(f"batch rows (x {SEQ} tokens)")
    ax.set_ylabel("ms per training step")
    ax.set_title("A tiny Llama: fixed (dispatch) cost vs work that grows with data")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
