"""Instruction and chat data: JSONL records -> chat messages -> (input_ids, labels) for training.

Lecture 002 describes instruction fine-tuning with records shaped like
``{"instruction": ..., "input": ..., "output": ...}``: a task, optional material to apply it to,
and the answer we want. Chat data (``{"messages": [{"role", "content"}, ...]}``) generalises this
to several turns. Both shapes become one list of messages, rendered with the ChatML template
(``tokenizer.render_chatml``), and the trainer then learns to continue the prompt with the answer.

Labels are *pre-shifted*: ``labels[t]`` is the id that should follow ``input_ids[t]`` (or IGNORE_INDEX,
"no loss here"), so the loss is plain cross-entropy of ``logits[t]`` against ``labels[t]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy

from minift.autograd.nn_ops import IGNORE_INDEX  # the label the loss leaves out
from minift.data.tokenizer import CHAT_ROLES, IM_END, IM_START, ByteTokenizer, Tokenizer


class DataError(ValueError):
    """A data file or record that cannot be used; the message says where and what is wrong."""


# ---- reading JSONL -----------------------------------------------------------------------


def numbered_objects(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """(``"file:line"``, object) for every non-blank line; a line that is not UTF-8, not JSON,
    nested too deep to parse, or not an object raises ``DataError`` naming ``file:line``."""
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder; point at a .jsonl file (one JSON record per line)")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = _decoded(raw, where)
            if line.strip():
                rows.append((where, _parsed_object(line, where)))
    if not rows:
        raise DataError(f"{path}: no records (the file is empty)")
    return rows


def _decoded(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1}); "
                        "convert the file to UTF-8") from None


def _parsed_object(line: str, where: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested deeper than the parser can follow; a record is an object "
                        "of strings and a list of messages, so this line is corrupt") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _require_string(record: Mapping, key: str, where: str, optional: bool = False) -> None:
    if key not in record:
        if optional:
            return
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(record[key], str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")


def check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        here = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{here} must be an object with 'role' and 'content'")
        _require_string(m, "role", here)
        _require_string(m, "content", here)
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"{here}: role {m['role']!r} is not one of {', '.join(CHAT_ROLES)}")
        if m["role"] == "system" and i > 0:
            raise DataError(f"{here}: a system message may only come first")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (it is what is learned)")


def check_record(record, where: str) -> None:
    """Raise ``DataError`` unless ``record`` is an instruction record or a chat record."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if "messages" in record:
        if "instruction" in record:
            raise DataError(f"{where}: has both 'messages' and 'instruction'; use one shape")
        check_messages(record["messages"], where)
        return
    _require_string(record, "instruction", where)
    _require_string(record, "input", where, optional=True)
    _require_string(record, "output", where)
    if not record["instruction"].strip():
        raise DataError(f"{where}: 'instruction' is empty")


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """Instruction or chat records of a JSONL file, each checked; errors name ``file:line``."""
    rows = numbered_objects(path)
    for where, record in rows:
        check_record(record, where)
    return [record for _, record in rows]


def load_qa(path: str | os.PathLike) -> list[dict]:
    """Question-answer records ``{"question", "answer", "choices"?, "cloze"?}`` (the forgetting probe).

    ``choices`` (if present) lists the candidates, the answer among them, for scoring by
    likelihood; ``cloze`` is a statement the answer completes, for a base model that was never
    taught to answer questions.
    """
    rows = numbered_objects(path)
    for where, record in rows:
        for key in ("question", "answer"):
            _require_string(record, key, where)
        _require_string(record, "cloze", where, optional=True)
        choices = record.get("choices", [record["answer"]])
        if not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
            raise DataError(f"{where}: 'choices' must be a list of strings")
        if record["answer"] not in choices:
            raise DataError(f"{where}: the answer {record['answer']!r} is not among the choices")
    return [record for _, record in rows]


# ---- records -> messages -> ids ------------------------------------------------------------


def to_messages(record: Mapping, system_prompt: str | None = None) -> list[dict]:
    """The chat messages of one record.

    An instruction record becomes [system?, user, assistant]: the user turn is the instruction,
    followed by a blank line and the input when the input is non-empty. A chat record keeps its
    messages; ``system_prompt`` is put in front only when the record has no system message of its
    own (the record knows its context better than a global default).
    """
    if "messages" in record:
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        has_system = messages[0]["role"] == "system"
    else:
        extra = record.get("input", "")
        user = record["instruction"] + (f"\n\n{extra}" if extra else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        has_system = False
    if system_prompt is not None and not has_system:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def chat_pieces(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[tuple[list[int], bool]]:
    """The ChatML rendering as consecutive (ids, is_target) pieces, in text order.

    Encoding piece by piece (instead of the whole string at once) is what makes the loss mask
    line up with the tokens exactly. Message content is encoded with ``allow_special=False``:
    a user who types ``<|im_end|>`` produces bytes, not a real end-of-turn.
    """
    start, end = tokenizer.special_tokens[IM_START], tokenizer.special_tokens[IM_END]
    newline = tokenizer.encode("\n", allow_special=False)
    pieces = []
    for m in messages:
        learned = m["role"] == "assistant"
        pieces += [([start, *tokenizer.encode(f"{m['role']}\n", allow_special=False)], False),
                   (tokenizer.encode(m["content"], allow_special=False), learned),
                   ([end], learned),
                   (newline, False)]
    return pieces


def _within_budget(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], max_len: int, truncate: bool,
                   name: str, remedy: str) -> Sequence[Mapping[str, str]]:
    """``messages``, checked by length *before* tokenizing: a content of more than ``budget``
    characters cannot fit ``max_len`` tokens, because one token spells at most
    ``tokenizer.max_token_bytes`` bytes (1 for the byte tokenizer). Refusing it (or cutting it to
    twice the budget, with ``truncate``) costs nothing, where tokenizing a 50 MB line first costs
    minutes. The cut lies far past the tokens kept, so they are the full text's tokens, unless a
    single word is longer than the budget (then its last kept tokens may split differently)."""
    token_bytes = 1 if isinstance(tokenizer, ByteTokenizer) else getattr(tokenizer, "max_token_bytes", None)
    if token_bytes is None:  # a tokenizer that does not say: only tokenizing can tell
        return messages
    budget = (max_len + 1) * token_bytes
    long = [i for i, m in enumerate(messages) if len(m["content"]) > budget]
    if not long:
        return messages
    if not truncate:
        chars = len(messages[long[0]]["content"])
        raise DataError(f"{name} is too long: message {long[0]} has {chars:,} characters, more than "
                        f"max_len={max_len} tokens can hold; {remedy}")
    return [{**m, "content": m["content"][:2 * budget]} for m in messages]


def encode_example(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], max_len: int, *,
                   truncate: bool = False, index: int | None = None,
                   last_turn_only: bool = False) -> tuple[numpy.ndarray, numpy.ndarray]:
    """``(input_ids, labels)`` of one conversation, int64 arrays of equal length <= ``max_len``.

    Let ``s`` be the ids of the whole rendered chat (``render_chatml(messages)``). Then
    ``input_ids = s[:-1]`` and ``labels[t] = s[t + 1]`` when ``s[t + 1]`` is a *target* token, else
    -100. So ``decode(input_ids)`` is the rendered text without its last token (the ``\\n`` that
    closes the final turn), and that last token is never a target.

    Targets are the content of every assistant turn plus its closing ``<|im_end|>``. Everything
    else (system prompt, user turns, the ``<|im_start|>assistant\\n`` headers) is masked: this is the
    *prompt masking* of instruction tuning. Why: at inference the prompt is given, never
    generated, so the only thing worth learning is p(answer | prompt). Counting the prompt would
    spend capacity on imitating users and on reciting the (identical in every example) system
    prompt, whose easy tokens would also dilute the loss that measures the answers. Counting
    ``<|im_end|>`` teaches the model to *stop* after its answer (``eos_id``).

    ``last_turn_only``: only the final message (an assistant's) is a target; earlier assistant
    turns count as prompt. That is how preference tuning scores an answer to a conversation
    (``minift.data.preference``), and such an answer is never cut: it must fit whole.

    ``max_len`` bounds ``len(input_ids)`` (the model's context). A longer chat raises ``DataError``,
    or with ``truncate=True`` is cut to its first ``max_len + 1`` ids.
    """
    if truncate and last_turn_only:
        raise ValueError("encode_example: an answer scored alone (last_turn_only) must not be truncated")
    name = "example" if index is None else f"example {index}"
    remedy = "shorten it or raise max_len" + ("" if last_turn_only else ", or pass truncate=True")
    messages = _within_budget(tokenizer, messages, max_len, truncate, name, remedy)
    pieces = chat_pieces(tokenizer, messages)
    if last_turn_only:  # the last message is the last four pieces (header, content, end, newline)
        pieces = [(ids, False) for ids, _ in pieces[:-4]] + pieces[-4:]
    ids = numpy.array([i for p, _ in pieces for i in p], dtype=numpy.int64)
    target = numpy.array([t for p, t in pieces for _ in p], dtype=bool)
    if len(ids) - 1 > max_len:
        if not truncate:
            raise DataError(f"{name} is {len(ids) - 1} tokens long but max_len is {max_len}; {remedy}")
        ids, target = ids[:max_len + 1], target[:max_len + 1]
    labels = numpy.where(target[1:], ids[1:], IGNORE_INDEX)
    if not (labels != IGNORE_INDEX).any():
        raise DataError(f"{name}: no assistant token is left within max_len={max_len}")
    return ids[:-1], labels


# ---- datasets -----------------------------------------------------------------------------


class InstructionDataset:
    """Instruction/chat examples, all encoded up front (errors surface before training starts).

    ``source`` is a JSONL path or a list of records. Items are
    ``{"input_ids": (T,) int64, "labels": (T,) int64}`` with pre-shifted, prompt-masked labels.
    """

    def __init__(self, source, tokenizer: Tokenizer, max_len: int, system_prompt: str | None = None,
                 truncate: bool = False) -> None:
        if isinstance(source, (str, os.PathLike)):
            records = load_jsonl(source)
        else:
            records = list(source)
            for i, record in enumerate(records):
                check_record(record, f"record {i}")
        if not records:
            raise DataError("the instruction dataset is empty")
        self.tokenizer, self.max_len = tokenizer, max_len
        self.examples = [encode_example(tokenizer, to_messages(r, system_prompt), max_len,
                                        truncate=truncate, index=i) for i, r in enumerate(records)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, numpy.ndarray]:
        input_ids, labels = self.examples[i]
        return {"input_ids": input_ids, "labels": labels}


class TextDataset:
    """Plain text for (pre)training: every position predicts the next token, nothing is masked.

    The token stream is cut into blocks of ``block_size + 1`` ids that overlap by one id (block i
    starts at ``i * block_size``), so every token after the first is a target exactly once:
    ``input_ids = block[:-1]``, ``labels = block[1:]``. The ragged tail is dropped. A literal
    ``<|endoftext|>`` in the text becomes the document separator id.
    """

    def __init__(self, text: str, tokenizer: Tokenizer, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.ids = numpy.array(tokenizer.encode(text), dtype=numpy.int64)
        self.block_size = block_size
        if len(self) == 0:
            raise DataError(f"the text has {len(self.ids)} tokens; one block needs block_size + 1 = "
                            f"{block_size + 1}")

    def __len__(self) -> int:
        return max(0, (len(self.ids) - 1) // self.block_size)

    def __getitem__(self, i: int) -> dict[str, numpy.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range for {len(self)} blocks")
        block = self.ids[i * self.block_size:(i + 1) * self.block_size + 1]
        return {"input_ids": block[:-1], "labels": block[1:]}

