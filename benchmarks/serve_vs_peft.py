"""Mixed-adapter batch generation: minift's serving engine vs PEFT's ``generate(adapter_names=...)``.

    python benchmarks/serve_vs_peft.py [--requests 16] [--adapters 4] [--max-new-tokens 32] [--repeats 3]

Both sides get the same model and the same requests: the small random Llama of the serving
benchmarks (``minift.studies.serve_bench.synthetic_setup``), written by minift as a Hugging Face
folder (``save_hf_folder``) for transformers, and the same random adapters, which minift writes in
PEFT's format and both sides read. PEFT's mixed-adapter batch inference splits the batch by
adapter inside every LoRA layer and runs each adapter's rows as one sub-batch; minift gathers
each row's factors from the device slots (Punica's BGMV, see docs/serving.md). Greedy, no eos
(every request makes exactly --max-new-tokens tokens), float32, left-padded prompts.

Before timing, every request's tokens are compared across the two sides (the agreement is
reported). Each side is warmed up once, then the two are timed in turn, --repeats rounds; the
fastest round of each counts. Writes benchmarks/results/serve_vs_peft.json. Needs the interop
extra (torch, transformers, peft).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import peft
import torch
import transformers
from serve_throughput import blas_env, cpu_name, make_requests
from threadpoolctl import threadpool_limits

from minift.io import save_hf_folder
from minift.serve.engine import build_engine
from minift.studies.serve_bench import synthetic_setup

RESULTS = Path(__file__).parent / "results"
PAD = 0  # any id: the attention mask hides it


def peft_model(hf_folder: Path, adapters: dict[str, Path]):
    """transformers' Llama from the exported folder, with every adapter loaded under its name."""
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    base.generation_config.eos_token_id = None  # as minift's engine without eos: exactly max_new_tokens
    names = sorted(adapters)
    model = peft.PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def peft_generate(model, requests, max_new_tokens: int) -> list[list[int]]:
    """One left-padded batch; PEFT's name for "no adapter" in ``adapter_names`` is ``__base__``."""
    width = max(len(r.prompt) for r in requests)
    ids = torch.tensor([[PAD] * (width - len(r.prompt)) + r.prompt for r in requests])
    mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in requests])
    names = [r.adapter or "__base__" for r in requests]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             adapter_names=names, pad_token_id=PAD)
    return out[:, width:].tolist()


def minift_generate(engine, requests) -> list[list[int]]:
    return [c.tokens for c in engine.generate(requests)]


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Requests with identical tokens, and tokens equal before each request's first difference."""
    def common_prefix(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    total = sum(len(t) for t in ours)
    return {"requests_identical": sum(a == b for a, b in zip(ours, theirs)), "requests": len(ours),
            "tokens_before_first_difference": sum(common_prefix(a, b) for a, b in zip(ours, theirs)),
            "tokens": total}


def rows_an_adapter_changes(engine, requests) -> int:
    """Adapter rows whose greedy tokens differ from the base model's: agreement means something
    only if the adapters change the output."""
    with_adapters = minift_generate(engine, requests)
    base = minift_generate(engine, [replace(r, adapter=None) for r in requests])
    return sum(r.adapter is not None and a != b for r, a, b in zip(requests, with_adapters, base))


def best_seconds(sides: dict, repeats: int) -> dict:
    """Warm each side up once, then time them in turn; -> {side: fastest seconds}."""
    for run in sides.values():
        run()
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(repeats):
        for name, run in sides.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def compare(engine, model, requests, max_new_tokens: int, repeats: int) -> dict:
    ours, theirs = minift_generate(engine, requests), peft_generate(model, requests, max_new_tokens)
    seconds = best_seconds({"minift": lambda: minift_generate(engine, requests),
                            "peft": lambda: peft_generate(model, requests, max_new_tokens)}, repeats)
    tokens = len(requests) * max_new_tokens
    return {"agreement": agreement(ours, theirs), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": {side: tokens / s for side, s in seconds.items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (minift) and intra-op threads (torch)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok, adapters = synthetic_setup(Path(tmp) / "adapters", args.adapters)
        hf_folder = save_hf_folder(model, tok, Path(tmp) / "hf")
        theirs = peft_model(hf_folder, adapters)
        engine = build_engine(model, adapters, n_slots=args.adapters, max_batch=args.requests, eos_id=None)
    names = sorted(adapters)
    mixed = make_requests(args.requests, [*names, None], args.max_new_tokens)  # every K+1-th row: the base
    base_only = make_requests(args.requests, [None], args.max_new_tokens)
    with threadpool_limits(args.threads):
        results = {"mixed batch": compare(engine, theirs, mixed, args.max_new_tokens, args.repeats),
                   "base only": compare(engine, theirs, base_only, args.max_new_tokens, args.repeats)}
        results["mixed batch"]["rows_an_adapter_changes"] = rows_an_adapter_changes(engine, mixed)
    changed = results["mixed batch"]["rows_an_adapter_changes"]
    print(f"adapter rows whose greedy tokens differ from the base model's: {changed}")
    print("| batch | requests identical | minift tokens/s | PEFT tokens/s | minift / PEFT |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        a, t = r["agreement"], r["tokens_per_s"]
        print(f"| {name} | {a['requests_identical']}/{a['requests']} | {t['minift']:.0f} | {t['peft']:.0f} "
              f"| {t['minift'] / t['peft']:.2f}x |")
    report = {"date": date.today().isoformat(), "machine": f"{cpu_name()}, {os.cpu_count()}-core CPU",
              "load_average_1_5_15": os.getloadavg(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__, "numpy": np.__version__},
              "command": " ".join([*blas_env(), "python benchmarks/serve_vs_peft.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "config": {**vars(args), "ranks": [engine.library[n].rank for n in names]}, "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_vs_peft.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS / 'serve_vs_peft.json'}")


if __name__ == "__main__":
    main()
