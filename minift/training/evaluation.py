"""Measuring learning and forgetting (lectures 000 and 004: catastrophic forgetting).

Two yardsticks on data the fine-tuning never saw:
    * perplexity on held-out general text (``minift.training.evaluate_loss``): how well the
      model still predicts ordinary English;
    * accuracy on a held-out general-knowledge QA set: does it still know that the capital of
      France is Paris? ``cloze`` mode completes a sentence start ("The capital of France is")
      and works for any language model, even a tiny one pretrained on plain text; ``chat``
      mode asks the question through the chat template, for instruction-tuned models.
"""

from __future__ import annotations

from minift.backend import to_numpy


def answers_match(generated: str, answer: str) -> bool:
    """The continuation starts with the expected answer (case and surrounding spaces ignored)."""
    return generated.strip().lower().startswith(answer.strip().lower())


def qa_prompt(tokenizer, record: dict, mode: str) -> str:
    if mode == "cloze":
        return record["cloze"]
    if mode == "chat":
        question = record["question"] + " Answer with one word."
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    raise ValueError(f"QA mode must be 'cloze' or 'chat', got {mode!r}")


def qa_accuracy(model, tokenizer, records: list[dict], mode: str = "cloze", max_new_tokens: int = 8) -> float:
    """Share of records whose greedy continuation starts with the record's answer."""
    if not records:
        raise ValueError("qa_accuracy needs at least one record")
    correct = 0
    for record in records:
        ids = tokenizer.encode(qa_prompt(tokenizer, record, mode))
        out = model.generate([ids], max_new_tokens, eos_id=tokenizer.eos_id)[0]
        correct += answers_match(tokenizer.decode(to_numpy(out).tolist(), skip_special=True), record["answer"])
    return correct / len(records)
