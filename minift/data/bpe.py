"""Byte-level BPE, the tokenizer of GPT-2 and of SmolLM2: what a real model's ids mean.

Encoding a text takes four steps (Sennrich et al. 2016; Radford et al. 2019):

1. **Special tokens** such as ``<|im_start|>`` are cut out first and become their own id.
2. **Pre-tokenization** splits the rest into words with a regex, so merges never cross a word
   boundary: ``"Hello world!"`` -> ``"Hello"``, ``" world"``, ``"!"`` (a space sticks to the word
   after it). SmolLM2 first isolates every digit (``"2024"`` -> ``2 0 2 4``), as llama.cpp's
   ``smollm`` pre-tokenizer and SmolLM2's ``tokenizer.json`` (Digits, then ByteLevel) both do.
3. **Bytes as characters**: each word's UTF-8 bytes are spelled with 256 printable characters
   (``bytes_to_unicode``; the space byte is ``Ġ``), the alphabet the vocabulary is written in.
4. **Merges**: starting from single bytes, repeatedly join the adjacent pair that ranks best
   (earliest) in the merge list, until no listed pair is left. Each final piece is a token.

Decoding maps ids back to their spellings, the spellings back to bytes, and the bytes to text.
No text is ever "unknown": any byte sequence is spelled by the 256 single-byte tokens.

This is plain Python (the ``regex`` module gives the ``\\p{L}`` letter classes the pattern needs);
each distinct word is merged once and then cached, which makes encoding fast enough for
fine-tuning data. The interop tests hold it to Hugging Face ``tokenizers`` id for id. One known
gap: the two libraries' Unicode tables differ in age, so a character assigned after Unicode 14
(and so unknown to ``tokenizers``) may be classed as a letter here and split differently.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence

import regex

from minift.data.tokenizer import render_chatml

#: GPT-2's pre-tokenizer: English contractions, letter runs, number runs, other-symbol runs
#: (each optionally after one space), then whitespace (the run minus its last space when a word
#: follows, so that the word keeps its space).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_GPT2 = regex.compile(GPT2_PATTERN)
_DIGIT = regex.compile(r"(\p{N})")

#: Names of the pre-tokenizers: "gpt2" is the pattern alone, "smollm" isolates digits first.
PRETOKENIZERS = ("gpt2", "smollm")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other
    68 bytes (controls, space, ...) take the characters U+0100, U+0101, ... in byte order, so
    that every token is a string of visible characters (byte 0x20, space, becomes ``Ġ``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def pretokenize(text: str, kind: str = "smollm") -> list[str]:
    """Split ``text`` (no special tokens in it) into the words BPE merges within."""
    if kind == "gpt2":
        return _GPT2.findall(text)
    words = []
    for i, part in enumerate(_DIGIT.split(text)):
        words.extend([part] if i % 2 else _GPT2.findall(part))  # odd parts are the single digits
    return words


def merge_pieces(parts: list[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """BPE's merge loop: join the best-ranked adjacent pair (the leftmost among equals) until
    no pair of ``parts`` is in ``ranks``; -> the final pieces.

    The textbook loop rescans the whole word after every merge, which is quadratic: a 50 MB
    line of letters is one word, and never finished. Here each candidate pair waits in a heap
    keyed by (rank, position) and the pieces form a linked list, so a merge costs O(log n): pop
    the best pair, skip it if either side has changed since it was pushed, join the two pieces,
    and push the (at most two) new pairs with the neighbours. Positions are the pieces' first
    byte offsets, which keep text order as pieces join, so "leftmost" means the same as in the
    rescanning loop and the output is identical (``tests/data/test_bpe.py`` checks it).
    """
    n = len(parts)
    if n < 2:
        return list(parts)
    pieces = list(parts)  # pieces[i]: the piece starting at offset i, or None once merged away
    after = list(range(1, n + 1))  # offset of the next live piece (n: none)
    before = list(range(-1, n - 1))  # offset of the previous live piece (-1: none)
    heap = [(ranks[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in ranks]
    heapq.heapify(heap)

    def push(i: int) -> None:
        j = after[i]
        if i >= 0 and j < n and (pieces[i], pieces[j]) in ranks:
            heapq.heappush(heap, (ranks[pieces[i], pieces[j]], i))

    while heap:
        rank, i = heapq.heappop(heap)
        j = after[i] if pieces[i] is not None else n
        if j >= n or ranks.get((pieces[i], pieces[j])) != rank:
            continue  # stale: one side was merged into something else after this was pushed
        pieces[i], pieces[j] = pieces[i] + pieces[j], None
        after[i] = after[j]
        if after[i] < n:
            before[after[i]] = i
        push(before[i])
        push(i)
    return [p for p in pieces if p is not None]


# ---- chat templates -------------------------------------------------------------------------

#: SmolLM2's template (GGUF ``tokenizer.chat_template``): ChatML, plus a default system message
#: when the conversation does not start with one. ``@SYSTEM@`` stands for that message.
SYSTEM_DEFAULT_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n@SYSTEM@<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def default_system_prompt(template: str | None) -> str | None:
    """The default system message of a ``SYSTEM_DEFAULT_CHATML`` template, None for ``None``.

    Chat templates are Jinja programs; rather than run Jinja, minift recognises the one shape
    it renders (in Python, ``render_chatml``) and refuses others with a clear error.
    """
    if template is None:
        return None
    head, tail = SYSTEM_DEFAULT_CHATML.split("@SYSTEM@")
    middle = template[len(head):len(template) - len(tail)]
    if (template.startswith(head) and template.endswith(tail) and len(template) >= len(head) + len(tail)
            and "'" not in middle and "{" not in middle):
        return middle
    raise ValueError("unsupported chat template: minift renders ChatML with an optional default "
                     f"system message (SmolLM2's template); this one starts {template[:80]!r}")


class BPETokenizer:
    """Byte-level BPE over ``tokens`` (id = position) and ranked ``merges``.

    ``special`` lists the control tokens (``<|im_start|>``, ``<|im_end|>``, ...): matched whole in
    the text when ``allow_special``, never merged, shown by ``decode`` unless skipped.
    ``chat_template`` is the model's template text (see ``default_system_prompt``).
    """

    def __init__(self, tokens: Sequence[str], merges: Iterable[tuple[str, str]], special: Iterable[str],
                 eos_id: int, pad_id: int | None = None, bos_id: int | None = None,
                 pretokenizer: str = "smollm", chat_template: str | None = None) -> None:
        if pretokenizer not in PRETOKENIZERS:
            raise ValueError(f"unknown pre-tokenizer {pretokenizer!r}; known: {', '.join(PRETOKENIZERS)}")
        self.tokens = list(tokens)
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.merges = [tuple(m) for m in merges]
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.special_tokens = {name: self.vocab[name] for name in special}
        self._special_ids = set(self.special_tokens.values())
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        self._special_pattern = regex.compile("(" + "|".join(regex.escape(s) for s in longest_first) + ")")
        self.vocab_size = len(self.tokens)
        #: The most bytes one token spells (each character of a byte-level token is one byte):
        #: a text of more than ``k * max_token_bytes`` bytes is surely more than k tokens long.
        self.max_token_bytes = max((len(t) for t in self.tokens if t not in self.special_tokens), default=1)
        self.eos_id, self.bos_id = eos_id, bos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.pretokenizer = pretokenizer
        self.chat_template = chat_template
        self._cache: dict[str, list[int]] = {}
        if BYTE_TO_CHAR[ord(" ")] not in self.vocab:
            raise ValueError("not a byte-level vocabulary: it has no token 'Ġ' (the space byte)")

    # ---- encode -----------------------------------------------------------------------------
    def bpe(self, word: str) -> list[int]:
        """Ids of one pre-tokenized word: merge the best-ranked adjacent pair until none is left.

        Merging one pair at a time, the leftmost of the best rank first, is what the reference
        implementations do (``merge_pieces`` says how, in time linear-ish in the word's length);
        a cache makes each distinct word cost this only once. A byte with no token of its own is
        dropped, as Hugging Face ``tokenizers`` does when there is no unknown token: SmolLM2 has
        none for 21 bytes that its training text never contained (0xC0, 0xC1 and 0xF5..0xFF
        never occur in UTF-8; 0x04, 0x06 and a few other controls).
        """
        if word in self._cache:
            return self._cache[word]
        parts = [c for c in (BYTE_TO_CHAR[b] for b in word.encode("utf-8")) if c in self.vocab]
        ids = [self.vocab[p] for p in merge_pieces(parts, self.ranks)]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Ids of ``text``. With ``allow_special`` a literal ``<|im_end|>`` is one control id;
        without it those characters are ordinary text (for untrusted content)."""
        chunks = self._special_pattern.split(text) if allow_special and self.special_tokens else [text]
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            if i % 2:  # split() puts the matched special tokens at the odd positions
                ids.append(self.special_tokens[chunk])
            else:
                for word in pretokenize(chunk, self.pretokenizer):
                    ids.extend(self.bpe(word))
        return ids

    # ---- decode -----------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``. Invalid UTF-8 (a model can stop mid-character) becomes U+FFFD."""
        pieces: list[str] = []
        run = bytearray()
        for raw in ids:
            i = int(raw)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary 0..{self.vocab_size - 1}")
            if i not in self._special_ids:
                run.extend(CHAR_TO_BYTE[c] for c in self.tokens[i])
                continue
            pieces.append(run.decode("utf-8", errors="replace"))
            run.clear()
            if not skip_special:
                pieces.append(self.tokens[i])
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    # ---- chat -------------------------------------------------------------------------------
    @property
    def default_system_prompt(self) -> str | None:
        """The system message the template adds when a conversation has none (SmolLM2: "You are
        a helpful AI assistant named SmolLM, trained by Hugging Face"); raises for a template
        minift cannot render, so that only chat use, not plain generation, needs a known one."""
        return default_system_prompt(self.chat_template)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = False) -> str:
        """The model's chat template applied to ``messages``: ChatML, with the default system
        message first when the conversation has none (exactly what SmolLM2's Jinja does)."""
        messages = list(messages)
        if self.default_system_prompt is not None and messages and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.default_system_prompt})
        return render_chatml(messages, add_generation_prompt)

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"pretokenizer={self.pretokenizer!r}, eos={self.tokens[self.eos_id]!r})")

