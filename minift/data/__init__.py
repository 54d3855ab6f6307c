"""Data: tokenizers, instruction/chat and plain-text datasets, batching, and the bundled data sets.

Reading order: ``tokenizer.py`` (text <-> ids, the ChatML template), ``instructions.py`` (records
-> messages -> input_ids and prompt-masked labels), ``loader.py`` (padding and the resumable
batch order), ``packing.py`` (several examples per row instead of padding).
``bundled/README.md`` describes the data sets shipped with minift, written by
``tools/bundled_data/make_bundled.py``.
"""

from pathlib import Path

from minift.data.instructions import (
    IGNORE_INDEX,
    DataError,
    InstructionDataset,
    TextDataset,
    check_record,
    encode_example,
    load_jsonl,
    load_qa,
    to_messages,
)
from minift.data.loader import DataLoader, collate
from minift.data.packing import collate_packed, pack_examples, padding_share
from minift.data.tokenizer import ByteTokenizer, Tokenizer, render_chatml

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


def bundled_path(name: str) -> Path:
    """Path of a bundled data file, e.g. ``bundled_path("insurer_train.jsonl")``."""
    path = BUNDLED_DIR / name
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in BUNDLED_DIR.iterdir())) if BUNDLED_DIR.is_dir() else "none"
        raise FileNotFoundError(f"no bundled file {name!r}; bundled files: {known}")
    return path


__all__ = [
    "BUNDLED_DIR",
    "IGNORE_INDEX",
    "ByteTokenizer",
    "DataError",
    "DataLoader",
    "InstructionDataset",
    "TextDataset",
    "Tokenizer",
    "bundled_path",
    "check_record",
    "collate",
    "collate_packed",
    "encode_example",
    "load_jsonl",
    "load_qa",
    "pack_examples",
    "padding_share",
    "render_chatml",
    "to_messages",
]
