"""One LoRA training step on SmolLM2-135M, minift vs PyTorch + PEFT, side by side in one run.

    python benchmarks/lora_step_vs_torch.py [--steps 3] [--threads 2]

Same weights (the GGUF, dequantized to float32 by each side), same batch of 4 x 128 random
token ids, LoRA r=8, alpha=16 on q, k, v, o, AdamW lr 1e-4, gradient clipping at 1.0. One step is
forward, cross-entropy, backward, clip, AdamW update, zero_grad. The first step of each side
is a warm-up and not counted; the median of the next ``--steps`` is reported, with the ratio.
Both sides get the same number of BLAS / intra-op threads. Needs the ``interop`` extra.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BATCH, SEQ = 4, 128


def median_step_seconds(step, steps: int) -> float:
    step()  # warm-up: allocations, caches
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def minift_step(ids, targets):
    import minift.functional as F
    from minift import load_pretrained
    from minift.optim import AdamW, clip_grad_norm_
    from minift.peft import LoraConfig, get_peft_model

    model, _ = load_pretrained("smollm2")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    params = model.parameters(trainable_only=True)
    optimizer = AdamW(params, lr=1e-4, weight_decay=0.0)

    def step():
        F.cross_entropy(model(ids), targets).backward()
        clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step


def torch_step(ids, targets):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from minift.hub import fetch

    gguf = fetch("smollm2")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids_t, targets_t = torch.from_numpy(ids), torch.from_numpy(targets)

    def step():
        logits = model(ids_t).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets_t.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49152, (BATCH, SEQ))
    targets = rng.integers(0, 49152, (BATCH, SEQ))
    with threadpool_limits(args.threads):
        ours = median_step_seconds(minift_step(ids, targets), args.steps)
    theirs = median_step_seconds(torch_step(ids, targets), args.steps)
    result = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{args.threads} threads", "batch": f"{BATCH}x{SEQ}", "minift_s": ours, "torch_peft_s": theirs,
              "ratio_minift_over_torch": ours / theirs, "tokens_per_s_minift": BATCH * SEQ / ours,
              "tokens_per_s_torch": BATCH * SEQ / theirs}
    out = Path(__file__).parent / "results" / "lora_step_vs_torch.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"LoRA step, SmolLM2-135M, batch {BATCH}x{SEQ}, {args.threads} threads, median of {args.steps}:")
    print(f"  minift          {ours:7.2f} s   ({BATCH * SEQ / ours:6.0f} tokens/s)")
    print(f"  PyTorch + PEFT  {theirs:7.2f} s   ({BATCH * SEQ / theirs:6.0f} tokens/s)")
    print(f"  ratio minift / PyTorch = {ours / theirs:.2f}   (written to {out})")


if __name__ == "__main__":
    main()
