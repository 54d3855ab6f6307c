"""``minift demo``: the whole story of fine-tuning on a laptop, in a few minutes.

1. Pretrain a tiny byte-level Llama on the bundled general-English corpus: the "pretrained
   model" that already knows some language.
2. Fine-tune copies of it on the bundled insurer instruction set with each of the seven methods
   (full, frozen bottom blocks, last-layer tuning, LoRA, QLoRA, adapters, prefixes), the loss
   masked on prompt tokens: the comparison of ``minift.studies.experiment``.
3. Show what changed: answers before/after, the domain loss (learning), the perplexity on
   held-out general text and the general-fact accuracy (forgetting, lecture 000), as a table
   and a plot, and how low-rank the full fine-tuning's weight change is.

Every model ends in a folder ``minift generate --model <out>/<method>`` loads: the pretrained
base and each fine-tuned copy as a Hugging Face folder (LoRA and QLoRA merged in), adapters and
prefixes in minift's own format (a Llama ``config.json`` cannot describe their extra modules).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from minift.data import ByteTokenizer, DataLoader, TextDataset, bundled_path, load_jsonl
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.nn import dequantize_model
from minift.peft import PeftModel
from minift.peft.delta import delta_report
from minift.studies.experiment import (
    TINY_MODEL_LEARNING_RATES,
    Recipe,
    Yardsticks,
    compare_methods,
    first,
    general_sets,
    insurer_sets,
)
from minift.training import TrainConfig, Trainer
from minift.training.methods import MethodOptions
from minift.training.pretrained import save_pretrained

SYSTEM_PROMPT = "You are the assistant of Northwind Mutual, an insurance company."


@dataclass
class DemoSettings:
    """The demo's knobs: the defaults take a few minutes on a laptop, ``fast()`` seconds."""

    pretrain_steps: int = 300
    finetune_steps: int = 70
    methods: tuple[str, ...] = ("full", "freeze", "last", "lora", "qlora", "adapter", "prefix")
    block_size: int = 128
    batch_size: int = 16  # of pretraining; fine-tuning takes batches of 8
    eval_examples: int | None = None  # None: the whole held-out sets
    seed: int = 0

    @classmethod
    def fast(cls) -> DemoSettings:
        """A seconds-long run for tests and CI: same code path, fewer steps, smaller evals."""
        return cls(pretrain_steps=20, finetune_steps=8, block_size=64, batch_size=4, eval_examples=16)

    def recipe(self, train_set, out_dir: Path, progress: bool) -> Recipe:
        """Fine-tuning of every copy: batches of 8, linear decay at the tiny model's rates, each
        method's curves under ``out_dir/<method>``."""
        return Recipe(train_set, self.finetune_steps, 8, TINY_MODEL_LEARNING_RATES, "linear", self.seed, progress,
                      out_dir)

    def yardsticks(self, tokenizer, eval_set) -> Yardsticks:
        """The first ``eval_examples`` of each held-out set (all for None), 16 to a batch."""
        n = self.eval_examples
        qa, general = general_sets(tokenizer, self.block_size, 16, blocks=n, questions=n)
        return Yardsticks(DataLoader(first(eval_set, n), 16, shuffle=False, pad_id=tokenizer.pad_id), general, qa)


def tiny_config(vocab_size: int) -> LlamaConfig:
    """A Llama small enough to pretrain in minutes on a CPU, with every part of a real one (GQA, SwiGLU)."""
    return LlamaConfig(vocab_size=vocab_size, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                       ffn_dim=352, max_seq_len=384)


def answer(model, tokenizer, question: str, max_new_tokens: int = 80) -> str:
    """Greedy reply of ``model`` to one user message, rendered with the chat template."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}],
        add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    room = model.config.max_seq_len - len(ids)
    out = model.generate([ids], min(max_new_tokens, room), eos_id=tokenizer.eos_id)[0]
    return tokenizer.decode(out.tolist(), skip_special=True).strip()


def pretrain(settings: DemoSettings, tokenizer, out_dir: Path, progress: bool):
    """A tiny model trained on general English and saved to ``out_dir/pretrained``: the base
    every method fine-tunes, with some general knowledge for fine-tuning to lose."""
    text = bundled_path("general_corpus.txt").read_text(encoding="utf-8")
    loader = DataLoader(TextDataset(text, tokenizer, settings.block_size), settings.batch_size,
                        seed=settings.seed, pad_id=tokenizer.pad_id)
    model = LlamaForCausalLM(tiny_config(tokenizer.vocab_size), seed=settings.seed)
    config = TrainConfig(max_steps=settings.pretrain_steps, lr=3e-3, warmup_ratio=0.05, schedule="cosine",
                         weight_decay=0.1, out_dir=str(out_dir / "pretrain"), progress=progress)
    Trainer(model, config, loader).train()
    save_pretrained(model, tokenizer, out_dir / "pretrained")
    return model


def save_finetuned(model, tokenizer, method: str, folder: Path) -> None:
    """Leave a copy fine-tuned with ``method`` (by ``compare_methods``, default options) in
    ``folder``, loadable by ``minift generate``: a LoRA merged into its base (a QLoRA one into
    the dequantized base), so the folder is a plain Hugging Face one; adapters and prefixes with
    the record of their surgery, in minift's format."""
    if isinstance(model, PeftModel):
        dequantize_model(model)
        model = model.merge_and_unload()
    surgery = {"method": method, **asdict(MethodOptions())} if method in ("adapter", "prefix") else None
    save_pretrained(model, tokenizer, folder, surgery=surgery)


def run_demo(out_dir: str | Path = "runs/demo", settings: DemoSettings | None = None,
             progress: bool = True) -> dict:
    """Pretrain, fine-tune a copy per method, report; returns the numbers and answers per model."""
    settings = settings or DemoSettings()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    tok = ByteTokenizer()
    print("== 1. pretraining a tiny Llama on general English (the 'pretrained model')")
    base = pretrain(settings, tok, out_dir, progress)
    train_set, eval_set = insurer_sets(tok, base.config.max_seq_len, SYSTEM_PROMPT)
    questions = [_question(r) for r in load_jsonl(bundled_path("insurer_eval.jsonl"))[:2]]
    print("\n== 2. fine-tuning a copy of the pretrained model with each method")
    runs = compare_methods(base, tok, settings.methods, settings.recipe(train_set, out_dir, progress),
                           settings.yardsticks(tok, eval_set))
    results = {}
    for name, model, numbers, _ in runs:
        results[name] = {**numbers, "answers": [answer(model, tok, q) for q in questions]}
        if name == "full":
            report_delta(delta_report(base.state_dict(), model), out_dir / "delta_spectrum.png")
        if name != "pretrained":
            save_finetuned(model, tok, name, out_dir / name)
    report(results, questions, out_dir)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; outputs in {out_dir}/")
    return results


def _question(record: dict) -> str:
    """The first user message of a bundled record, in either of its formats (chat or Alpaca)."""
    if "messages" in record:
        return next(m["content"] for m in record["messages"] if m["role"] == "user")
    return record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")


def report(results: dict, questions: list[str], out_dir: Path) -> None:
    """Print the before/after answers and the learning-vs-forgetting table; save JSON and a plot."""
    print("\n== 3. what changed")
    for i, q in enumerate(questions):
        print(f"\nQ: {q}")
        for name, r in results.items():
            print(f"  [{name:>10}] {r['answers'][i][:160]!r}")
    print(f"\n{'method':>10} | {'trainable %':>11} | {'domain loss':>11} | {'general ppl':>11} | {'facts %':>7}")
    for name, r in results.items():
        print(f"{name:>10} | {r['trainable_pct']:11.1f} | {r['domain_loss']:11.3f} | {r['general_ppl']:11.2f} | "
              f"{100 * r['qa_accuracy']:7.1f}")
    print("(domain loss down = learned the insurer; general perplexity up or facts down = forgot)")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot_results(results, out_dir / "forgetting.png")


def report_delta(rows: list[dict], path: Path) -> None:
    """LoRA's premise checked on this run: how low-rank is what full fine-tuning changed?
    One line per kind of matrix (q_proj, ..., down_proj), averaged over the blocks."""
    ranks = sorted(rows[0]["captured"])
    kinds: dict[str, list[dict]] = {}
    for row in rows:
        kinds.setdefault(row["name"].split(".")[-2], []).append(row)
    print("\nΔW = W_full - W_pretrained, averaged over the blocks (lecture 004's low-rank claim):")
    print(f"{'matrix':>10} | {'shape':>8} | eff.rank (90%) | " + " | ".join(f"rank {r:>2}" for r in ranks))
    for kind, group in kinds.items():
        eff = sum(r["effective_rank_90"] for r in group) / len(group)
        shares = " | ".join(f"{100 * sum(r['captured'][k] for r in group) / len(group):6.1f}%" for k in ranks)
        shape = "x".join(map(str, group[0]["shape"]))
        print(f"{kind:>10} | {shape:>8} | {eff:6.1f} of {group[0]['full_rank']:<4} | {shares}")
    print("(rank r: the largest share of ||ΔW||² a rank-r LoRA update could express — Eckart-Young)")
    plot_spectra(rows, path)


def plot_spectra(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure  # noqa: PLC0415 - no pyplot: keeps the caller's backend

    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    for row in rows:
        s = row["singular_values"]
        ax.semilogy(range(1, len(s) + 1), s / max(s[0], 1e-30), alpha=0.5)
    ax.set(xlabel="singular value index", ylabel="s_i / s_1 (log)", title="spectrum of ΔW after full fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_results(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # noqa: PLC0415 - no pyplot: keeps the caller's backend

    names = list(results)
    fig = Figure(figsize=(13, 3.6))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.bar(names, [results[n]["domain_loss"] for n in names], color="tab:blue")
    ax1.set(title="domain loss (lower = learned)", ylabel="nats / token")
    ax2.bar(names, [results[n]["general_ppl"] for n in names], color="tab:red")
    ax2.set(title="general-text perplexity (higher = forgot)")
    ax3.bar(names, [100 * results[n]["qa_accuracy"] for n in names], color="tab:green")
    ax3.set(title="general facts, cloze accuracy % (lower = forgot)")
    for ax in (ax1, ax2, ax3):
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
