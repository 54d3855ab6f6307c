"""A saved minift model: a folder with ``config.json`` and ``model.safetensors``.

The same two-file shape as a Hugging Face model folder, so it can be inspected with any
safetensors tool; ``config.json`` holds minift's ``LlamaConfig`` fields and the tokenizer name.
"""

from __future__ import annotations

import json
from pathlib import Path

from minift.io.safetensors import atomic_write_bytes, load_file, save_file


def save_model(model, folder: str | Path, tokenizer: str = "byte", surgery: dict | None = None) -> Path:
    """Write ``model`` (all its parameters) and its config to ``folder``.

    ``surgery`` records a method that added modules (bottleneck adapters, prefixes), as
    ``{"method": ..., **options}``, so ``load_model`` can rebuild the same layout first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), folder / "model.safetensors", metadata={"format": "minift"})
    config = {"architecture": "llama", "tokenizer": tokenizer, **model.config.to_dict()}
    if surgery:
        config["surgery"] = surgery
    atomic_write_bytes(folder / "config.json", [json.dumps(config, indent=2).encode()])
    return folder


def load_model(folder: str | Path):
    """-> (model, tokenizer name) from a folder written by ``save_model``."""
    from minift.models import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415 - io must not need models at import

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder} is not a minift model folder (no config.json)")
    config = json.loads(config_path.read_text())
    if config.pop("architecture", "llama") != "llama":
        raise ValueError(f"{config_path}: unsupported architecture")
    tokenizer = config.pop("tokenizer", "byte")
    surgery = config.pop("surgery", None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    if surgery:
        from minift.methods import MethodOptions, prepare_model  # noqa: PLC0415

        method = surgery.pop("method")
        model, _ = prepare_model(model, method, MethodOptions(**surgery))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model, tokenizer
