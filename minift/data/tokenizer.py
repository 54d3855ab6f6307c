"""Tokenizers: text <-> integer ids, and the ChatML template every chat model here is trained on.

A model never sees characters, only ids from a fixed vocabulary. ``ByteTokenizer`` is the
simplest vocabulary that can spell *any* text: ids 0..255 are the 256 possible UTF-8 bytes,
so nothing is ever "unknown", followed by four control tokens:

    256 <|endoftext|>   separates documents in plain-text pretraining
    257 <|im_start|>    opens a chat turn: <|im_start|>{role}\\n
    258 <|im_end|>      closes a turn; for an assistant turn it is the "stop" signal (eos_id)
    259 <|pad|>         fills the right end of short rows in a batch (never a training target)

The price of bytes is length (one id per byte, so about 4x more positions than a BPE
tokenizer); the gain is that a from-scratch model needs no vocabulary-building step.

Lecture 000 notes that fine-tuning leaves the tokenizer alone: the pretrained model and its
fine-tuned copies share one vocabulary. So does the chat format. ChatML, rendered by
``render_chatml``, is the template SmolLM2-Instruct was trained with, which lets one template
serve the toy byte-level model and the real one. ``Tokenizer`` is the protocol both satisfy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

ENDOFTEXT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
CHAT_ROLES = ("system", "user", "assistant")


@runtime_checkable
class Tokenizer(Protocol):
    """What datasets, the trainer and ``generate`` need from any tokenizer (byte or BPE)."""

    vocab_size: int
    eos_id: int
    pad_id: int
    special_tokens: dict[str, int]

    def encode(self, text: str, allow_special: bool = True) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str: ...

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = False) -> str: ...


def render_chatml(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The ChatML text of a conversation: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message.

    With ``add_generation_prompt`` the text ends with an opened assistant turn,
    ``<|im_start|>assistant\\n``, so that what the model writes next is the reply.
    """
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then the four special tokens (see the module docstring)."""

    def __init__(self) -> None:
        names = (ENDOFTEXT, IM_START, IM_END, PAD)
        self.special_tokens: dict[str, int] = {name: 256 + i for i, name in enumerate(names)}
        self._special_names = {i: name for name, i in self.special_tokens.items()}
        self._special_pattern = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")
        self.vocab_size = 256 + len(names)
        self.eos_id = self.special_tokens[IM_END]
        self.pad_id = self.special_tokens[PAD]

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Ids of ``text``. With ``allow_special`` a literal ``<|im_end|>`` becomes one control id;
        without it, those characters are ordinary bytes (use this for untrusted content, so that
        data can never forge a turn boundary)."""
        if not allow_special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for i, part in enumerate(self._special_pattern.split(text)):
            if i % 2:  # re.split puts the captured separators at the odd positions
                ids.append(self.special_tokens[part])
            else:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``. Byte runs that are not valid UTF-8 (a model can emit half a character)
        decode to U+FFFD instead of raising; special ids print as their names unless skipped."""
        pieces: list[str] = []
        run = bytearray()
        for raw in ids:
            i = int(raw)
            if 0 <= i < 256:
                run.append(i)
                continue
            if i not in self._special_names:
                raise ValueError(f"token id {i} is outside the vocabulary 0..{self.vocab_size - 1}")
            pieces.append(run.decode("utf-8", errors="replace"))
            run.clear()
            if not skip_special:
                pieces.append(self._special_names[i])
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = False) -> str:
        return render_chatml(messages, add_generation_prompt)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"
