"""A tiny base model and LoRA adapters of different ranks and targets, saved in PEFT's format
with minift's own ``PeftModel`` (the training path), plus the merged reference models."""

from __future__ import annotations

import copy
import json

import numpy as np

from minift.io import load_file, save_file
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.peft import LoraConfig, PeftModel, get_peft_model
from minift.serve import AdapterLibrary, ServingEngine

# init_std 0.2 spreads the logits, so greedy decoding visits many tokens instead of repeating one
CONFIG = dict(vocab_size=48, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=40, init_std=0.2)

#: name -> LoraConfig: ranks 1..8, different target sets, one rsLoRA, one on a single block
ADAPTERS = {
    "r1": LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
    "r3": LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=True),
    "r8": LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]),
    "r2": LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"], layers_to_transform=[1]),
}


def base_model(dtype=np.float64, **overrides) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**{**CONFIG, **overrides}), seed=0).to(dtype)


def write_adapters(root, names=tuple(ADAPTERS), **overrides) -> dict:
    """Save each adapter (B random, as after training) under ``root``; -> {name: folder}."""
    folders = {}
    for i, name in enumerate(names):
        peft = get_peft_model(base_model(**overrides), copy.deepcopy(ADAPTERS[name]))
        rng = np.random.default_rng(100 + i)
        for pname, p in peft.named_parameters():
            if ".lora_B." in pname:
                p.data = rng.normal(0.0, 0.3, p.shape)
        folders[name] = peft.save_pretrained(root / name)
    return folders


def rewrite(folder, tmp_path, change):
    """A copy of the adapter in ``folder`` with ``change(tensors, config)`` applied: how the
    library's checks are shown a broken adapter."""
    tensors = load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    change(tensors, config)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return tmp_path


def make_engine(folders: dict, dtype=np.float64, **engine_kwargs) -> ServingEngine:
    model = base_model(dtype)
    library = AdapterLibrary(model)
    for name, folder in folders.items():
        library.add(name, folder)
    return ServingEngine(model, library, **engine_kwargs)


def merged_reference(folder, dtype=np.float64) -> LlamaForCausalLM:
    """The request-alone reference: the adapter merged into a copy of the base weights."""
    base = base_model(dtype)
    if folder is None:
        return base
    return PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload()


def write_overflowing_adapter(root, dtype=np.float32, **overrides):
    """An adapter the library accepts (finite, right shapes) whose B is so large that a float32
    forward overflows: its rows get non-finite logits, a failure only the batch can see."""
    peft = get_peft_model(base_model(dtype, **overrides), copy.deepcopy(ADAPTERS["r1"]))
    for pname, p in peft.named_parameters():
        if ".lora_B." in pname:
            p.data = np.full(p.shape, np.finfo(dtype).max, dtype)
    return peft.save_pretrained(root / "overflow")
