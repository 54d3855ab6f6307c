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

The run is a sequence of stages (pretraining, then one per method). Each finished stage leaves
its numbers in ``<out>/stages/<name>.json``, so an interrupted demo (Ctrl-C) continues with
``resume=True`` (``minift demo --resume``): finished stages are read back, the interrupted one
continues from its checkpoint, and the end result is the one an uninterrupted run gives.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from minift.data import ByteTokenizer, DataLoader, TextDataset, bundled_path, load_jsonl
from minift.io import atomic_write_bytes
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
    plot_comparison,
)
from minift.training import TrainConfig, Trainer
from minift.training.methods import METHODS, MethodOptions
from minift.training.pretrained import load_pretrained, save_pretrained

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
    pretrain_eval_every: int = 50  # steps between evaluations on held-out general text (the curves' eval line)
    finetune_eval_every: int = 14  # steps between evaluations on held-out insurer questions

    @classmethod
    def fast(cls) -> DemoSettings:
        """A seconds-long run for tests and CI: same code path, fewer steps, smaller evals."""
        return cls(pretrain_steps=20, finetune_steps=8, block_size=64, batch_size=4, eval_examples=16,
                   pretrain_eval_every=10, finetune_eval_every=4)

    def recipe(self, train_set, out_dir: Path, progress: bool, eval_loader=None, resume: bool = False) -> Recipe:
        """Fine-tuning of every copy: batches of 8, linear decay at the tiny model's rates, each
        method's curves under ``out_dir/<method>``, with an eval line on ``eval_loader``."""
        return Recipe(train_set, self.finetune_steps, 8, TINY_MODEL_LEARNING_RATES, "linear", self.seed, progress,
                      out_dir, eval_loader, self.finetune_eval_every, resume)

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


def pretrain(settings: DemoSettings, tokenizer, out_dir: Path, progress: bool, eval_loader=None,
             resume: bool = False):
    """A tiny model trained on general English and saved to ``out_dir/pretrained``: the base
    every method fine-tunes, with some general knowledge for fine-tuning to lose. Its curves
    (``out_dir/pretrain/curves.png``) have an eval line on ``eval_loader``, if given; ``resume``
    continues from the checkpoint an interrupted run left in ``out_dir/pretrain``."""
    text = bundled_path("general_corpus.txt").read_text(encoding="utf-8")
    loader = DataLoader(TextDataset(text, tokenizer, settings.block_size), settings.batch_size,
                        seed=settings.seed, pad_id=tokenizer.pad_id)
    model = LlamaForCausalLM(tiny_config(tokenizer.vocab_size), seed=settings.seed)
    config = TrainConfig(max_steps=settings.pretrain_steps, lr=3e-3, warmup_ratio=0.05, schedule="cosine",
                         weight_decay=0.1, out_dir=str(out_dir / "pretrain"), progress=progress,
                         eval_every=settings.pretrain_eval_every if eval_loader else 0)
    trainer = Trainer(model, config, loader, eval_loader)
    if resume and trainer.resume():
        print(f"resumed pretraining from step {trainer.step}")
    trainer.train()
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


def run_demo(out_dir: str | Path = "runs/demo", settings: DemoSettings | None = None, progress: bool = True,
             resume: bool = False, overwrite: bool = False) -> dict:
    """Pretrain, fine-tune a copy per method, report; returns the numbers and answers per model.

    ``resume`` continues an interrupted run in ``out_dir`` stage by stage; ``overwrite`` deletes
    the demo run already there. Without either, a folder that holds a demo run is refused: a new
    run never silently replaces an old one."""
    settings = settings or DemoSettings()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    done = open_run_folder(out_dir, settings, resume, overwrite)
    tok = ByteTokenizer()
    train_set, eval_set = insurer_sets(tok, tiny_config(tok.vocab_size).max_seq_len, SYSTEM_PROMPT)
    yardsticks = settings.yardsticks(tok, eval_set)
    questions = [_question(r) for r in load_jsonl(bundled_path("insurer_eval.jsonl"))[:2]]
    print("== 1. pretraining a tiny Llama on general English (the 'pretrained model')")
    if "pretrained" in done:
        base, _ = load_pretrained(out_dir / "pretrained")
        print(f"done before the interruption: loaded from {out_dir / 'pretrained'}")
    else:
        base = pretrain(settings, tok, out_dir, progress, yardsticks.general, resume)
    print("\n== 2. fine-tuning a copy of the pretrained model with each method")
    finished = [m for m in settings.methods if m in done]
    if finished:
        print(f"done before the interruption: {', '.join(finished)}")
    recipe = settings.recipe(train_set, out_dir, progress, yardsticks.domain, resume)
    todo = [m for m in settings.methods if m not in done]
    for name, model, numbers, _ in compare_methods(base, tok, todo, recipe, yardsticks,
                                                   measure_base="pretrained" not in done):
        done[name] = {**numbers, "answers": [answer(model, tok, q) for q in questions]}
        if name == "full":
            report_delta(delta_report(base.state_dict(), model), out_dir / "delta_spectrum.png")
        if name != "pretrained":
            save_finetuned(model, tok, name, out_dir / name)
        atomic_write_bytes(out_dir / STAGES / f"{name}.json", [json.dumps(done[name], indent=2).encode()])
    results = {name: done[name] for name in ("pretrained", *settings.methods)}
    report(results, questions, out_dir)
    explain(results, settings, base.num_parameters(), out_dir)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; outputs in {out_dir}/")
    return results


#: The folder of a demo run that holds one record per finished stage, and the record of its settings.
STAGES = "stages"
SETTINGS_RECORD = "demo_settings.json"


def open_run_folder(out_dir: Path, settings: DemoSettings, resume: bool, overwrite: bool) -> dict[str, dict]:
    """Make ``out_dir`` ready for a run -> the records of the stages already finished there.

    A new run into a folder holding a demo run is refused, unless ``overwrite`` (which deletes
    that run first); ``resume`` reads the finished stages back, after checking that the run was
    made with the same settings (numbers from ``--fast`` and full runs must not mix)."""
    if resume and overwrite:
        raise ValueError("demo: --resume continues the run in --out, --overwrite deletes it; give one of them")
    record = out_dir / SETTINGS_RECORD
    holds_run = record.exists() or (out_dir / "pretrain").exists() or (out_dir / "results.json").exists()
    wanted = json.loads(json.dumps(asdict(settings)))  # tuples as lists, as the record holds them
    if resume and holds_run:
        if not record.exists():
            raise ValueError(f"{out_dir} holds a demo run without {SETTINGS_RECORD} (an older minift's), which "
                             f"cannot be resumed; start it again with --overwrite")
        if json.loads(record.read_text()) != wanted:
            raise ValueError(f"{record}: that run was made with other settings (with or without --fast); resume "
                             f"it with the same ones, or start again with --overwrite")
        return {p.stem: json.loads(p.read_text()) for p in sorted((out_dir / STAGES).glob("*.json"))}
    if holds_run and not overwrite:
        raise ValueError(f"{out_dir} already holds a demo run. Continue it with --resume, delete it and start "
                         f"again with --overwrite, or choose another folder with --out")
    if holds_run:
        for name in (STAGES, "pretrain", "pretrained", *METHODS):
            shutil.rmtree(out_dir / name, ignore_errors=True)
        for name in (SETTINGS_RECORD, "results.json", "forgetting.png", "delta_spectrum.png"):
            (out_dir / name).unlink(missing_ok=True)
    atomic_write_bytes(record, [json.dumps(wanted, indent=2).encode()])
    return {}


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
    plot_comparison(results, out_dir / "forgetting.png",
                    f"demo '{out_dir.resolve().name}': a tiny pretrained model, then each method on the insurer set")


def explain(results: dict, settings: DemoSettings, n_params: int, out_dir: Path) -> None:
    """What the numbers mean for a model this small, what to run for fluent answers, and where
    each model and picture is."""
    best_facts = max(100 * r["qa_accuracy"] for r in results.values())
    print(f"""
== 4. what this means
The model is tiny ({n_params / 1e6:.1f} M parameters), reads bytes rather than words, and was pretrained
for {settings.pretrain_steps} steps on 220 kB of text. It has learned the shape of English, not its meaning:
its answers are word salad, and it knows almost no facts (at best {best_facts:.1f} % here, as expected).
Read the table for its trends, which hold for large models too: the domain loss falls with
fine-tuning, and the more weights a method changes, the more general perplexity it can lose.
For fluent answers, fine-tune a real pretrained model (SmolLM2-135M, a 98 MB download), then talk to it:
  minift finetune --model smollm2 --method lora --steps 20 --lr 1e-3 --out runs/smol-lora
  minift chat --model runs/smol-lora

The models (try: minift chat --model {out_dir / 'lora'}):""")
    for name in results:
        print(f"  {name:>10}  {out_dir / name}")
    print(f"The pictures: {out_dir / 'forgetting.png'}, {out_dir / 'delta_spectrum.png'}, and each run's "
          f"curves: {out_dir / 'pretrain' / 'curves.png'}, {out_dir / '<method>' / 'curves.png'}")


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
    plot_spectra(rows, path, f"demo '{path.resolve().parent.name}'")


def plot_spectra(rows: list[dict], path: Path, run: str = "demo") -> None:
    """One line per matrix, s_i / s_1 of its ΔW, coloured by kind (q_proj, ..., down_proj), so
    that the many blocks' lines read as a few groups with one legend entry each."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - no pyplot: keeps the caller's backend

    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    colors: dict[str, str] = {}
    for row in rows:
        s = row["singular_values"]
        kind = row["name"].split(".")[-2]
        first_of_kind = kind not in colors
        colors.setdefault(kind, f"C{len(colors)}")
        ax.semilogy(range(1, len(s) + 1), s / max(s[0], 1e-30), color=colors[kind], alpha=0.6, linewidth=1,
                    label=kind if first_of_kind else None)
    ax.legend(title="matrix (one line per block)", fontsize=8, title_fontsize=8, loc="upper right")
    ax.set(xlabel="singular value index i", ylabel="s_i / s_1 (log)",
           title=f"{run}: spectrum of ΔW = W_full − W_pretrained (a fast fall = low rank)")
    ax.title.set_fontsize(10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
