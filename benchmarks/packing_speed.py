"""Real tokens per second of a training step, padded vs packed (issue 19), on the bundled insurer set.

    python benchmarks/packing_speed.py [--tiny-steps 6] [--smollm2-steps 2] [--packed-batch 8] \
        [--threads 1] [--out FILE.json]

One step is forward + backward of ``causal_lm_loss`` (the Trainer's loss), from ``zero_grad`` to
the last gradient; the optimizer update is left out, as it costs the same for both. Three kinds of
step, taken in turn on the first epoch's batches so that the machine's load falls on all alike:

* **padded**: batches of 8 examples, each as wide as its longest (``DataLoader``, ``collate``);
* **packed, full rows**: the packed rows (``pack_examples``, first-fit decreasing) attended over the
  whole row under the block-diagonal ``segment_mask``: the reference, the path before issue 19's
  segment attention;
* **packed, segment blocks**: the same packed batches through ``SegmentAttention``, which computes
  only each example's own causal block (what ``minift finetune --packing`` runs).

A packed batch holds 8 rows too by default, as with ``minift finetune --packing --batch-size 8``,
so a packed step carries three to four times the real tokens of a padded one; ``--packed-batch 2``
gives it about a padded batch's real tokens instead. Real tokens are the
``attention_mask`` True cells; the rate is their sum over the timed steps divided by the time
those steps took (the first step of each kind is a warm-up and is not timed), wall-clock and CPU
time of this process (``time.process_time``). On a machine shared with other programs the
CPU-time rate is the steadier one; one BLAS thread (the default) keeps it honest (a second
thread that busy-waits for a taken core bills spinning as work). Freed memory is kept for reuse
(``keep_freed_memory``), as the Trainer runs.

Models: the demo's tiny model (``tiny_config``, byte tokenizer,
384-token rows, every weight trained) and SmolLM2-135M with LoRA r=8 on q, k, v, o (its default
system prompt, as ``minift finetune --model smollm2`` renders, 256-token rows). Prints a table
for docs/benchmarks.md and ``uptime`` before and after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from itertools import cycle, islice
from unittest.mock import patch

import numpy as np
from threadpoolctl import threadpool_limits

from minift.allocator import keep_freed_memory
from minift.autograd.attention import segment_mask
from minift.data import ByteTokenizer, DataLoader, InstructionDataset, bundled_path, collate_packed, pack_examples
from minift.data.packing import padding_share
from minift.models import LlamaForCausalLM
from minift.studies.demo import tiny_config
from minift.training.methods import MethodOptions, prepare_model
from minift.training.pretrained import load_pretrained
from minift.training.trainer import causal_lm_loss

PADDED_BATCH = 8
KINDS = ("padded", "packed, full rows", "packed, segment blocks")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def tiny_setup():
    tok = ByteTokenizer()
    model = LlamaForCausalLM(tiny_config(tok.vocab_size), seed=0)
    return "tiny (dim 128, 4 blocks), full", model, tok, None, model.config.max_seq_len


def smollm2_setup():
    model, tok = load_pretrained("smollm2")
    model, _ = prepare_model(model, "lora", MethodOptions(lora_r=8, lora_alpha=16))
    return "SmolLM2-135M, LoRA r=8", model, tok, tok.default_system_prompt, 256


def step_seconds(model, batch, full_rows: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of forward + backward of one batch; ``full_rows``: the reference
    attention under ``segment_mask``."""
    start, cpu_start = time.perf_counter(), time.process_time()
    model.zero_grad()
    if full_rows:
        reference = segment_mask(batch["segment_ids"])
        with patch.object(LlamaForCausalLM, "_packed_layout", lambda *args: reference):
            causal_lm_loss(model, batch).backward()
    else:
        causal_lm_loss(model, batch).backward()
    return time.perf_counter() - start, time.process_time() - cpu_start


def measure(setup, steps: int, packed_batch: int) -> dict:
    name, model, tok, system, pack_len = setup()
    dataset = InstructionDataset(bundled_path("insurer_train.jsonl"), tok, model.config.max_seq_len,
                                 system_prompt=system)
    rows = pack_examples(dataset, pack_len)
    padded = list(DataLoader(dataset, PADDED_BATCH, seed=0, pad_id=tok.pad_id))
    packed = list(DataLoader(rows, packed_batch, seed=0, pad_id=tok.pad_id, collate_fn=collate_packed))
    seconds, cpu_seconds, tokens = dict.fromkeys(KINDS, 0.0), dict.fromkeys(KINDS, 0.0), dict.fromkeys(KINDS, 0)
    for i, (plain, rows_batch) in enumerate(islice(zip(cycle(padded), cycle(packed)), steps + 1)):
        for kind, batch in zip(KINDS, (plain, rows_batch, rows_batch)):
            wall, cpu = step_seconds(model, batch, full_rows=kind == "packed, full rows")
            if i:  # the first step of each kind warms up
                seconds[kind] += wall
                cpu_seconds[kind] += cpu
                tokens[kind] += int(np.asarray(batch["attention_mask"]).sum())
        print(f"  {name}: step {i} done", flush=True)
    return {"model": name, "pack_len": pack_len, "packed_batch": packed_batch, "timed_steps": steps,
            "real_tokens": tokens, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "tokens_per_s": {kind: tokens[kind] / seconds[kind] for kind in KINDS},
            "tokens_per_cpu_s": {kind: tokens[kind] / cpu_seconds[kind] for kind in KINDS},
            "padding": {"padded": padding_share(padded), "packed": padding_share(packed)},
            "batch_shapes": {"padded": [list(b["input_ids"].shape) for b in padded[:steps + 1]],
                             "packed": [list(b["input_ids"].shape) for b in packed[:steps + 1]]}}


def table(results: list[dict]) -> str:
    """Real tokens per wall-clock second (per CPU second in brackets)."""
    lines = ["| model | padding padded → packed | padded | packed, full rows | packed, segment blocks | "
             "blocks / padded |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        wall, cpu = r["tokens_per_s"], r["tokens_per_cpu_s"]
        lines.append(f"| {r['model']}, {r['packed_batch']} × {r['pack_len']}-token rows, {r['timed_steps']} steps | "
                     f"{r['padding']['padded']:.1%} → {r['padding']['packed']:.1%} | "
                     + " | ".join(f"{wall[k]:,.0f} ({cpu[k]:,.0f}) tok/s" for k in KINDS)
                     + f" | {wall[KINDS[2]] / wall[KINDS[0]]:.2f}× ({cpu[KINDS[2]] / cpu[KINDS[0]]:.2f}×) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-steps", type=int, default=6, help="timed steps of each kind on the tiny model")
    parser.add_argument("--smollm2-steps", type=int, default=2, help="timed steps of each kind on SmolLM2 (0: skip)")
    parser.add_argument("--packed-batch", type=int, default=PADDED_BATCH, help="packed rows per batch")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    keep_freed_memory()
    load_before = uptime()
    print(f"uptime before: {load_before}", flush=True)
    with threadpool_limits(args.threads):
        results = [measure(tiny_setup, args.tiny_steps, args.packed_batch)]
        if args.smollm2_steps:
            results.append(measure(smollm2_setup, args.smollm2_steps, args.packed_batch))
    load_after = uptime()
    print(f"uptime after: {load_after}")
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"uptime_before": load_before, "uptime_after": load_after, "blas_threads": args.threads,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
