"""A training step on SmolLM2-135M, minift vs PyTorch (+ PEFT, + bitsandbytes), side by side.

    python benchmarks/step_vs_torch.py [--methods full full8 lora qlora] [--steps 5] [--threads 2]
                                       [--checkpointing off on] [--allocators default keep]

Four methods on the same batch of 4 x 128 random token ids, float32, from the same weights
(the GGUF file, dequantized to float32 by each side):

* ``full``  — every parameter trained;
* ``full8`` — the same, with AdamW's moments stored in 8 bits (minift's ``AdamW8bit``,
  minift/optim/adamw8bit.py; bitsandbytes' ``AdamW8bit`` on the PyTorch side);
* ``lora``  — LoRA r=8, alpha=16 on q, k, v, o (PEFT on the PyTorch side);
* ``qlora`` — the same LoRA on a base whose seven linear layers per block are NF4 with double
  quantization, block 64 (bitsandbytes' ``Linear4bit`` on the CPU on the PyTorch side).

Every method also runs with gradient checkpointing on both sides (``--checkpointing on``):
minift's ``model.gradient_checkpointing_enable()`` (minift/autograd/checkpointing.py), and
transformers' ``gradient_checkpointing_enable()`` (``torch.utils.checkpoint`` around each decoder
layer). For LoRA and QLoRA the PyTorch side also calls ``enable_input_require_grads()`` before
``get_peft_model``, as PEFT's documentation says to: with a frozen embedding the checkpointed
layers' input would not require a gradient, and reentrant checkpointing would then skip the
backward through them (the LoRA weights would get no gradient).

One step is forward, cross-entropy, backward, gradient clipping at 1.0, AdamW, zero_grad. minift
trains as its Trainer does, with the head fused into the loss (``model.loss``: the (B, T, V) logits
are never whole); the PyTorch side computes the logits then the loss, as transformers' models do. Each
(side, method, checkpointing) runs in its own fresh process, so its peak resident memory is its own: the peak
is reset (``/proc/self/clear_refs``) once the model and optimizer exist, and read back after the
steps (after ``malloc_trim``, so what loading freed — the float weights replaced by NF4 codes —
is not counted). The first step is a warm-up; the median of the next ``--steps`` is reported. Both sides
get the same number of BLAS / intra-op threads, and a fresh process each, one after the other.

Every process runs twice: with glibc's default ``malloc`` settings and with
``minift.allocator.keep_freed_memory`` (freed memory kept for reuse, see minift/allocator.py),
which changes how much time goes to page faults — for both libraries (``--allocators`` picks).

MFU (model FLOPs utilisation) = the FLOPs a step needs / step time / the machine's matmul peak.
The peak is measured here: the best of NumPy float32 products of SmolLM2's own shapes and a
2048^3 one. The FLOPs a step needs are counted from the architecture (``step_flops``): every
linear layer's forward (2 per weight per token), its input gradient (2 more) everywhere, its
weight gradient (2 more) only where the weight is trained, and the attention products. minift's
count of the matmuls it actually ran is printed beside it as a check. Checkpointing's recomputed
forward is not in the needed FLOPs: it is overhead, so it lowers the MFU, as it should.

Writes results/step_vs_torch.json and results/step_vs_torch.png. Needs the ``interop`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from minift.models import ATTENTION_PROJECTIONS, BLOCK_PROJECTIONS  # NumPy only: both sides may import it

METHODS = ("full", "full8", "lora", "qlora")
OPTIMIZER_8BIT = {"full8": "full"}  # a method that is another one with 8-bit AdamW moments
SIDES = ("minift", "torch")
ALLOCATORS = ("glibc default", "keep freed memory")
ALLOCATOR_FLAGS = {"default": ALLOCATORS[0], "keep": ALLOCATORS[1]}
CHECKPOINTING = {"off": False, "on": True}
TARGETS = list(ATTENTION_PROJECTIONS)
BATCH, SEQ, VOCAB = 4, 128, 49152
LR, LORA_R, LORA_ALPHA = 1e-4, 8, 16
RESULTS = Path(__file__).parent / "results"


# ---- what a step needs -------------------------------------------------------------------------
def step_flops(config, method: str, batch: int = BATCH, seq: int = SEQ, r: int = LORA_R) -> float:
    """FLOPs of one training step that any implementation must do (matrix products only).

    Per token, a weight of d_out x d_in costs 2 d_in d_out in the forward pass, as much again
    for the gradient of its input, and as much again for its own gradient if it is trained.
    Attention adds Q K^T and P V: 2 * 2 T d per query head and token forward, twice that
    backward. The embedding lookup costs none; the tied head is a d x V product. LoRA adds its
    thin products (forward, input and weight gradients, all trained).
    """
    tokens = batch * seq
    d, hd = config.dim, config.head_dim
    kv = config.n_kv_heads * hd
    block = {"q_proj": d * d, "k_proj": d * kv, "v_proj": d * kv, "o_proj": d * d,
             "gate_proj": d * config.ffn_dim, "up_proj": d * config.ffn_dim, "down_proj": d * config.ffn_dim}
    weights = config.n_layers * sum(block.values()) + config.vocab_size * d  # + the head
    trained = weights if OPTIMIZER_8BIT.get(method, method) == "full" else 0
    attention = config.n_layers * config.n_heads * 2 * 2 * seq * hd * tokens  # forward
    lora = config.n_layers * sum(r * (d + (kv if name in ("k_proj", "v_proj") else d)) for name in TARGETS)
    lora = 0 if trained else lora
    return tokens * (2 * weights + 2 * weights + 2 * trained + 3 * 2 * lora) + 3 * attention


def matmul_peak_gflops(threads: int) -> dict:
    """Best float32 GFLOP/s of NumPy's matmul on this machine, over SmolLM2's shapes and 2048^3."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    shapes = {"512x576 @ 576x1536": (512, 576, 1536), "512x1536 @ 1536x576": (512, 1536, 576),
              "512x576 @ 576x49152": (512, 576, 49152), "2048^3": (2048, 2048, 2048)}
    rates = {}
    with threadpool_limits(threads):
        for name, (m, k, n) in shapes.items():
            a = rng.standard_normal((m, k), dtype=np.float32)
            b = rng.standard_normal((k, n), dtype=np.float32)
            a @ b
            best = min(_seconds(lambda a=a, b=b: a @ b) for _ in range(5))
            rates[name] = 2 * m * k * n / best / 1e9
    return rates


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- one side, one method, in its own process ----------------------------------------------------
def minift_step(method: str, ids, targets, checkpointing: bool):
    from minift import load_pretrained
    from minift.autograd import elementwise
    from minift.optim import AdamW, AdamW8bit, clip_grad_norm_
    from minift.training.methods import MethodOptions, prepare_model

    base, _ = load_pretrained("smollm2")
    options = MethodOptions(lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_targets=tuple(TARGETS))
    model, _ = prepare_model(base, OPTIMIZER_8BIT.get(method, method), options)
    if checkpointing:
        model.gradient_checkpointing_enable()
    params = model.parameters(trainable_only=True)
    optimizer = (AdamW8bit if method in OPTIMIZER_8BIT else AdamW)(params, lr=LR, weight_decay=0.0)
    executed = [0.0]
    plain_matmul = elementwise.counted_matmul

    def counting_matmul(a, b):  # FLOPs of every product minift runs, for the table's check
        out = plain_matmul(a, b)
        executed[0] += 2.0 * out.size * a.shape[-1]
        return out

    def step():
        model.loss(ids, targets).backward()  # the head fused with the loss, as minift trains
        clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    def count_one_step() -> float:
        modules = [m for m in list(sys.modules.values()) if getattr(m, "counted_matmul", None) is plain_matmul]
        for module in modules:
            module.counted_matmul = counting_matmul
        try:
            step()
        finally:
            for module in modules:
                module.counted_matmul = plain_matmul
        return executed[0]

    return step, base.config, count_one_step


def torch_step(method: str, ids, targets, checkpointing: bool):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from minift.io.hub import fetch

    gguf = fetch("smollm2")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    if method == "qlora":
        quantize_linears_with_bitsandbytes(model)
    if checkpointing:
        model.gradient_checkpointing_enable()
        if method in ("lora", "qlora"):
            model.enable_input_require_grads()
    model.train()  # transformers checkpoints only in training mode (dropout is 0: nothing else changes)
    if method in ("lora", "qlora"):
        config = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS, lora_dropout=0.0)
        model = peft.get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    if method in OPTIMIZER_8BIT:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=LR, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    ids_t, targets_t = torch.from_numpy(ids), torch.from_numpy(targets)

    def step():
        logits = model(ids_t, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets_t.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step, None, None


def quantize_linears_with_bitsandbytes(model) -> None:
    """Swap every decoder linear layer for bitsandbytes' NF4 ``Linear4bit`` (double quant, block 64),
    the layers ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True)`` would give, made by hand on the model loaded from the GGUF file."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in BLOCK_PROJECTIONS:
                dense = getattr(parent, name, None)
                if dense is None:
                    continue
                quantized = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                                              compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
                quantized.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                                     compress_statistics=True, blocksize=64)
                setattr(parent, name, quantized.to("cpu"))
    for p in model.parameters():
        p.requires_grad_(False)


def rss_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS now, VmHWM peak since the last reset), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def release_free_memory() -> None:
    """glibc's ``malloc_trim(0)``: hand every free page of the heap back to the system."""
    import ctypes
    import ctypes.util

    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def worker(side: str, method: str, allocator: str, checkpointing: str, threads: int, steps: int) -> dict:
    import gc

    from threadpoolctl import threadpool_limits

    if side == "torch":
        import torch

        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (BATCH, SEQ))
    targets = rng.integers(0, VOCAB, (BATCH, SEQ))
    with threadpool_limits(threads):
        make_step = minift_step if side == "minift" else torch_step
        step, config, count_one_step = make_step(method, ids, targets, CHECKPOINTING[checkpointing])
        gc.collect()
        release_free_memory()  # loading's garbage (float weights replaced by NF4 codes) is not the method's
        if allocator == "keep freed memory":
            from minift.allocator import keep_freed_memory

            keep_freed_memory()
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := RSS now
        start_rss = rss_mib("VmRSS")
        step()  # warm-up: optimizer state, first-touch of every buffer
        times = [_seconds(step) for _ in range(steps)]
        result = {"side": side, "method": method, "allocator": allocator, "threads": threads,
                  "checkpointing": CHECKPOINTING[checkpointing],
                  "median_s": statistics.median(times), "times_s": times, "start_rss_mib": start_rss,
                  "peak_rss_mib": rss_mib("VmHWM")}
        if count_one_step is not None:
            result["executed_gflop"] = count_one_step() / 1e9
            result["needed_gflop"] = step_flops(config, method) / 1e9
    return result


# ---- the side-by-side run ------------------------------------------------------------------------
def run_in_fresh_process(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mode(row: dict) -> str:
    return "checkpointed" if row["checkpointing"] else "plain"


def print_table(rows: list[dict], peak: float) -> None:
    print(f"\nSmolLM2-135M, batch {BATCH}x{SEQ}, float32; MFU against a measured matmul peak of "
          f"{peak:.0f} GFLOP/s")
    print(f"{'method':7} {'mode':12} {'side':7} {'allocator':18} {'median s':>9} {'tokens/s':>9} "
          f"{'peak RSS MiB':>13} {'MFU':>6}")
    for row in rows:
        print(f"{row['method']:7} {_mode(row):12} {row['side']:7} {row['allocator']:18} {row['median_s']:9.2f} "
              f"{row['tokens_per_s']:9.0f} {row['peak_rss_mib']:13.0f} {row['mfu']:6.1%}")


def find(rows: list[dict], method: str, side: str, allocator: str, checkpointing: bool) -> dict | None:
    """The one row of this cell, or None where it was not run."""
    key = (method, side, allocator, checkpointing)
    return next((r for r in rows if (r["method"], r["side"], r["allocator"], r["checkpointing"]) == key), None)


def print_ratios(rows: list[dict], allocator: str) -> None:
    """The ratios issue 19 sets targets for, under one allocator setting."""
    print(f"\nratios ({allocator}):")
    for row in rows:
        if row["side"] != "minift" or row["allocator"] != allocator:
            continue
        peer = find(rows, row["method"], "torch", allocator, row["checkpointing"])
        plain = find(rows, row["method"], "minift", allocator, False)
        line = f"  {row['method']:6} {_mode(row):12}"
        if peer:
            line += (f" time {row['median_s'] / peer['median_s']:.2f}x PyTorch's,"
                     f" peak {row['peak_rss_mib'] / peer['peak_rss_mib']:.2f}x PyTorch's")
        if row["checkpointing"] and plain:
            line += f"; {row['median_s'] / plain['median_s']:.2f}x the plain step's time"
        lora = find(rows, "lora", "minift", allocator, False)
        if lora and row["method"] in ("lora", "qlora"):
            line += f"; peak {row['peak_rss_mib'] / lora['peak_rss_mib']:.2f}x plain LoRA's"
        print(line)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys((r["method"], r["checkpointing"]) for r in rows))
    series = list(dict.fromkeys((r["side"], r["allocator"]) for r in rows))
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(series)
    for i, (side, alloc) in enumerate(series):
        xs = np.arange(len(cells)) + (i - (len(series) - 1) / 2) * width
        chosen = [find(rows, m, side, alloc, ckpt) for m, ckpt in cells]
        label = f"{'minift' if side == 'minift' else 'PyTorch'}, {alloc}"
        ax_time.bar(xs, [r["median_s"] for r in chosen], width, label=label)
        ax_mem.bar(xs, [r["peak_rss_mib"] for r in chosen], width, label=label)
    names = [f"{m}\n+ ckpt" if ckpt else m for m, ckpt in cells]
    for ax, title in ((ax_time, "median step time (s)"), (ax_mem, "peak RSS during training (MiB)")):
        ax.set_xticks(range(len(cells)), names)
        ax.set_title(title)
    ax_time.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M training step, batch {BATCH}x{SEQ}, float32 (ckpt: gradient checkpointing)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", nargs="+", choices=list(CHECKPOINTING), default=list(CHECKPOINTING),
                        help="plain steps (off), gradient-checkpointed ones (on), or both")
    parser.add_argument("--allocators", nargs="+", choices=list(ALLOCATOR_FLAGS), default=list(ALLOCATOR_FLAGS),
                        help="glibc's default malloc settings, minift.allocator.keep_freed_memory, or both")
    parser.add_argument("--worker", nargs=4, metavar=("SIDE", "METHOD", "ALLOCATOR", "CHECKPOINTING"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, threads=args.threads, steps=args.steps)))
        return
    if args.peak:
        print(json.dumps(matmul_peak_gflops(args.threads)))
        return

    common = ["--threads", str(args.threads), "--steps", str(args.steps)]
    rates = run_in_fresh_process(["--peak", *common], args.threads)
    peak = max(rates.values())
    print("matmul GFLOP/s:", {k: round(v) for k, v in rates.items()})
    allocators = [ALLOCATOR_FLAGS[a] for a in args.allocators]
    rows = []
    for method in args.methods:
        for checkpointing in args.checkpointing:
            for allocator in allocators:
                for side in SIDES:
                    row = run_in_fresh_process(["--worker", side, method, allocator, checkpointing, *common],
                                               args.threads)
                    print(f"  {method:6} {_mode(row):12} {side:7} {allocator:18} {row['median_s']:.2f} s  "
                          f"peak RSS {row['peak_rss_mib']:.0f} MiB")
                    rows.append(row)
    needed = {r["method"]: r["needed_gflop"] for r in rows if "needed_gflop" in r}
    for row in rows:
        row["tokens_per_s"] = BATCH * SEQ / row["median_s"]
        row["mfu"] = needed[row["method"]] / row["median_s"] / peak
    print_table(rows, peak)
    for allocator in allocators:
        print_ratios(rows, allocator)
    for row in rows:
        if row["side"] == "minift" and row["allocator"] == allocators[-1]:
            print(f"  {row['method']} {_mode(row)}: minift ran {row['executed_gflop']:.1f} GFLOP of matmuls, "
                  f"the step needs {needed[row['method']]:.1f}")
    RESULTS.mkdir(exist_ok=True)
    summary = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores, {args.threads} threads", "batch": f"{BATCH}x{SEQ}",
               "load_average": os.getloadavg(), "matmul_gflops": rates, "peak_gflops": peak, "rows": rows}
    (RESULTS / "step_vs_torch.json").write_text(json.dumps(summary, indent=2))
    plot(rows, RESULTS / "step_vs_torch.png")
    print(f"written: {RESULTS / 'step_vs_torch.json'}, {RESULTS / 'step_vs_torch.png'}")


if __name__ == "__main__":
    main()
