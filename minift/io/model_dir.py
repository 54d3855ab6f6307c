"""Model folders: minift's own (``config.json`` in minift's keys + ``model.safetensors``) and
Hugging Face Llama folders (``config.json`` in transformers' keys + ``*.safetensors`` shards).

minift's parameter names *are* Hugging Face's, so the tensors of either folder load by name; only
``config.json`` differs, and ``llama_config_from_hf`` translates it key by key.

A minift folder may record ``surgery``: a fine-tuning method that added modules (bottleneck
adapters, prefixes). Rebuilding those needs ``minift.training.methods``, a layer above this one,
so ``read_model`` hands the record up and ``minift.training.pretrained`` applies it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from minift.io.safetensors import atomic_write_bytes, load_file, save_file
from minift.io.tokenizer_json import load_tokenizer_json
from minift.models import LlamaConfig, LlamaForCausalLM


def save_model(model, folder: str | Path, tokenizer: str = "byte", surgery: dict | None = None) -> Path:
    """Write ``model`` (all its parameters) and its config to ``folder``.

    ``surgery`` records a method that added modules (bottleneck adapters, prefixes), as
    ``{"method": ..., **options}``, so the same layout can be rebuilt before the weights load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), folder / "model.safetensors", metadata={"format": "minift"})
    config = {"architecture": "llama", "tokenizer": tokenizer, **model.config.to_dict()}
    if surgery:
        config["surgery"] = surgery
    atomic_write_bytes(folder / "config.json", [json.dumps(config, indent=2).encode()])
    return folder


@dataclass
class SavedModel:
    """What a minift model folder holds, before any model is built from it."""

    config: LlamaConfig
    tokenizer: str  # "byte" or "bpe" (then tokenizer.json is beside it)
    surgery: dict | None  # {"method": ..., **options} of a method that added modules, or None
    state: dict  # parameter name -> array


def read_model(folder: str | Path) -> SavedModel:
    """Read a folder written by ``save_model`` without building the model."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder} is not a minift model folder (no config.json)")
    config = json.loads(config_path.read_text())
    if config.pop("architecture", "llama") != "llama":
        raise ValueError(f"{config_path}: unsupported architecture")
    tokenizer = config.pop("tokenizer", "byte")
    surgery = config.pop("surgery", None)
    return SavedModel(LlamaConfig(**config), tokenizer, surgery, load_file(folder / "model.safetensors"))


def load_model(folder: str | Path):
    """-> (model, tokenizer name) from a folder written by ``save_model`` for a plain Llama
    (``minift.load_pretrained`` also loads folders whose method added modules)."""
    saved = read_model(folder)
    if saved.surgery:
        raise ValueError(f"{folder} was saved after method {saved.surgery.get('method')!r} added modules; "
                         "load it with minift.load_pretrained, which rebuilds them")
    model = LlamaForCausalLM(saved.config)
    model.load_state_dict(saved.state)
    return model, saved.tokenizer


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
