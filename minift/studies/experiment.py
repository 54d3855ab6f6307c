"""One comparison of fine-tuning methods: what each learns, and what each makes the model forget.

``minift demo`` (a tiny model pretrained on the spot) and ``minift forgetting`` (SmolLM2) ask
the same question of a base model: fine-tuned on the bundled insurer set with each method, how
much does a copy learn the domain, and how much general ability does it lose (lectures 000 and
004)? The rows are only comparable if every copy starts from the same weights, is trained on
the same batches for the same number of steps, and is measured on the same held-out sets. This
module owns that protocol; each study owns what differs: its base model, its settings, and how
it reports the rows.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from minift.data import DataLoader, InstructionDataset, TextDataset, bundled_path, load_qa
from minift.training import TrainConfig, Trainer, evaluate_loss, perplexity
from minift.training.evaluation import qa_accuracy
from minift.training.methods import prepare_model

#: Learning rates for a real pretrained model (SmolLM2, ``minift forgetting``), high on purpose.
#: Lecture 000's 1e-5..5e-5 for full fine-tuning (and ~1e-3 for LoRA) is for runs of thousands
#: of steps; in the 10 steps this measurement can afford on a laptop, SmolLM2 at those rates
#: learns the domain a little and forgets nothing measurable. Six times higher, the forgetting
#: shows within minutes. The new weights of LoRA, adapters and prefixes start at or near zero and
#: take ten times larger steps than the pretrained ones.
LEARNING_RATES = {"full": 3e-4, "freeze": 3e-4, "last": 3e-4, "lora": 3e-3, "qlora": 3e-3, "adapter": 3e-3,
                  "prefix": 1e-2}

#: Learning rates for the demo's tiny model, pretrained minutes before: a small model trained
#: briefly tolerates far larger steps than a billion-parameter one, and methods that train few
#: parameters take larger steps still.
TINY_MODEL_LEARNING_RATES = {"full": 1e-3, "freeze": 1e-3, "last": 1e-3, "lora": 5e-3, "qlora": 5e-3,
                             "adapter": 3e-3, "prefix": 1e-2}


@dataclass
class Recipe:
    """How every copy of one comparison is trained: the same examples, batch order, number of
    steps and schedule, so that two rows differ by the method (and its learning rate) alone."""

    train_set: Sequence  # the examples, e.g. the first of ``insurer_sets``
    steps: int
    batch_size: int
    learning_rates: dict[str, float]  # per method, e.g. LEARNING_RATES
    schedule: str = "cosine"  # the decay after a 10 % warmup
    seed: int = 0  # of the batch order
    progress: bool = True
    out_dir: Path | None = None  # metrics and curves of each method under out_dir/<method>; None: no files
    eval_loader: DataLoader | None = None  # held-out examples: the eval line of each copy's curves
    eval_every: int = 0  # steps between two evaluations on eval_loader (0: none)
    resume: bool = False  # continue a copy from its checkpoint in out_dir/<method>, if it has one

    def loader(self, pad_id: int) -> DataLoader:
        """A new loader for each copy: a loader is a cursor, and every copy starts at the first batch."""
        return DataLoader(self.train_set, self.batch_size, seed=self.seed, pad_id=pad_id)

    def config(self, method: str) -> TrainConfig:
        """The Trainer's settings for ``method``: only the learning rate and the folder depend on it."""
        return TrainConfig(max_steps=self.steps, lr=self.learning_rates[method], warmup_ratio=0.1,
                           schedule=self.schedule, seed=self.seed, progress=self.progress,
                           eval_every=self.eval_every if self.eval_loader else 0,
                           out_dir=str(self.out_dir / method) if self.out_dir else None)


@dataclass
class Yardsticks:
    """The fixed held-out sets every model of one comparison is measured on."""

    domain: DataLoader  # insurer questions not trained on: their loss is the learning side
    general: DataLoader  # blocks of general English: their perplexity, the forgetting side
    qa: list[dict]  # general-fact cloze records: their accuracy, the forgetting side too


def insurer_sets(tokenizer, max_len: int, system_prompt: str | None) -> tuple[InstructionDataset, InstructionDataset]:
    """(train, eval) of the bundled insurer set, every example rendered with ``system_prompt``:
    the narrow domain each method learns, and held-out questions that show whether it did."""
    return tuple(InstructionDataset(bundled_path(name), tokenizer, max_len, system_prompt=system_prompt)
                 for name in ("insurer_train.jsonl", "insurer_eval.jsonl"))


def general_sets(tokenizer, block_size: int, batch_size: int, *, blocks: int | None,
                 questions: int | None) -> tuple[list[dict], DataLoader]:
    """(the first ``questions`` general-fact records, a loader of the first ``blocks`` blocks of
    held-out general text); None takes all. No fine-tuning example shows them, so a model that
    does worse on them has forgotten."""
    qa = load_qa(bundled_path("general_qa.jsonl"))[:questions]
    text = TextDataset(bundled_path("general_heldout.txt").read_text(encoding="utf-8"), tokenizer, block_size)
    return qa, DataLoader(first(text, blocks), batch_size, shuffle=False, pad_id=tokenizer.pad_id)


def first(dataset, n: int | None):
    """The first ``n`` examples (all of them for None): a DataLoader takes any sequence."""
    return dataset if n is None else [dataset[i] for i in range(min(n, len(dataset)))]


def measure(model, tokenizer, yardsticks: Yardsticks) -> dict:
    """Domain loss (what fine-tuning should lower); general perplexity and general-fact cloze
    accuracy (what it may damage: catastrophic forgetting). Cloze, not chat: an instruction
    model answers in sentences, and a "starts with the answer" check would fail one that knows."""
    return {"domain_loss": evaluate_loss(model, yardsticks.domain),
            "general_ppl": perplexity(evaluate_loss(model, yardsticks.general)),
            "qa_accuracy": qa_accuracy(model, tokenizer, yardsticks.qa, mode="cloze")}


def trainable_pct(model) -> float:
    """The share of the model's parameters a method trains, in percent: what it costs in
    gradients and optimizer state, and how far it can move the model."""
    return 100 * model.num_parameters(True) / model.num_parameters()


def finetune(base, tokenizer, method: str, recipe: Recipe) -> tuple[object, float]:
    """A copy of ``base`` fine-tuned with ``method`` -> (model, seconds per training step).

    A deep copy, so that ``base`` stays the common start of every method, and can still be
    measured and compared with afterwards. With ``recipe.resume`` a copy whose run was
    interrupted continues from its checkpoint: the same weights, optimizer and batch position,
    so it ends as it would have without the interruption."""
    model, description = prepare_model(copy.deepcopy(base), method)
    print(description)
    trainer = Trainer(model, recipe.config(method), recipe.loader(tokenizer.pad_id), recipe.eval_loader)
    if recipe.resume and trainer.resume():
        print(f"resumed '{method}' from step {trainer.step}")
    first_step, start = trainer.step, time.perf_counter()
    trainer.train()
    return model, (time.perf_counter() - start) / max(1, recipe.steps - first_step)


def compare_methods(base, tokenizer, methods: Sequence[str], recipe: Recipe, yardsticks: Yardsticks,
                    measure_base: bool = True) -> Iterator[tuple[str, object, dict, float]]:
    """(name, model, numbers, seconds per step) for ``base`` ("pretrained"), then for a copy
    fine-tuned with each method; ``numbers`` are ``measure``'s and ``trainable_pct`` (0 for
    the base: nothing was trained). A generator, so that a study can look at each model (its
    answers, its weight change) before the next copy is trained. ``measure_base=False`` leaves
    the base's row out (a resumed study that measured it before the interruption)."""
    if measure_base:
        yield "pretrained", base, {**measure(base, tokenizer, yardsticks), "trainable_pct": 0.0}, 0.0
    for method in methods:
        print(f"\nfine-tuning with '{method}' for {recipe.steps} steps")
        model, seconds = finetune(base, tokenizer, method, recipe)
        yield method, model, {**measure(model, tokenizer, yardsticks), "trainable_pct": trainable_pct(model)}, seconds


def plot_comparison(rows: dict[str, dict], path: str | Path, title: str) -> Path:
    """The comparison as one picture, rows as ``compare_methods``' numbers by name, the base
    ("pretrained") first: what each method cost (share of parameters trained), what it learned
    against what it forgot (both relative to the base), and the general facts it still knows."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - no pyplot: keeps the caller's backend

    fig = Figure(figsize=(15, 4.6))
    cost, trade, facts = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.4, 1]})
    _plot_share_trained(cost, rows)
    _plot_learned_vs_forgot(trade, rows)
    _plot_facts(facts, rows)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def _plot_share_trained(ax, rows: dict[str, dict]) -> None:
    """Horizontal bars on a log scale: a full run trains 100 %, LoRA a fraction of a percent."""
    tuned = [name for name in rows if rows[name]["trainable_pct"] > 0]
    bars = ax.barh(tuned, [rows[n]["trainable_pct"] for n in tuned], color="tab:purple")
    ax.bar_label(bars, labels=[f"{rows[n]['trainable_pct']:.3g} %" for n in tuned], fontsize=8, padding=2)
    ax.set_xscale("log")
    ax.set_xlim(right=1000)  # room for the labels right of the 100 % bar
    ax.invert_yaxis()
    ax.set(title="share of parameters trained (cost)", xlabel="% of the model's parameters (log)")


def _plot_learned_vs_forgot(ax, rows: dict[str, dict]) -> None:
    """One point per model: right = learned the domain, up = forgot general English; the ideal
    is bottom right, and the base sits at (0, 0). A marker and a legend entry per method, as
    methods that train alike (LoRA, QLoRA) land on top of each other."""
    base = next(iter(rows.values()))
    for i, (name, r) in enumerate(rows.items()):
        learned = base["domain_loss"] - r["domain_loss"]
        forgot = 100 * (r["general_ppl"] / base["general_ppl"] - 1)
        label = name if r is base else f"{name} ({r['trainable_pct']:.3g} % trained)"
        ax.scatter(learned, forgot, s=90 - 8 * i, marker="osD^vPX*"[i % 8], color=f"C{i % 10}", alpha=0.8,
                   label=label, zorder=3)
    ax.axhline(0, color="tab:gray", linestyle="--", linewidth=1)
    ax.axvline(0, color="tab:gray", linestyle="--", linewidth=1)
    ax.legend(fontsize=8, loc="upper left")
    ax.set(title="learned vs forgot (relative to the pretrained model)",
           xlabel="learned: drop of the domain eval loss (nats/token)",
           ylabel="forgot: rise of general-text perplexity (%)")


def _plot_facts(ax, rows: dict[str, dict]) -> None:
    """Cloze accuracy on general facts per model, each bar labelled (a 0 is a bar too)."""
    names = list(rows)
    values = [100 * rows[n]["qa_accuracy"] for n in names]
    bars = ax.bar(names, values, color=["tab:gray"] + ["tab:green"] * (len(names) - 1))
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(values[0], color="tab:gray", linestyle="--", linewidth=1)
    ax.set_ylim(0, max(10.0, 1.25 * max(values)))
    if max(values) < 5:
        ax.text(0.5, 0.6, "almost no fact is known, before or after:\nthe model is too small to have\n"
                "learned facts (expected in the demo;\nSmolLM2 knows some: minift forgetting)",
                transform=ax.transAxes, ha="center", va="center", fontsize=9, color="tab:gray")
    ax.set(title="general facts kept (cloze accuracy %)", ylabel="% of questions answered")
    ax.tick_params(axis="x", rotation=45)
