"""Multi-LoRA serving throughput: one mixed batch vs one batch per adapter vs single requests.

    python benchmarks/serve_throughput.py [--requests 16] [--adapters 4] [--max-tokens 32] [--repeats 3]

N requests spread over K adapters (ranks 4, 8, 16, ...) on a small random Llama, greedy, no eos
(every request makes exactly --max-tokens tokens). Scenarios:

    mixed batch        all N rows in one batch, each row gathers its own adapter (Punica/S-LoRA)
    mixed, K/2 slots   the same requests with half the slots: the batch is split, adapters reload
    per-adapter        K batches, each holding the rows of one adapter
    single             N batches of one request (no batching at all)
    base only          all N rows in one batch without any adapter: the cost of LoRA itself

Before any timing, every scenario's tokens are checked equal to the single-request tokens.
Each scenario runs once to warm up (adapters get loaded into slots), then all are timed in turn,
--repeats rounds; the fastest round of each counts. Writes benchmarks/results/serve_throughput.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np

from minift.models import LlamaForCausalLM
from minift.serve.engine import Request, build_engine
from minift.studies.serve_bench import bench_config, synthetic_setup

RESULTS = Path(__file__).parent / "results"


def make_requests(n: int, names: list[str], max_tokens: int, seed: int = 0) -> list[Request]:
    """Prompts of 8-40 byte tokens, adapters assigned round-robin."""
    rng = np.random.default_rng(seed)
    return [Request(rng.integers(32, 127, rng.integers(8, 41)).tolist(), names[i % len(names)], max_tokens)
            for i in range(n)]


def run(engine, groups) -> tuple[list[list[int]], int]:
    """Generate every group as its own call; -> (tokens per request in order, total tokens)."""
    outputs = [c.tokens for group in groups for c in engine.generate(group)]
    return outputs, sum(len(t) for t in outputs)


def measure(cases: dict, repeats: int) -> list[dict]:
    """Warm every scenario up once (slot loads, first-touch allocations), then time them in turn,
    ``repeats`` rounds, so that a burst of load from other processes hits all of them alike.
    The fastest round of each counts; batches run and adapters loaded are counted per round."""
    for engine, groups in cases.values():
        run(engine, groups)
    results = {name: {"scenario": name, "seconds": float("inf")} for name in cases}
    for _ in range(repeats):
        for name, (engine, groups) in cases.items():
            batches, misses = len(engine.batch_sizes), engine.slots.stats.misses
            start = time.perf_counter()
            tokens = run(engine, groups)[1]
            seconds = time.perf_counter() - start
            r = results[name]
            r.update(batches=len(engine.batch_sizes) - batches, adapter_loads=engine.slots.stats.misses - misses,
                     tokens=tokens, seconds=min(r["seconds"], seconds))
            r["tokens_per_s"] = tokens / r["seconds"]
    return list(results.values())


def scenarios(requests, names, engine, engine_half) -> dict:
    """name -> (engine, list of request groups, each one ``generate`` call)."""
    return {
        "mixed batch": (engine, [requests]),
        f"mixed, {engine_half.slots.n_slots} slots": (engine_half, [requests]),
        "per-adapter batches": (engine, [[r for r in requests if r.adapter == a] for a in names]),
        "single requests": (engine, [[r] for r in requests]),
        "base only (no LoRA)": (engine, [[replace(r, adapter=None) for r in requests]]),
    }


def check(cases: dict, requests) -> None:
    """Every scenario with adapters must give each request the tokens it gets alone."""
    engine, _ = cases["single requests"]
    alone = run(engine, [[r] for r in requests])[0]
    for name, (eng, groups) in cases.items():
        if name.startswith("base"):
            continue
        order = [id(r) for g in groups for r in g]
        got = dict(zip(order, run(eng, groups)[0]))
        if [got[id(r)] for r in requests] != alone:
            sys.exit(f"check failed: scenario {name!r} changes some request's tokens")


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def blas_env() -> list[str]:
    """The BLAS thread settings of this run (they change CPU timings; worth recording)."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    return [f"{n}={os.environ[n]}" for n in names if n in os.environ]


def plot(report: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = [r["scenario"] for r in report["results"]]
    values = [r["tokens_per_s"] for r in report["results"]]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(names[::-1], values[::-1], color="#4c72b0")
    for y, v in enumerate(values[::-1]):
        ax.text(v, y, f" {v:.0f}", va="center")
    c = report["config"]
    ax.set_xlim(0, max(values) * 1.15)
    ax.set_xlabel("generated tokens / s (higher is better)")
    ax.set_title(f"{c['requests']} requests over {c['adapters']} LoRA adapters, {c['max_tokens']} tokens each")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def engines(folder, n_adapters: int, n_requests: int):
    """-> (engine with K slots, engine with K/2 slots on an identical model, adapter names, vocab size)."""
    model, tok, folders = synthetic_setup(folder, n_adapters)
    engine = build_engine(model, folders, n_slots=n_adapters, max_batch=n_requests)
    twin = LlamaForCausalLM(bench_config(tok.vocab_size), seed=0)  # same weights, its own slots
    half = build_engine(twin, folders, n_slots=max(1, n_adapters // 2), max_batch=n_requests)
    return engine, half, sorted(folders), tok.vocab_size


def print_table(results: list[dict]) -> None:
    print(f"{'scenario':<24}{'batches':>8}{'loads':>7}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}")
    for r in results:
        print(f"{r['scenario']:<24}{r['batches']:>8}{r['adapter_loads']:>7}{r['tokens']:>8}{r['seconds']:>9.3f}"
              f"{r['tokens_per_s']:>10.1f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        engine, half, names, vocab_size = engines(tmp, args.adapters, args.requests)
    requests = make_requests(args.requests, names, args.max_tokens)
    cases = scenarios(requests, names, engine, half)
    check(cases, requests)
    results = measure(cases, args.repeats)
    print_table(results)
    config = {**vars(args), "ranks": [engine.library[n].rank for n in names], "slots": args.adapters,
              "model": bench_config(vocab_size).to_dict()}
    report = {"date": date.today().isoformat(), "machine": f"{cpu_name()}, {os.cpu_count()}-core CPU",
              "command": " ".join([*blas_env(), "python benchmarks/serve_throughput.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "config": config, "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS / "serve_throughput.png")
    print(f"wrote {RESULTS / 'serve_throughput.json'} and {RESULTS / 'serve_throughput.png'}")


if __name__ == "__main__":
    main()
