"""``load_pretrained`` / ``save_pretrained`` on tiny models: Hugging Face folders (config.json +
safetensors + tokenizer.json), minift folders with a BPE tokenizer, and the error cases."""

import json
from dataclasses import asdict

import numpy as np
import pytest

from minift import load_pretrained
from minift.data import ByteTokenizer
from minift.data.bpe import BYTE_TO_CHAR, SYSTEM_DEFAULT_CHATML, BPETokenizer
from minift.io import save_file, save_model
from minift.io.model_dir import llama_config_from_hf
from minift.io.tokenizer_json import load_tokenizer_json, save_tokenizer_json
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.training.methods import MethodOptions, prepare_model
from minift.training.pretrained import base_model_reference, save_pretrained

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
TOKENS = SPECIAL + list(BYTE_TO_CHAR.values()) + [a + b for a, b in MERGES]
TEMPLATE = SYSTEM_DEFAULT_CHATML.replace("@SYSTEM@", "You are tiny.")
TEXT = "<|im_start|>user\nthe 2024 café 🤗   x<|im_end|>"


def tokenizer(pretokenizer="smollm"):
    return BPETokenizer(TOKENS, MERGES, SPECIAL, eos_id=2, bos_id=1, pretokenizer=pretokenizer,
                        chat_template=TEMPLATE)


def model(tie=True):
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(TOKENS), dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                        ffn_dim=48, max_seq_len=64, tie_embeddings=tie), seed=5)


def hf_config(m, **changes):
    """The config.json transformers 5 writes for ``m`` (rope_theta under rope_parameters)."""
    c = m.config
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
            "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
            "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
            "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "mlp_bias": False, **changes}


def logits(m):
    return m(np.array([[1, 40, 260, 7, 99, 2]])).data


def write_hf_folder(folder, m, shards=1, **config_changes):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(m, **config_changes)))
    names = sorted(m.state_dict())
    for i in range(shards):
        part = {n: m.state_dict()[n] for n in names[i::shards]}
        save_file(part, folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors")
    save_tokenizer_json(tokenizer(), folder)
    return folder


@pytest.mark.parametrize(("tie", "shards"), [(True, 1), (False, 3)])
def test_a_hugging_face_folder_loads_with_equal_logits(tmp_path, tie, shards):
    m = model(tie)
    loaded, tok = load_pretrained(write_hf_folder(tmp_path / "hf", m, shards))
    assert loaded.config == m.config
    np.testing.assert_array_equal(logits(loaded), logits(m))
    assert tok.encode(TEXT) == tokenizer().encode(TEXT)


def test_transformers_4_config_keys_are_read_too():
    m = model()
    old = hf_config(m, rope_theta=5e5, rope_scaling=None)
    del old["rope_parameters"], old["head_dim"]
    assert llama_config_from_hf(old).rope_theta == 5e5


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE scaling"),
    ({"head_dim": 16}, "head_dim 16"),
])
def test_hugging_face_configs_minift_cannot_run_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        llama_config_from_hf(hf_config(model(), **change))


def test_save_pretrained_keeps_the_bpe_tokenizer_with_the_weights(tmp_path):
    m, tok = model(), tokenizer()
    save_pretrained(m, tok, tmp_path / "ft")
    loaded, loaded_tok = load_pretrained(tmp_path / "ft")
    np.testing.assert_array_equal(logits(loaded), logits(m))
    assert loaded_tok.encode(TEXT) == tok.encode(TEXT)
    chat = [{"role": "user", "content": "hi"}]
    assert loaded_tok.apply_chat_template(chat, True) == tok.apply_chat_template(chat, True)
    assert (loaded_tok.eos_id, loaded_tok.pad_id, loaded_tok.bos_id) == (2, 2, 1)


def test_save_pretrained_writes_a_hugging_face_folder_a_byte_model_included(tmp_path):
    save_pretrained(model(), ByteTokenizer(), tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model_type"] == "llama"
    assert isinstance(load_pretrained(tmp_path / "b")[1], ByteTokenizer)


@pytest.mark.parametrize("tok", [ByteTokenizer(), tokenizer()], ids=["byte", "bpe"])
def test_folders_in_minifts_older_format_still_load(tmp_path, tok):
    m = model()
    if isinstance(tok, BPETokenizer):
        save_tokenizer_json(tok, tmp_path)
    save_model(m, tmp_path, tokenizer="byte" if isinstance(tok, ByteTokenizer) else "bpe")
    loaded, loaded_tok = load_pretrained(tmp_path)
    np.testing.assert_array_equal(logits(loaded), logits(m))
    assert type(loaded_tok) is type(tok) and loaded_tok.encode(TEXT) == tok.encode(TEXT)


def test_a_method_that_added_modules_is_saved_in_minifts_format_and_rebuilt(tmp_path):
    surgery = {"method": "adapter", **asdict(MethodOptions(bottleneck=4))}
    m, _ = prepare_model(model(), "adapter", MethodOptions(bottleneck=4))
    with pytest.raises(ValueError, match="WithAdapter.*surgery"):
        save_pretrained(m, ByteTokenizer(), tmp_path)
    save_pretrained(m, ByteTokenizer(), tmp_path, surgery=surgery)
    assert json.loads((tmp_path / "config.json").read_text())["surgery"]["method"] == "adapter"
    np.testing.assert_array_equal(logits(load_pretrained(tmp_path)[0]), logits(m))


def test_an_adapter_records_the_hub_id_or_the_absolute_path_of_its_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    assert base_model_reference("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_reference("base") == str(tmp_path / "base")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_lora_run_folder_loads_as_its_base_with_the_adapter_on_it(tmp_path, method):
    """``minift finetune --method lora --out run`` leaves run/adapter only (no merged copy):
    loading ``run`` finds the base the adapter names and puts the adapter on it; a QLoRA
    adapter gets the NF4 base it was trained on, so the logits are the trained model's."""
    save_pretrained(model(), ByteTokenizer(), tmp_path / "base")
    trained, _ = prepare_model(load_pretrained(tmp_path / "base")[0], method, MethodOptions(lora_r=4))
    for name, p in trained.named_parameters():
        if "lora_B" in name:
            p.data = np.random.default_rng(1).standard_normal(p.shape).astype(p.dtype)
    trained.peft_config["default"].base_model_name_or_path = base_model_reference(tmp_path / "base")
    trained.save_pretrained(tmp_path / "run" / "adapter")
    loaded, tok = load_pretrained(tmp_path / "run")
    assert isinstance(tok, ByteTokenizer)
    np.testing.assert_allclose(logits(loaded), logits(trained), atol=1e-6)
    np.testing.assert_array_equal(logits(load_pretrained(tmp_path / "run" / "adapter")[0]), logits(loaded))


def test_an_adapter_that_does_not_name_its_base_is_a_clear_error(tmp_path):
    trained, _ = prepare_model(model(), "lora", MethodOptions(lora_r=4))
    trained.save_pretrained(tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="base_model_name_or_path is missing"):
        load_pretrained(tmp_path / "adapter")


@pytest.mark.parametrize("kind", ["smollm", "gpt2"])
def test_tokenizer_json_round_trip_keeps_the_pretokenizer(tmp_path, kind):
    save_tokenizer_json(tokenizer(kind), tmp_path)
    loaded = load_tokenizer_json(tmp_path)
    assert loaded.pretokenizer == kind and loaded.encode(TEXT) == tokenizer(kind).encode(TEXT)


def edit_tokenizer_json(folder, edit):
    data = json.loads((folder / "tokenizer.json").read_text())
    edit(data)
    (folder / "tokenizer.json").write_text(json.dumps(data))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(pre_tokenizer={"type": "Metaspace"}), "pre-tokenizer .* is not one minift implements"),
    (lambda d: d.update(normalizer={"type": "NFC"}), "has a normalizer"),
    (lambda d: d["model"].update(type="WordPiece"), "model type 'WordPiece'"),
    (lambda d: d["model"].update(ignore_merges=True), "ignore_merges"),
    (lambda d: d["model"]["vocab"].pop("Ġ"), "without gaps"),
])
def test_tokenizer_json_shapes_minift_does_not_implement_are_refused(tmp_path, edit, message):
    save_tokenizer_json(tokenizer(), tmp_path)
    edit_tokenizer_json(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        load_tokenizer_json(tmp_path)


def test_chat_template_jinja_file_wins_over_the_config_entry(tmp_path):
    save_tokenizer_json(tokenizer(), tmp_path)
    (tmp_path / "chat_template.jinja").write_text(SYSTEM_DEFAULT_CHATML.replace("@SYSTEM@", "From the file."))
    assert load_tokenizer_json(tmp_path).default_system_prompt == "From the file."


def test_paths_that_are_no_model_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a minift model folder.* or a known name"):
        load_pretrained(tmp_path / "nothing-here")
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_pretrained(tmp_path / "weights.bin")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json.* nor a LoRA adapter"):
        load_pretrained(tmp_path / "empty_dir")
