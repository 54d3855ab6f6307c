"""Hugging Face's ``tokenizer.json`` (and ``tokenizer_config.json``), read and written for byte-level BPE.

``tokenizer.json`` describes a tokenizer as a pipeline: ``normalizer`` -> ``pre_tokenizer`` ->
``model`` (here ``{"type": "BPE", "vocab": {token: id}, "merges": [...]}``) -> ``decoder``, plus
``added_tokens`` (the special tokens, with their ids). ``tokenizer_config.json`` adds the names of
the eos/pad tokens and, in older folders, ``chat_template`` (newer ones keep the template in
``chat_template.jinja``).

minift reads the byte-level BPE shape only: no normalizer, a ``ByteLevel`` pre-tokenizer (GPT-2's
regex) optionally preceded by ``Digits(individual_digits=true)`` (SmolLM2). Anything else is
refused with the part that differs, rather than tokenized subtly wrong. A fine-tuned real model
is saved with these two files beside its weights, so any Hugging Face tool can read it too.
"""

from __future__ import annotations

import json
from pathlib import Path

from minift.data.bpe import BPETokenizer
from minift.io.safetensors import atomic_write_bytes, read_json

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}
_PRETOKENIZER_JSON = {"gpt2": _BYTE_LEVEL, "smollm": {"type": "Sequence", "pretokenizers": [_DIGITS, _BYTE_LEVEL]}}


def _pretokenizer_kind(spec: dict | None, path: Path) -> str:
    """"gpt2" or "smollm" for the two pre-tokenizer shapes minift implements; else an error."""
    def is_byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space")

    def is_digits(p):
        return p.get("type") == "Digits" and p.get("individual_digits")

    if spec and is_byte_level(spec):
        return "gpt2"
    parts = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else []
    if len(parts) == 2 and is_digits(parts[0]) and is_byte_level(parts[1]):
        return "smollm"
    raise ValueError(f"{path}: pre-tokenizer {json.dumps(spec)[:200]} is not one minift implements "
                     "(ByteLevel, or Digits then ByteLevel)")


def _token_name(value) -> str | None:
    """tokenizer_config.json writes a token as a string or as ``{"content": ...}``."""
    return value.get("content") if isinstance(value, dict) else value


def _check_bpe_model(model: dict, path: Path) -> None:
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r}; minift reads byte-level BPE only")
    for option in ("byte_fallback", "ignore_merges", "continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(option):
            raise ValueError(f"{path}: BPE option {option}={model[option]!r} is not supported")


def _json_object(path: Path) -> dict:
    value = read_json(path, path.name)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds a JSON {type(value).__name__}, but {path.name} is a JSON object; "
                         "save the tokenizer again")
    return value


def _check_vocabulary(model: dict, added: list, path: Path) -> None:
    """The shapes the reader relies on: vocab {token: id}, merges of "a b" strings or pairs, and
    added tokens {"id", "content"}."""
    vocab, merges = model.get("vocab"), model.get("merges")
    if not (isinstance(vocab, dict) and all(type(i) is int for i in vocab.values())):
        raise ValueError(f"{path}: model.vocab must be an object {{token: id}}")
    if not (isinstance(merges, list) and all(isinstance(m, str) and m.count(" ") == 1 or
                                             isinstance(m, list) and len(m) == 2 for m in merges)):
        raise ValueError(f"{path}: model.merges must be a list of \"a b\" strings or [a, b] pairs")
    if not (isinstance(added, list) and all(isinstance(t, dict) and type(t.get("id")) is int
                                            and isinstance(t.get("content"), str) for t in added)):
        raise ValueError(f"{path}: added_tokens must be a list of {{\"id\": int, \"content\": str}}")


def load_tokenizer_json(folder: str | Path) -> BPETokenizer:
    """The ``BPETokenizer`` of a folder with ``tokenizer.json`` (+ ``tokenizer_config.json``)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json")
    data = _json_object(path)
    config_path = folder / "tokenizer_config.json"
    config = _json_object(config_path) if config_path.is_file() else {}
    model = data.get("model", {})
    _check_bpe_model(model, path)
    _check_vocabulary(model, data.get("added_tokens", []), path)
    if data.get("normalizer") is not None:
        raise ValueError(f"{path}: has a normalizer; minift's byte-level BPE applies none")
    ids = {**model["vocab"], **{t["content"]: t["id"] for t in data.get("added_tokens", [])}}
    tokens = sorted(ids, key=ids.get)
    if [ids[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError(f"{path}: token ids are not 0..{len(tokens) - 1} without gaps")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    special = [t["content"] for t in data.get("added_tokens", []) if t.get("special")]
    eos = _token_name(config.get("eos_token"))
    if eos not in ids:
        raise ValueError(f"{folder}: tokenizer_config.json names no eos_token of the vocabulary ({eos!r})")
    pad = _token_name(config.get("pad_token"))
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
    return BPETokenizer(tokens, merges, special, eos_id=ids[eos], pad_id=ids.get(pad),
                        bos_id=ids.get(_token_name(config.get("bos_token"))),
                        pretokenizer=_pretokenizer_kind(data.get("pre_tokenizer"), path), chat_template=template)


def save_tokenizer_json(tokenizer: BPETokenizer, folder: str | Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for ``tokenizer`` into ``folder``."""
    folder = Path(folder)
    data = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for name, i in tokenizer.special_tokens.items()],
        "normalizer": None,
        "pre_tokenizer": _PRETOKENIZER_JSON[tokenizer.pretokenizer],
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokenizer.tokens)},
                  "merges": [list(m) for m in tokenizer.merges]},
    }
    config = {"eos_token": tokenizer.tokens[tokenizer.eos_id], "pad_token": tokenizer.tokens[tokenizer.pad_id],
              "bos_token": None if tokenizer.bos_id is None else tokenizer.tokens[tokenizer.bos_id],
              "chat_template": tokenizer.chat_template, "add_bos_token": False}
    for name, content in (("tokenizer.json", data), ("tokenizer_config.json", config)):
        atomic_write_bytes(folder / name, [json.dumps(content, ensure_ascii=False, indent=1).encode("utf-8")])
