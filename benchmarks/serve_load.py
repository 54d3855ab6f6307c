"""Continuous vs static batching under open-loop Poisson load, at three arrival rates.

    python benchmarks/serve_load.py [--rates 4,16,64] [--requests 48] [--batching static,continuous]

Static batching runs a batch to its end: a request that arrives meanwhile waits for the whole
batch, however long its longest row. Continuous (iteration-level) batching lets it join at the
next decode step and lets a finished row leave at once (Orca, Yu et al., OSDI 2022; vLLM).
The difference shows in time-to-first-token and latency as the rate rises.

For each rate, both servers get the same schedule (``minift.studies.serve_bench.load_schedule``,
one seed): the same arrival times, adapters (4 random ones plus the base model), prompt lengths
and ``max_tokens``. Each run gets a fresh engine on identical weights; the kinds are interleaved
rate by rate so that a burst of load from other processes hits both alike. Writes
benchmarks/results/serve_load.{json,png} and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import date
from pathlib import Path

from serve_throughput import blas_env, cpu_name

from minift.serve.engine import build_engine
from minift.studies.serve_bench import LoadSpec, run_load, synthetic_setup

RESULTS = Path(__file__).parent / "results"


def measure(args) -> list[dict]:
    """One run per (rate, batching kind), each on a fresh engine; -> the reports in that order."""
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for rate in args.rates:
            spec = LoadSpec(args.requests, rate, args.prompt_words, args.max_tokens, args.base_share, args.seed)
            for batching in args.batching:
                model, tok, adapters = synthetic_setup(tmp, args.adapters)  # identical weights every time
                engine = build_engine(model, adapters, args.slots, args.max_batch, tok.eos_id)
                report = run_load(engine, tok, spec, batching)
                print(f"rate {rate:g}/s, {batching}: {report['completed']}/{report['requests']} completed, "
                      f"{report['tokens_per_s']:.0f} tokens/s", flush=True)
                reports.append(report)
    return reports


def table(reports: list[dict]) -> str:
    lines = ["| rate (req/s) | batching | completed | tokens/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms "
             "| latency p99 ms | batches (mean rows) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        sizes = r["server_stats"].get("batch_sizes", [])
        mean_rows = sum(sizes) / len(sizes) if sizes else float("nan")
        lines.append(f"| {r['spec']['rate']:g} | {r['batching']} | {r['completed']}/{r['requests']} "
                     f"| {r['tokens_per_s']:.0f} | {r['ttft_s']['p50'] * 1e3:.0f} | {r['ttft_s']['p99'] * 1e3:.0f} "
                     f"| {r['latency_s']['p50'] * 1e3:.0f} | {r['latency_s']['p99'] * 1e3:.0f} "
                     f"| {len(sizes)} ({mean_rows:.1f}) |")
    return "\n".join(lines)


def offered_tokens_per_s(report: dict) -> float:
    """What the schedule asks for: the rate times the mean ``max_tokens`` of its requests."""
    outcomes = report["outcomes"]
    return report["spec"]["rate"] * sum(o["max_tokens"] for o in outcomes) / len(outcomes)


def plot(reports: list[dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = {"static": "#c44e52", "continuous": "#4c72b0"}
    for kind in dict.fromkeys(r["batching"] for r in reports):
        runs = [r for r in reports if r["batching"] == kind]
        rates = [r["spec"]["rate"] for r in runs]
        for ax, key in zip(axes[:2], ("ttft_s", "latency_s")):
            ax.plot(rates, [r[key]["p50"] * 1e3 for r in runs], "o-", color=colors[kind], label=f"{kind} p50")
            ax.plot(rates, [r[key]["p99"] * 1e3 for r in runs], "s--", color=colors[kind], label=f"{kind} p99")
        axes[2].plot(rates, [r["tokens_per_s"] for r in runs], "o-", color=colors[kind], label=kind)
    axes[2].plot(rates, [offered_tokens_per_s(r) for r in runs], ":", color="gray", label="offered")
    titles = ("time to first token", "end-to-end latency", "throughput")
    for ax, title, unit in zip(axes, titles, ("ms (lower is better)", "ms (lower is better)", "output tokens / s")):
        ax.set_xscale("log")
        ax.set_xticks(rates, [f"{rate:g}" for rate in rates])
        ax.minorticks_off()
        ax.set_xlabel("arrival rate (requests / s)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    spec = reports[0]["spec"]
    fig.suptitle(f"{spec['requests']} Poisson-arrival requests per run, {spec['max_tokens'][0]}-"
                 f"{spec['max_tokens'][1]} tokens each, mixed adapters")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",")]


def _ints(text: str) -> tuple[int, int]:
    low, high = (int(part) for part in text.split(","))
    return low, high


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=_floats, default=[4.0, 16.0, 64.0], help="arrival rates, requests/s")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--batching", type=lambda s: s.split(","), default=["static", "continuous"])
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-tokens", type=_ints, default=(8, 32))
    p.add_argument("--prompt-words", type=_ints, default=(2, 20))
    p.add_argument("--base-share", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    reports = measure(args)
    load_after = os.getloadavg()
    print(table(reports))
    result = {"date": date.today().isoformat(), "machine": f"{cpu_name()}, {os.cpu_count()}-core CPU",
              "load_average_1_5_15": {"before": load_before, "after": load_after},
              "command": " ".join([*blas_env(), "python benchmarks/serve_load.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "runs": reports}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(reports, RESULTS / "serve_load.png")
    print(f"load average before {load_before}, after {load_after}")
    print(f"wrote {RESULTS / 'serve_load.json'} and {RESULTS / 'serve_load.png'}")


if __name__ == "__main__":
    main()
