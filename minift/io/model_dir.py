"""Model folders: minift's own (``config.json`` in minift's keys + ``model.safetensors``) and
Hugging Face Llama folders (``config.json`` in transformers' keys + ``*.safetensors`` shards).

minift's parameter names *are* Hugging Face's, so the tensors of either folder load by name; only
``config.json`` differs: ``llama_config_from_hf`` translates it key by key, ``hf_config_from_llama``
back. ``save_hf_folder`` writes the folder transformers, vLLM and minift all load: the way a
fine-tuned model leaves minift.

A minift folder may record ``surgery``: a fine-tuning method that added modules (bottleneck
adapters, prefixes). Rebuilding those needs ``minift.training.methods``, a layer above this one,
so ``read_model`` hands the record up and ``minift.training.pretrained`` applies it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy

from minift.data import ByteTokenizer
from minift.data.bpe import BYTE_TO_CHAR, BPETokenizer
from minift.io.safetensors import atomic_write_bytes, load_file, read_json, save_file
from minift.io.tokenizer_json import load_tokenizer_json, save_tokenizer_json
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.models.llama import LlamaAttention, LlamaBlock, LlamaMLP, LlamaModel
from minift.nn import Embedding, Linear, ModuleList, RMSNorm

#: A Hugging Face folder's weights: one file, or shards listed by the index.
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"


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
    """Read a folder written by ``save_model`` without building the model.

    Everything is checked first: ``config.json`` must be an object of LlamaConfig's fields, and
    the weights must hold at least as many values as that config's model (a corrupt
    ``n_layers: 1000000`` is refused here, not after allocating a million layers)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder} is not a minift model folder (no config.json)")
    config = _json_object(config_path, "a model's config.json")
    if config.pop("architecture", "llama") != "llama":
        raise ValueError(f"{config_path}: unsupported architecture")
    tokenizer = config.pop("tokenizer", "byte")
    surgery = config.pop("surgery", None)
    unknown = sorted(set(config) - set(LlamaConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{config_path}: unknown fields {unknown}; a minift config.json holds "
                         f"{', '.join(LlamaConfig.__dataclass_fields__)}, architecture, tokenizer and surgery")
    llama = _llama_config(config_path, **config)
    state = load_file(folder / "model.safetensors")
    check_weights_fit(llama, state, config_path)
    return SavedModel(llama, tokenizer, surgery, state)


def _json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path``; anything else (a list, bad JSON, a folder) is a clear error."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds a JSON {type(value).__name__}, but {what} is a JSON object "
                         "{\"key\": value, ...}; fix or rewrite the file")
    return value


def _llama_config(path: Path, **fields) -> LlamaConfig:
    """``LlamaConfig(**fields)``, its refusal naming the file the fields came from."""
    try:
        return LlamaConfig(**fields)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def check_weights_fit(config: LlamaConfig, state: dict, path) -> None:
    """Refuse a config whose model needs more numbers than the weights store: building it first
    would allocate what the (few-byte) config claims, before any mismatch could be noticed."""
    stored = sum(int(array.size) for array in state.values())
    if config.num_parameters > stored:
        raise ValueError(f"{path}: describes a model of {config.num_parameters:,} parameters, but its weights "
                         f"hold {stored:,} values; the config and the weights are from different models")


def _hf_field(hf: dict, key: str, path):
    if key not in hf:
        raise KeyError(f"{path}: no {key!r}; a Hugging Face Llama config.json needs it")
    return hf[key]


def llama_config_from_hf(hf: dict, path: Path | str = "config.json") -> LlamaConfig:
    """minift's ``LlamaConfig`` from a Hugging Face Llama ``config.json`` (transformers 4 or 5 keys)."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"{path}: model_type {hf.get('model_type')!r}; minift loads 'llama' models")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r}; Llama's MLP uses silu")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 | 4
    if not isinstance(rope, dict):
        raise ValueError(f"{path}: rope_parameters / rope_scaling is {rope!r}, expected an object")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{path}: RoPE scaling {rope} is not implemented in minift")
    heads = _hf_field(hf, "num_attention_heads", path)
    config = _llama_config(
        path, vocab_size=_hf_field(hf, "vocab_size", path), dim=_hf_field(hf, "hidden_size", path),
        n_layers=_hf_field(hf, "num_hidden_layers", path), n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_dim=_hf_field(hf, "intermediate_size", path),
        max_seq_len=_hf_field(hf, "max_position_embeddings", path),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 1e4)), norm_eps=_hf_field(hf, "rms_norm_eps", path),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
        init_std=hf.get("initializer_range", 0.02))
    if hf.get("head_dim", config.head_dim) != config.head_dim:
        raise ValueError(f"{path}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    return config


def load_hf_folder(folder: Path):
    """-> (model, tokenizer) from a Hugging Face Llama folder (weights may be sharded); the
    config is checked against the stored weights before the model is built."""
    config_path = folder / "config.json"
    config = llama_config_from_hf(_json_object(config_path, "a model's config.json"), config_path)
    state = {name: array for shard in _weight_files(folder) for name, array in load_file(shard).items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # some writers store the tied copy too
    check_weights_fit(config, state, config_path)
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    tokenizer = load_tokenizer_json(folder)
    return model, ByteTokenizer() if _is_byte_vocabulary(tokenizer) else tokenizer


def _weight_files(folder: Path) -> list[Path]:
    """The shards the index names, else ``model.safetensors``, else every ``*.safetensors``."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = _json_object(index, "a shard index").get("weight_map")
        if not (isinstance(weight_map, dict) and all(isinstance(f, str) and "/" not in f for f in weight_map.values())):
            raise ValueError(f"{index}: weight_map must map tensor names to shard file names in this folder")
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder} has config.json but no *.safetensors weights")
    return shards


# ---- writing a Hugging Face folder --------------------------------------------------------------

#: ``save_hf_folder``'s dtypes -> (safetensors dtype, ``torch_dtype`` of config.json).
HF_DTYPES = {"f32": ("F32", "float32"), "f16": ("F16", "float16"), "bf16": ("BF16", "bfloat16")}

#: The Jinja text of ``minift.data.render_chatml`` (ChatML, no default system message): the
#: chat template a byte-tokenizer model carries, so transformers renders chats as minift does.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

#: The modules of a plain Llama: a model holding any other one has parts config.json cannot name.
_LLAMA_MODULES = (LlamaForCausalLM, LlamaModel, LlamaBlock, LlamaAttention, LlamaMLP, ModuleList, Linear,
                  Embedding, RMSNorm)
_MERGE = "merge the LoRA into the weights first: model = model.merge_and_unload()"
_HINTS = {"PeftModel": _MERGE, "LoraLinear": _MERGE,
          "Linear4bit": "dequantize the 4-bit weights first: minift.nn.dequantize_model(model)"}
_OWN_FORMAT = ("a Llama config.json cannot describe it; keep minift's own format: "
               "minift.training.pretrained.save_pretrained(model, tokenizer, folder, surgery=...)")


def hf_config_from_llama(config: LlamaConfig, *, dtype: str = "f32", bos_id: int | None = None,
                         eos_id: int | None = None, pad_id: int | None = None) -> dict:
    """transformers' ``config.json`` of a Llama with ``config``: the inverse of ``llama_config_from_hf``.

    RoPE's base is written both ways (``rope_theta``, transformers 4 and vLLM; ``rope_parameters``,
    transformers 5), so either generation of tools reads it."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": config.vocab_size, "hidden_size": config.dim, "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias, "attention_dropout": 0.0, "initializer_range": config.init_std,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "torch_dtype": HF_DTYPES[dtype][1], "use_cache": True,
    }


def save_hf_folder(model, tokenizer, folder: str | Path, *, dtype: str = "f32", max_shard_bytes: int = 2 * 1024**3,
                   base_name: str | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face Llama folder -> the folder.

    ``config.json``, ``generation_config.json``, the weights in ``dtype`` ("f32", "f16", "bf16")
    as ``model.safetensors`` or, past ``max_shard_bytes``, as ``model-0000i-of-0000N.safetensors``
    shards with ``model.safetensors.index.json``; ``tokenizer.json`` + ``tokenizer_config.json``
    with the chat template; with ``base_name``, a ``README.md`` model card naming the base model.

    Everything is checked before the first byte is written. Each file goes to a temporary name
    and is renamed into place, and ``config.json``, the file that makes a folder a model, comes
    last: a save killed half-way leaves no half-written file and no config over missing weights.
    """
    folder = Path(folder)
    if dtype not in HF_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} for a Hugging Face folder; choose one of {', '.join(HF_DTYPES)}")
    _check_plain_llama(model)
    bpe = _as_bpe(tokenizer)
    _make_folder(folder)
    _write_weights(model.state_dict(), folder, HF_DTYPES[dtype][0], max_shard_bytes)
    save_tokenizer_json(bpe, folder)
    ids = {"bos_id": bpe.bos_id, "eos_id": bpe.eos_id, "pad_id": bpe.pad_id}
    _write_json(folder / "generation_config.json",
                {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"]})
    if base_name:
        atomic_write_bytes(folder / "README.md", [_model_card(base_name).encode("utf-8")])
    _write_json(folder / "config.json", hf_config_from_llama(model.config, dtype=dtype, **ids))
    return folder


def _check_plain_llama(model) -> None:
    """Refuse a model with modules a Llama ``config.json`` cannot express, saying what to do."""
    for name, module in model.named_modules():
        if type(module) not in _LLAMA_MODULES:
            kind = type(module).__name__
            raise ValueError(f"cannot save as a Hugging Face Llama folder: module {name or '(the model)'!r} "
                             f"is a {kind}; {_HINTS.get(kind, _OWN_FORMAT)}")
    for name, param in model.named_parameters():
        if not numpy.isfinite(param.data).all():
            raise ValueError(f"cannot save: parameter {name} has NaN or infinite values (did training diverge?)")


def byte_tokenizer_as_bpe() -> BPETokenizer:
    """minift's ``ByteTokenizer`` as a byte-level BPE with no merges: token i is byte i (in GPT-2's
    byte -> character table), then the four control tokens. Without merges, BPE leaves every
    byte its own token, so Hugging Face ``tokenizers`` gives exactly the byte tokenizer's ids."""
    byte = ByteTokenizer()
    names = sorted(byte.special_tokens, key=byte.special_tokens.get)
    return BPETokenizer([BYTE_TO_CHAR[b] for b in range(256)] + names, [], names, eos_id=byte.eos_id,
                        pad_id=byte.pad_id, pretokenizer="gpt2", chat_template=CHATML_TEMPLATE)


def _is_byte_vocabulary(tokenizer: BPETokenizer) -> bool:
    """Whether a loaded tokenizer is ``byte_tokenizer_as_bpe`` (then minift uses its ByteTokenizer)."""
    return not tokenizer.merges and tokenizer.tokens == byte_tokenizer_as_bpe().tokens


def _as_bpe(tokenizer) -> BPETokenizer:
    if isinstance(tokenizer, ByteTokenizer):
        return byte_tokenizer_as_bpe()
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer
    raise TypeError(f"cannot write a tokenizer of type {type(tokenizer).__name__} as tokenizer.json")


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the model folder {folder}: {exc.strerror or exc}") from exc


def _shards(state: dict, value_bytes: int, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped in order into shards of at most ``max_shard_bytes`` (a bigger tensor alone)."""
    shards, size = [[]], 0
    for name, array in state.items():
        nbytes = array.size * value_bytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards, size = [*shards, []], 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_weights(state: dict, folder: Path, storage: str, max_shard_bytes: int) -> None:
    """One ``model.safetensors``, or shards and their index; weight files of an earlier save that
    this one does not rewrite are removed last, so no reader mixes two saves."""
    value_bytes = 4 if storage == "F32" else 2
    shards = _shards(state, value_bytes, max_shard_bytes)
    files = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for file, names in zip(files, shards):
        save_file({n: state[n] for n in names}, folder / file, metadata={"format": "pt"}, dtype=storage)
    if len(shards) == 1:
        (folder / INDEX_NAME).unlink(missing_ok=True)
    else:
        weight_map = {n: file for file, names in zip(files, shards) for n in names}
        total = sum(state[n].size * value_bytes for n in state)
        _write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    for stale in set(folder.glob("model*.safetensors")) - {folder / f for f in files}:
        stale.unlink()  # only now: until the new index is in place, the old one may name these


def _model_card(base_name: str) -> str:
    return f"---\nbase_model: {base_name}\nlibrary_name: transformers\ntags:\n- minift\n---\n\n" \
           f"A fine-tune of `{base_name}`, exported by minift.\n"


def _write_json(path: Path, content: dict) -> None:
    atomic_write_bytes(path, [json.dumps(content, indent=2, ensure_ascii=False).encode("utf-8")])
