"""4-bit quantization study: error per block size of NF4 vs affine Q4_1 vs int4, and what merging a
QLoRA adapter does to the logits.

    python benchmarks/quant_study.py [--smollm2] [--tokens 32]

1. Round-trip error of each format at every bitsandbytes block size (``minift.quant.compare``),
   on N(0, 0.02) weights and, with --smollm2, on real weights (the q/k/v/o/gate/up/down weights
   of SmolLM2's first four blocks). SmolLM2 ships as a Q4_1 GGUF, so its weights already sit on a
   Q4_1 grid of 32-blocks: Q4_1 at block 32 reproduces them almost exactly, which says more about
   the file than about the formats — the Gaussian rows are the fair comparison.
2. Logit drift of the three ways to merge a QLoRA adapter (``minift.studies.qlora_merge``) on a small
   random Llama (random tokens) and, with --smollm2, on SmolLM2 (bundled held-out text); LoRA
   r=8 on q,k,v,o with a random B scaled to ||s B A|| = 0.02 ||W||.

Writes benchmarks/results/quant_study.json; prints the tables and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import date
from pathlib import Path

import numpy as np

from minift.data import bundled_path
from minift.models import ATTENTION_PROJECTIONS, LlamaConfig, LlamaForCausalLM
from minift.peft import LoraConfig
from minift.quant.compare import error_table, format_error_table
from minift.studies.qlora_merge import format_merge_drift, merge_drift

RESULTS = Path(__file__).parent / "results"


def smollm2_weights(model, blocks: int = 4) -> np.ndarray:
    """The block Linear weights of the first ``blocks`` blocks, flattened into one array."""
    names = [n for n, _ in model.named_parameters() if n.endswith("_proj.weight") and ".layers." in n
             and int(n.split(".layers.")[1].split(".")[0]) < blocks]
    params = dict(model.named_parameters())
    return np.concatenate([np.asarray(params[n].data).reshape(-1) for n in names])


def run_errors(label: str, weights: np.ndarray) -> list[dict]:
    print(f"\n== round-trip error, {label} ({weights.size:,} weights)")
    rows = error_table(weights)
    print(format_error_table(rows))
    return rows


def run_merge(label: str, model, ids) -> dict:
    print(f"\n== merging a QLoRA adapter, {label} (logits of {ids.shape[0]} x {ids.shape[1]} tokens; "
          f"||s B A|| = 0.02 ||W||)")
    rows = merge_drift(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(ATTENTION_PROJECTIONS)), ids)
    print(format_merge_drift(rows))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm2", action="store_true", help="also study the real SmolLM2-135M (fetched once)")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {date.today()}"
    print(f"machine: {machine}")
    gaussian = (np.random.default_rng(0).standard_normal(1 << 20) * 0.02).astype(np.float32)
    results = {"machine": machine, "errors": {"gaussian": run_errors("N(0, 0.02) weights", gaussian)}}
    small = LlamaForCausalLM(LlamaConfig(vocab_size=260, dim=256, n_layers=4, n_heads=4, n_kv_heads=2,
                                         ffn_dim=704, max_seq_len=128))
    ids = np.random.default_rng(0).integers(0, 260, (2, args.tokens))
    results["merge"] = {"small random llama": run_merge("small random Llama (dim 256, 4 blocks)", small, ids)}
    if args.smollm2:
        from minift import load_pretrained  # noqa: PLC0415 - fetches the model on first use

        model, tok = load_pretrained("smollm2")
        results["errors"]["smollm2"] = run_errors("SmolLM2 blocks 0-3 (Q4_1 in the GGUF)", smollm2_weights(model))
        text = bundled_path("general_heldout.txt").read_text()
        ids = np.asarray(tok.encode(text)[: 2 * args.tokens]).reshape(2, args.tokens)
        results["merge"]["smollm2"] = run_merge("SmolLM2-135M, held-out English text", model, ids)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quant_study.json").write_text(json.dumps(results, indent=1))
    print(f"\nwritten to {RESULTS / 'quant_study.json'}")


if __name__ == "__main__":
    main()
