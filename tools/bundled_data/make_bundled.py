"""Regenerate the bundled data sets: ``python tools/bundled_data/make_bundled.py [--check]``.

The files in ``minift/data/bundled/`` are committed, but they are *outputs*: templates written for
minift (``gen_general.py``, ``gen_insurer.py``, ``gen_preferences.py``) filled in by seeded random
choices. Running this module again writes byte-identical files; ``--check`` only compares and
exits 1 on a difference (a test does the same). Change the templates, rerun, commit the new files.

Why generate instead of downloading: the data must be free to redistribute, small enough for a
laptop, and *controlled*: the general corpus states exactly the facts the QA probe asks, and the
insurer set never contradicts itself.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from gen_general import CORPUS_POOL, HELDOUT_POOL, fact_sweep, paragraph, qa_records
from gen_insurer import insurer_records
from gen_preferences import kind_counts, mean_lengths, preference_records

BUNDLED = Path(__file__).resolve().parents[2] / "minift" / "data" / "bundled"
CORPUS_SEED, HELDOUT_SEED, INSURER_SEED, QA_SEED, PREFERENCE_SEED = 11, 22, 33, 44, 55
CORPUS_BYTES, HELDOUT_BYTES, FACT_SWEEPS = 220_000, 20_000, 4

_SENTENCE_END = re.compile(r'(?:(?<=[.!?])|(?<=[.!?]"))\s+(?=["A-Z0-9])')


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: a split after . ! ? (or those and a closing quote), whitespace, and
    the capital letter, digit or quote that starts the next sentence ("Stop!" she said: one)."""
    return [s for s in (part.strip() for part in _SENTENCE_END.split(text)) if s]


def build_corpus(rng: random.Random, size: int = CORPUS_BYTES) -> str:
    """Random paragraphs up to ``size`` bytes, with ``FACT_SWEEPS`` fact sweeps shuffled in."""
    paragraphs = [p for _ in range(FACT_SWEEPS) for p in fact_sweep(rng)]
    total = sum(len(p) + 2 for p in paragraphs)
    while total < size:
        paragraphs.append(paragraph(rng, CORPUS_POOL))
        total += len(paragraphs[-1]) + 2
    rng.shuffle(paragraphs)
    return "\n\n".join(paragraphs) + "\n"


def build_heldout(rng: random.Random, corpus: str, size: int = HELDOUT_BYTES) -> str:
    """Paragraphs in the corpus's style that share no sentence with it.

    Paragraphs come from the same writers with another seed and the held-out pool (other names,
    helpers, stories, topics and recipes). Any sentence the corpus already contains is dropped
    (mostly short fact statements), and a paragraph left with fewer than two sentences is
    skipped. So the perplexity measured here is on unseen text, not memorised text.
    """
    seen = set(split_sentences(corpus))
    paragraphs, total = [], 0
    while total < size:
        fresh = [s for s in split_sentences(paragraph(rng, HELDOUT_POOL)) if s not in seen]
        if len(fresh) >= 2:
            paragraphs.append(" ".join(fresh))
            total += len(paragraphs[-1]) + 2
    return "\n\n".join(paragraphs) + "\n"


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records)


def preference_summary(train: list[dict], evals: list[dict]) -> str:
    """The README's lines on the preference pairs: mean lengths and kinds of rejected answers."""
    lengths = [f"{name} {chosen:.1f} vs {rejected:.1f}" for name, (chosen, rejected) in
               (("train", mean_lengths(train)), ("eval", mean_lengths(evals)))]
    lines = [f"Mean length in characters, chosen vs rejected: {'; '.join(lengths)}."]
    for name, pairs in (("train", train), ("eval", evals)):
        kinds = ", ".join(f"{n} {kind}" for kind, n in kind_counts(pairs).items())
        lines.append(f"Rejected answers by kind in {name}: {kinds}.")
    return "\n  ".join(lines)


def readme(files: dict[str, str], counts: dict[str, str], preferences: str) -> str:
    rows = "\n".join(f"| `{name}` | {len(text.encode()):,} bytes | {counts[name]} |"
                     for name, text in files.items())
    return f"""# Bundled data

Small data sets written for minift, so that `minift demo`, the notebooks and the tests run
offline. Everything here is original text produced by `python tools/bundled_data/make_bundled.py`
from templates in `tools/bundled_data/gen_general.py`, `tools/bundled_data/gen_insurer.py` and
`tools/bundled_data/gen_preferences.py` and a seeded random generator; rerunning it reproduces
these files byte for byte (a test checks this). All files are ASCII.

| file | size | contents |
| --- | --- | --- |
{rows}

- `general_corpus.txt`: simple general English for pretraining a tiny byte-level model: everyday
  science explained, geography, animals, colours, numbers and sums, the calendar, recipes, short
  stories and fables set in invented towns, and history-like generalities. Paragraphs are
  separated by blank lines. Every fact that `general_qa.jsonl` asks about is stated at least
  {FACT_SWEEPS} times in one fixed wording (`cloze` + answer) and often in other wordings too.
- `general_heldout.txt`: the same style, generated with another seed, sharing **no sentence**
  with the corpus. Its perplexity before and after fine-tuning measures forgetting (lecture 000).
- `insurer_train.jsonl`: instruction data for Northwind Mutual, an invented insurer. Shapes:
  `{{"instruction", "input", "output"}}` (the question as instruction with empty input, or a task
  as instruction with the question as input) and chat `{{"messages": [...]}}`, some of them
  two-question conversations and some with their own system message. Each fact (deductibles,
  claim steps, hours, refunds, cancellation, cover, discounts...) always has the same answer.
- `insurer_eval.jsonl`: one held-out question per fact, worded differently from every training
  question, with the same answer as in training: does the model generalise to new phrasing?
- `insurer_preferences_train.jsonl`: preference pairs for DPO in TRL's shape, for every trained
  insurer question: `{{"prompt", "chosen", "rejected"}}` as strings, or (about 15 %) as message
  lists (`prompt` a user message, sometimes after a system message; `chosen` and `rejected` one
  assistant message each). `chosen` is the fact's answer from `insurer_train.jsonl`; `rejected` is
  one of three hand-written answers per fact, a wrong fact (number, deadline, phone, hours,
  product), a non-compliant one (cover that does not exist, a guaranteed outcome, a request for a
  password or card number, advice to misstate a claim, legal or medical advice) or an evasive one.
  Rejected answers are written about as long as chosen ones, so a model cannot win by length.
  {preferences}
- `insurer_preferences_eval.jsonl`: the same for the held-out question of each fact (the question
  of `insurer_eval.jsonl`), so no eval prompt is a training prompt.
- `general_qa.jsonl`: general-knowledge probe `{{"question", "answer", "choices", "cloze"}}`.
  `answer` is a number or one word (two for a city like New Delhi); `choices` holds it among
  three wrong ones (for scoring by likelihood); `cloze` is the corpus's statement the answer
  completes (for a base model).

Phone numbers use the 555-01xx block reserved for fiction and the e-mail domain is `.example`.

License: written for minift and released under the same license as the project (MIT).
"""


def pair_count(pairs: list[dict]) -> str:
    """The README's count of preference pairs, by shape (TRL's standard strings or message lists)."""
    conversational = sum(isinstance(pair["prompt"], list) for pair in pairs)
    return f"{len(pairs)} pairs ({len(pairs) - conversational} standard, {conversational} conversational)"


def build_all() -> dict[str, str]:
    """File name -> exact file text of every bundled file."""
    corpus = build_corpus(random.Random(CORPUS_SEED))
    heldout = build_heldout(random.Random(HELDOUT_SEED), corpus)
    train, evals = insurer_records(random.Random(INSURER_SEED))
    qa = qa_records(random.Random(QA_SEED))
    pref_train, pref_evals = preference_records(random.Random(PREFERENCE_SEED))
    files = {"general_corpus.txt": corpus, "general_heldout.txt": heldout,
             "insurer_train.jsonl": jsonl(train), "insurer_eval.jsonl": jsonl(evals),
             "general_qa.jsonl": jsonl(qa), "insurer_preferences_train.jsonl": jsonl(pref_train),
             "insurer_preferences_eval.jsonl": jsonl(pref_evals)}
    chats = sum("messages" in r for r in train)
    counts = {"general_corpus.txt": f"{corpus.count(chr(10) * 2) + 1:,} paragraphs",
              "general_heldout.txt": f"{heldout.count(chr(10) * 2) + 1:,} paragraphs",
              "insurer_train.jsonl": f"{len(train)} records ({len(train) - chats} instruction, {chats} chat)",
              "insurer_eval.jsonl": f"{len(evals)} records", "general_qa.jsonl": f"{len(qa)} records",
              "insurer_preferences_train.jsonl": pair_count(pref_train),
              "insurer_preferences_eval.jsonl": pair_count(pref_evals)}
    return {**files, "README.md": readme(files, counts, preference_summary(pref_train, pref_evals))}


def on_disk(name: str) -> str | None:
    path = BUNDLED / name
    return path.read_text(encoding="utf-8") if path.is_file() else None


def main(argv: list[str]) -> int:
    files = build_all()
    if "--check" in argv:
        stale = [name for name, text in files.items() if on_disk(name) != text]
        print("bundled data is up to date" if not stale else f"out of date: {', '.join(stale)}")
        return 1 if stale else 0
    BUNDLED.mkdir(exist_ok=True)
    for name, text in files.items():
        (BUNDLED / name).write_text(text, encoding="utf-8")
        print(f"wrote {BUNDLED / name} ({len(text.encode()):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
