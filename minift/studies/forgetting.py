"""Catastrophic forgetting, measured on a real pretrained model (lectures 000 and 004).

Fine-tuning on a narrow domain (the bundled insurer questions) teaches the domain, and may
erase what pretraining taught. We look at two things the fine-tuning data never shows:

* **general QA accuracy** on ``general_qa.jsonl``, as greedy cloze completion ("The capital of
  France is" -> " Paris", ``minift.training.evaluation.qa_accuracy``). Not chat mode: its check is that
  the reply *starts with* the answer, and SmolLM2 replies in sentences ("The capital of France
  is Paris."), which would score a model that knows as one that does not;
* **perplexity on general text**, ``general_heldout.txt``: how surprised the model is by
  ordinary English.

Both are measured for the pretrained model and for one fine-tuned copy per method, all copies
trained from the same weights on the same batches for the same number of steps. A method that
changes fewer weights (LoRA, frozen bottom blocks) is expected to forget less; the table shows
by how much, and at what training cost per step.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from minift.data import DataLoader, InstructionDataset, TextDataset, bundled_path, load_qa
from minift.training import TrainConfig, Trainer, evaluate_loss, perplexity
from minift.training.evaluation import qa_accuracy
from minift.training.methods import prepare_model

#: Learning rates, high on purpose. Lecture 000's 1e-5..5e-5 for full fine-tuning (and ~1e-3 for
#: LoRA) is for runs of thousands of steps; in the 10 steps this measurement can afford on a
#: laptop, SmolLM2 at those rates learns the domain a little and forgets nothing measurable.
#: Six times higher, the forgetting shows within minutes. The new weights of LoRA, adapters and
#: prefixes start at or near zero and take ten times larger steps than the pretrained ones.
LEARNING_RATES = {"full": 3e-4, "freeze": 3e-4, "last": 3e-4, "lora": 3e-3, "qlora": 3e-3, "adapter": 3e-3,
                  "prefix": 1e-2}


@dataclass
class ForgettingSettings:
    methods: tuple[str, ...] = ("full", "freeze", "lora")
    steps: int = 10
    batch_size: int = 4
    lr: float | None = None  # None: LEARNING_RATES[method]
    qa_questions: int | None = 40  # the first N of general_qa.jsonl; None = all
    ppl_blocks: int = 16  # blocks of held-out text (block_size tokens each) for the perplexity
    block_size: int = 128
    seed: int = 0
    progress: bool = True


def general_eval_sets(tokenizer, settings: ForgettingSettings):
    """(QA records, loader of held-out text blocks): the yardsticks, fixed across methods."""
    qa = load_qa(bundled_path("general_qa.jsonl"))[:settings.qa_questions]
    text = TextDataset(bundled_path("general_heldout.txt").read_text(), tokenizer, settings.block_size)
    blocks = [text[i] for i in range(min(settings.ppl_blocks, len(text)))]
    return qa, DataLoader(blocks, settings.batch_size, shuffle=False, pad_id=tokenizer.pad_id)


def measure(model, tokenizer, qa, heldout) -> dict:
    """General-ability numbers of ``model``: QA accuracy (chat) and held-out perplexity."""
    return {"qa_accuracy": qa_accuracy(model, tokenizer, qa, mode="cloze"),
            "perplexity": perplexity(evaluate_loss(model, heldout))}


def finetune(base, tokenizer, method: str, settings: ForgettingSettings, train_set) -> tuple[object, float]:
    """A copy of ``base`` fine-tuned with ``method`` -> (model, seconds per training step)."""
    model, description = prepare_model(copy.deepcopy(base), method)
    print(description)
    loader = DataLoader(train_set, settings.batch_size, seed=settings.seed, pad_id=tokenizer.pad_id)
    config = TrainConfig(max_steps=settings.steps, lr=settings.lr or LEARNING_RATES[method], warmup_ratio=0.1,
                         schedule="cosine", progress=settings.progress, seed=settings.seed)
    start = time.perf_counter()
    Trainer(model, config, loader).train()
    return model, (time.perf_counter() - start) / settings.steps


def measure_forgetting(model, tokenizer, settings: ForgettingSettings | None = None) -> list[dict]:
    """One row per model (pretrained first, then each method): what it keeps of general ability.

    Training uses the bundled insurer set rendered with the model's own chat template (its
    default system prompt included), so the fine-tuned model is asked questions the way it was
    trained. Also records the domain loss on ``insurer_eval.jsonl``, the learning side.
    """
    s = settings or ForgettingSettings()
    qa, heldout = general_eval_sets(tokenizer, s)
    system = getattr(tokenizer, "default_system_prompt", None)
    max_len = model.config.max_seq_len
    train_set = InstructionDataset(bundled_path("insurer_train.jsonl"), tokenizer, max_len, system_prompt=system)
    domain = DataLoader(InstructionDataset(bundled_path("insurer_eval.jsonl"), tokenizer, max_len,
                                           system_prompt=system), s.batch_size, shuffle=False, pad_id=tokenizer.pad_id)
    print("measuring the pretrained model")
    rows = [{"method": "pretrained", "trainable_pct": 0.0, "s_per_step": 0.0,
             **measure(model, tokenizer, qa, heldout), "domain_loss": evaluate_loss(model, domain)}]
    for method in s.methods:
        print(f"\nfine-tuning with '{method}' for {s.steps} steps")
        tuned, seconds = finetune(model, tokenizer, method, s, train_set)
        rows.append({"method": method, "trainable_pct": 100 * tuned.num_parameters(True) / tuned.num_parameters(),
                     "s_per_step": seconds, **measure(tuned, tokenizer, qa, heldout),
                     "domain_loss": evaluate_loss(tuned, domain)})
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table, changes relative to the pretrained row in brackets."""
    base = rows[0]
    lines = [f"{'method':<11}{'trained %':>10}{'s/step':>8}{'domain loss':>13}{'QA acc':>16}{'general ppl':>20}"]
    for r in rows:
        acc = f"{r['qa_accuracy']:.2f} ({r['qa_accuracy'] - base['qa_accuracy']:+.2f})"
        ppl = f"{r['perplexity']:.2f} ({r['perplexity'] - base['perplexity']:+.2f})"
        lines.append(f"{r['method']:<11}{r['trainable_pct']:>10.2f}{r['s_per_step']:>8.2f}"
                     f"{r['domain_loss']:>13.3f}{acc:>16}{ppl:>20}")
    return "\n".join(lines)


def plot_forgetting(rows: list[dict], path: str | Path) -> Path:
    """Three bar charts side by side: domain loss (learning), QA accuracy and perplexity (forgetting)."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - no pyplot: keeps the caller's backend

    names = [r["method"] for r in rows]
    panels = [("domain_loss", "insurer eval loss (lower = learned)"),
              ("qa_accuracy", "general QA accuracy (higher = kept)"),
              ("perplexity", "general-text perplexity (lower = kept)")]
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for ax, (key, title) in zip(axes, panels):
        bars = ax.bar(names, [r[key] for r in rows], color=["tab:gray"] + ["tab:blue"] * (len(rows) - 1))
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(rows[0][key], color="tab:gray", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def run_forgetting(model, tokenizer, settings: ForgettingSettings, out_dir: str | Path) -> list[dict]:
    """``measure_forgetting``, then print the table and save ``forgetting.json`` and ``forgetting.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = measure_forgetting(model, tokenizer, settings)
    print("\n" + format_table(rows))
    (out_dir / "forgetting.json").write_text(json.dumps({"settings": asdict(settings), "rows": rows}, indent=2))
    plot_forgetting(rows, out_dir / "forgetting.png")
    print(f"\nsaved {out_dir / 'forgetting.json'} and {out_dir / 'forgetting.png'}")
    return rows
