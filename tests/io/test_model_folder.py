"""Model folders, adapter folders and the configs in them, refused with the file and field named
before anything is built: counts a few bytes long that would allocate gigabytes, non-finite or
out-of-range numbers, JSON of the wrong shape, and adapters that fail half-way through loading."""

import json

import numpy as np
import pytest

from minift.data import ByteTokenizer
from minift.io import AdapterFormatError, read_model, save_model
from minift.io.model_dir import load_hf_folder, save_hf_folder
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.peft import LoraConfig, PeftModel, get_peft_model


def tiny(**changes):
    config = dict(vocab_size=260, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)
    return LlamaForCausalLM(LlamaConfig(**{**config, **changes}), seed=0)


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ---- LlamaConfig: types, ranges and limits -------------------------------------------------


@pytest.mark.parametrize(("field", "value", "message"), [
    ("n_layers", 10**6, r"n_layers = 1000000 is above minift's limit LlamaConfig.LIMITS\['n_layers'\] = 1024"),
    ("vocab_size", 10**9, r"LIMITS\['vocab_size'\]"),
    ("n_layers", True, "n_layers must be a positive integer, got True"),
    ("dim", 32.0, "dim must be a positive integer, got 32.0"),
    ("norm_eps", -1e-5, "norm_eps must be a finite positive number, got -1e-05"),
    ("rope_theta", float("nan"), "rope_theta must be a finite positive number, got nan"),
    ("init_std", float("inf"), "init_std must be a finite non-negative number"),
    ("tie_embeddings", "yes", "tie_embeddings must be true or false"),
    ("ffn_dim", 1 << 18, "describes .* parameters, above LlamaConfig.MAX_PARAMETERS"),
])
def test_llama_config_refuses_what_no_model_can_be_built_from(field, value, message):
    changes = {"dim": 1 << 16, "n_heads": 512, "n_kv_heads": 512} if field == "ffn_dim" else {}
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**{**changes, field: value})


def test_num_parameters_counts_what_the_built_model_holds():
    for changes in ({}, {"tie_embeddings": False, "attention_bias": True, "mlp_bias": True, "n_kv_heads": 1}):
        m = tiny(**changes)
        assert m.config.num_parameters == sum(p.data.size for p in m.parameters())


# ---- minift and Hugging Face folders ----------------------------------------------------------


@pytest.mark.parametrize(("changes", "message"), [
    ({"n_layers": 10**6}, r"config.json: LlamaConfig.n_layers = 1000000 is above minift's limit"),
    ({"n_layers": 500}, r"config.json: describes a model of [\d,]+ parameters, but its weights hold [\d,]+ values"),
    ({"norm_eps": -1.0}, "config.json: LlamaConfig.norm_eps must be a finite positive number"),
    ({"heads": 4}, r"config.json: unknown fields \['heads'\]"),
])
def test_a_minift_config_that_does_not_fit_its_weights_is_refused_before_building(tmp_path, changes, message):
    save_model(tiny(), tmp_path)
    edit_json(tmp_path / "config.json", **changes)
    with pytest.raises(ValueError, match=message):
        read_model(tmp_path)


@pytest.mark.parametrize("content", ["[1, 2]", "[" * 100_000 + "]" * 100_000, b"{\"dim\": \"\xff\"}", "{'dim': 3}"])
def test_a_config_that_is_not_a_json_object_is_named(tmp_path, content):
    save_model(tiny(), tmp_path)
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match="config.json: (holds a JSON list|nests JSON|not UTF-8|not valid JSON)"):
        read_model(tmp_path)


def test_a_hugging_face_config_is_checked_against_its_shards_before_building(tmp_path):
    save_hf_folder(tiny(), ByteTokenizer(), tmp_path)
    edit_json(tmp_path / "config.json", num_hidden_layers=1000)
    with pytest.raises(ValueError, match=r"describes a model of [\d,]+ parameters, but its weights hold"):
        load_hf_folder(tmp_path)
    edit_json(tmp_path / "config.json", num_hidden_layers=2, rms_norm_eps=float("nan"))
    with pytest.raises(ValueError, match="config.json: LlamaConfig.norm_eps must be a finite positive number"):
        load_hf_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match="config.json: no 'hidden_size'"):
        load_hf_folder(tmp_path)


# ---- adapters ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "message"), [
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite positive number, got nan"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a finite positive number, got inf"),
    ({"lora_dropout": float("nan")}, r"lora_dropout must be in \[0, 1\), got nan"),
    ({"r": True}, "r must be a positive integer, got True"),
    ({"target_modules": "q_proj("}, "target_modules 'q_proj\\(' is not a valid regex"),
    ({"target_modules": 7}, "target_modules must be a list of module names or a regex"),
])
def test_lora_config_refuses_out_of_range_values(changes, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**changes)


def test_a_target_regex_that_backtracks_forever_is_stopped_with_a_clear_error():
    slow = LoraConfig(target_modules=r"((.|\w)+)+[XY]")  # matching a module name backtracks for ages
    with pytest.raises(ValueError, match=r"target_modules regex .* took over 1.0 s .*catastrophic backtracking"):
        get_peft_model(tiny(), slow)


def adapter_folder(tmp_path, **config_changes):
    peft = get_peft_model(tiny(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    folder = peft.save_pretrained(tmp_path / "adapter")
    edit_json(folder / "adapter_config.json", **config_changes)
    return folder


def test_a_failed_load_adapter_leaves_no_trace_and_can_be_retried(tmp_path):
    wrong = adapter_folder(tmp_path, target_modules=["q_proj", "v_proj", "o_proj"])  # o_proj: no weights saved
    peft = get_peft_model(tiny(), LoraConfig(r=2, target_modules=["q_proj"]))
    before = {name: p.requires_grad for name, p in peft.named_parameters()}
    with pytest.raises(ValueError, match="does not fit this model: missing"):
        peft.load_adapter(wrong, "x")
    assert "x" not in peft.peft_config and not any(".x." in name for name, _ in peft.named_parameters())
    assert {name: p.requires_grad for name, p in peft.named_parameters()} == before
    assert type(peft.model.model.layers[0].self_attn.o_proj).__name__ == "Linear"  # the wrapper went too
    edit_json(wrong / "adapter_config.json", target_modules=["q_proj", "v_proj"])
    peft.load_adapter(wrong, "x")  # the same name is free again
    assert "x" in peft.peft_config


def test_a_failed_from_pretrained_gives_the_model_back_unwrapped(tmp_path):
    wrong = adapter_folder(tmp_path, target_modules=["q_proj", "v_proj", "o_proj"])
    model = tiny()
    with pytest.raises(ValueError, match="does not fit this model"):
        PeftModel.from_pretrained(model, wrong)
    assert {type(m).__name__ for _, m in model.named_modules()} <= {
        "LlamaForCausalLM", "LlamaModel", "ModuleList", "LlamaBlock", "LlamaAttention", "LlamaMLP", "Linear",
        "Embedding", "RMSNorm"}
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(("changes", "message"), [
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite positive number"),
    ({"target_modules": "(q_proj"}, r"adapter_config.json: LoraConfig.target_modules .* is not a valid regex"),
])
def test_an_adapter_config_out_of_range_names_the_file(tmp_path, changes, message):
    with pytest.raises((AdapterFormatError, ValueError), match=message):
        PeftModel.from_pretrained(tiny(), adapter_folder(tmp_path, **changes))


def test_adapter_weights_with_nan_name_the_file_and_tensor(tmp_path):
    folder = adapter_folder(tmp_path)
    from minift.io.safetensors import load_file, save_file  # noqa: PLC0415

    tensors = load_file(folder / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = np.full_like(tensors[key], np.nan)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match=f"adapter_model.safetensors: tensor '{key}' holds NaN"):
        PeftModel.from_pretrained(tiny(), folder)
