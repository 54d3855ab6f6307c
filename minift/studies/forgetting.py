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

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from minift.data import DataLoader
from minift.studies.experiment import (
    LEARNING_RATES,
    Recipe,
    Yardsticks,
    compare_methods,
    general_sets,
    insurer_sets,
    plot_comparison,
)


@dataclass
class ForgettingSettings:
    """The study's knobs; the defaults take minutes on a laptop with SmolLM2 (``minift forgetting``)."""

    methods: tuple[str, ...] = ("full", "freeze", "lora")
    steps: int = 10
    batch_size: int = 4
    lr: float | None = None  # None: LEARNING_RATES[method]
    qa_questions: int | None = 40  # the first N of general_qa.jsonl; None = all
    ppl_blocks: int = 16  # blocks of held-out text (block_size tokens each) for the perplexity
    block_size: int = 128
    seed: int = 0
    progress: bool = True

    def recipe(self, train_set) -> Recipe:
        """How each copy is trained: ``lr`` for every method if given, else its LEARNING_RATES
        entry; cosine decay; no files written (the table is the result)."""
        rates = LEARNING_RATES if self.lr is None else dict.fromkeys(LEARNING_RATES, self.lr)
        return Recipe(train_set, self.steps, self.batch_size, rates, "cosine", self.seed, self.progress)


def general_eval_sets(tokenizer, settings: ForgettingSettings):
    """(QA records, loader of held-out text blocks): the yardsticks, fixed across methods."""
    return general_sets(tokenizer, settings.block_size, settings.batch_size, blocks=settings.ppl_blocks,
                        questions=settings.qa_questions)


def measure_forgetting(model, tokenizer, settings: ForgettingSettings | None = None) -> list[dict]:
    """One row per model (pretrained first, then each method): what it keeps of general ability.

    Training uses the bundled insurer set rendered with the model's own chat template (its
    default system prompt included), so the fine-tuned model is asked questions the way it was
    trained. Also records the domain loss on ``insurer_eval.jsonl``, the learning side.
    """
    s = settings or ForgettingSettings()
    system = getattr(tokenizer, "default_system_prompt", None)
    train_set, eval_set = insurer_sets(tokenizer, model.config.max_seq_len, system)
    qa, heldout = general_eval_sets(tokenizer, s)
    domain = DataLoader(eval_set, s.batch_size, shuffle=False, pad_id=tokenizer.pad_id)
    print("measuring the pretrained model")
    runs = compare_methods(model, tokenizer, s.methods, s.recipe(train_set), Yardsticks(domain, heldout, qa))
    return [_row(name, numbers, seconds) for name, _, numbers, seconds in runs]


def _row(method: str, numbers: dict, seconds: float) -> dict:
    """A row of the table and of ``forgetting.json``, in their column order (the general
    perplexity is ``perplexity`` here: notebook 09 and earlier JSON files use that name)."""
    return {"method": method, "trainable_pct": numbers["trainable_pct"], "s_per_step": seconds,
            "qa_accuracy": numbers["qa_accuracy"], "perplexity": numbers["general_ppl"],
            "domain_loss": numbers["domain_loss"]}


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


def plot_forgetting(rows: list[dict], path: str | Path, run: str | None = None) -> Path:
    """``plot_comparison`` of the rows: share of parameters trained, learned vs forgot, general
    facts kept. ``run`` names the run in the title (default: the folder the PNG goes to)."""
    numbers = {r["method"]: {**r, "general_ppl": r["perplexity"]} for r in rows}
    run = run or Path(path).resolve().parent.name
    return plot_comparison(numbers, path, f"forgetting study '{run}': {', '.join(list(numbers)[1:])}")


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
