"""Preference data: a prompt, a chosen answer and a rejected one -> two prompt-masked sequences.

Preference tuning (lecture 002's RLHF, lecture 004's DPO) learns from comparisons instead of
demonstrations: people (or a rule) saw two answers to the same prompt and preferred one. A
record is TRL's shape, one JSON object per line::

    {"prompt": "How long do I have to report a claim?",
     "chosen": "Please report a claim within 30 days of the incident.",
     "rejected": "There is no deadline; report it whenever you like."}

The prompt may also be a conversation (a list of ``{"role", "content"}`` messages, under
``"prompt"`` or ``"messages"``), and ``chosen``/``rejected`` may each be a one-message list
``[{"role": "assistant", "content": ...}]`` (TRL's conversational form).

Each side becomes the ChatML rendering of prompt + answer with labels on the answer only: DPO
compares log pi(answer | prompt), so the prompt, and any earlier assistant turn inside it, is
masked exactly as in instruction tuning (``instructions.encode_example``). A batch stacks the B
chosen rows above the B rejected rows, so one forward pass scores both (TRL's "concatenated
forward"); a precomputed reference's log-probabilities ride along in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy

from minift.data.instructions import DataError, check_messages, encode_example, numbered_objects
from minift.data.loader import collate
from minift.data.tokenizer import Tokenizer


def _prompt_messages(record: Mapping, where: str) -> list[dict]:
    """The prompt as chat messages: a string becomes one user turn; a list is checked as a chat
    that ends on the user's turn (the answer to compare comes next)."""
    if ("prompt" in record) == ("messages" in record):
        raise DataError(f"{where}: give the prompt as exactly one of 'prompt' or 'messages'")
    key = "prompt" if "prompt" in record else "messages"
    prompt = record[key]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: {key!r} is empty")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: {key!r} must be a string or a non-empty list of messages")
    # check_messages wants a final assistant turn; check the prompt as if the answer followed
    check_messages([*prompt, {"role": "assistant", "content": ""}], f"{where}: {key}")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the last message of {key!r} must be the user's (the answers reply to it)")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _answer_text(record: Mapping, key: str, where: str) -> str:
    """``chosen``/``rejected``: a string, or a list holding one assistant message."""
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    answer = record[key]
    if isinstance(answer, list):
        if (len(answer) != 1 or not isinstance(answer[0], dict) or answer[0].get("role") != "assistant"
                or not isinstance(answer[0].get("content"), str)):
            raise DataError(f"{where}: {key!r} as a list must hold exactly one "
                            f"{{\"role\": \"assistant\", \"content\": \"...\"}} message")
        answer = answer[0]["content"]
    if not isinstance(answer, str):
        raise DataError(f"{where}: field {key!r} must be a string or a one-message list, "
                        f"got {type(answer).__name__}")
    if not answer.strip():
        raise DataError(f"{where}: {key!r} is empty")
    return answer


def check_preference(record, where: str) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen text, rejected text) of one record, or ``DataError`` naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    prompt = _prompt_messages(record, where)
    chosen, rejected = _answer_text(record, "chosen", where), _answer_text(record, "rejected", where)
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same text; the pair teaches nothing")
    return prompt, chosen, rejected


def load_preferences(path: str | os.PathLike) -> list[dict]:
    """The preference records of a JSONL file, each checked; errors name ``file:line``."""
    rows = numbered_objects(path)
    for where, record in rows:
        check_preference(record, where)
    return [record for _, record in rows]


def encode_answer(tokenizer: Tokenizer, prompt: Sequence[Mapping[str, str]], answer: str, max_len: int,
                  name: str) -> tuple[numpy.ndarray, numpy.ndarray]:
    """``(input_ids, labels)`` of prompt + answer with labels on the answer (and its end) only,
    an assistant turn inside the prompt included (``encode_example(last_turn_only=True)``). The
    rendering is per message, so the prompt's tokens are the same prefix on both sides of a pair.
    A pair that does not fit ``max_len`` is refused, never cut: a cut answer would be scored as
    if it were the whole one."""
    try:
        return encode_example(tokenizer, [*prompt, {"role": "assistant", "content": answer}], max_len,
                              last_turn_only=True)
    except DataError as e:
        raise DataError(f"{name}: {e}") from None


class PreferenceDataset:
    """Preference pairs, all encoded up front (errors surface before training starts).

    ``source`` is a JSONL path or a list of records. Item ``i`` is ``{"chosen": {"input_ids",
    "labels"}, "rejected": {...}, "index": i}``; ``collate_pairs`` turns a list of items into
    one batch. ``system_prompt`` goes in front of prompts without a system message of their own.
    """

    def __init__(self, source, tokenizer: Tokenizer, max_len: int, system_prompt: str | None = None) -> None:
        #: (N, 2) log pi_ref of each pair's chosen and rejected answer, once a trainer has
        #: precomputed them; batches then carry them as ``reference_logprobs``.
        self.reference_logprobs: numpy.ndarray | None = None
        if isinstance(source, (str, os.PathLike)):
            rows = numbered_objects(source)
        else:
            rows = [(f"record {i}", r) for i, r in enumerate(source)]
        if not rows:
            raise DataError("the preference dataset is empty")
        self.examples = [self._encode(tokenizer, where, record, max_len, system_prompt) for where, record in rows]

    @staticmethod
    def _encode(tokenizer, where, record, max_len, system_prompt) -> dict:
        prompt, chosen, rejected = check_preference(record, where)
        if system_prompt is not None and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system_prompt})
        pair = {}
        for side, answer in (("chosen", chosen), ("rejected", rejected)):
            ids, labels = encode_answer(tokenizer, prompt, answer, max_len, f"{where} ({side})")
            pair[side] = {"input_ids": ids, "labels": labels}
        return pair

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        item = {**self.examples[i], "index": i}
        if self.reference_logprobs is not None:
            item["reference_logprobs"] = self.reference_logprobs[i]
        return item


def collate_pairs(pairs: Sequence[dict], pad_id: int) -> dict[str, numpy.ndarray]:
    """One batch of B pairs: ``input_ids``/``labels``/``attention_mask`` (2B, T) with the chosen
    rows first and the rejected rows after, ``index`` (B,) the pairs' dataset positions and, when
    the dataset has them, ``reference_logprobs`` (2B,) in the same row order."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    batch = collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)
    batch["index"] = numpy.array([p["index"] for p in pairs], dtype=numpy.int64)
    if all("reference_logprobs" in p for p in pairs):
        table = numpy.stack([p["reference_logprobs"] for p in pairs])
        batch["reference_logprobs"] = numpy.concatenate([table[:, 0], table[:, 1]])
    return batch
