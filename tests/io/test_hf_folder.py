"""``save_hf_folder``: a model leaves minift as a Hugging Face Llama folder, and comes back.

Round trips in f32 (exact), f16 and bf16 (within their rounding), sharding with an index, the
config translated both ways, and the refusals: each clear, each before anything is written."""

import json

import numpy as np
import pytest

from minift.data import ByteTokenizer
from minift.data.bpe import BYTE_TO_CHAR, SYSTEM_DEFAULT_CHATML, BPETokenizer
from minift.io import safetensors
from minift.io.model_dir import hf_config_from_llama, llama_config_from_hf, load_hf_folder, save_hf_folder
from minift.io.safetensors import load_file, to_bfloat16_bits
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.nn import quantize_model
from minift.peft import LoraConfig, get_peft_model
from minift.peft.adapters import add_bottleneck_adapters
from minift.peft.prefix import add_prefix_tuning

TEXT = "<|im_start|>user\nthe 2024 café 🤗   x<|im_end|>\n"


def model(**changes):
    config = dict(vocab_size=260, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)
    return LlamaForCausalLM(LlamaConfig(**{**config, **changes}), seed=3)


def bpe_tokenizer():
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = [("Ġ", "t"), ("h", "e")]
    tokens = special + list(BYTE_TO_CHAR.values()) + [a + b for a, b in merges]
    return BPETokenizer(tokens, merges, special, eos_id=2, bos_id=1,
                        chat_template=SYSTEM_DEFAULT_CHATML.replace("@SYSTEM@", "Be brief."))


def logits(m):
    return m(np.array([[1, 40, 258, 7, 99, 2]])).data


def weights(m):
    return {name: np.asarray(array) for name, array in m.state_dict().items()}


@pytest.mark.parametrize("tok", [ByteTokenizer(), bpe_tokenizer()], ids=["byte", "bpe"])
@pytest.mark.parametrize("tie", [True, False])
def test_f32_round_trip_is_exact_with_the_tokenizer_and_chat_template(tmp_path, tok, tie):
    m = model(tie_embeddings=tie, attention_bias=not tie)
    save_hf_folder(m, tok, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"}
    loaded, loaded_tok = load_hf_folder(tmp_path)
    assert loaded.config == m.config
    np.testing.assert_array_equal(logits(loaded), logits(m))
    assert type(loaded_tok) is type(tok) and loaded_tok.encode(TEXT) == tok.encode(TEXT)
    chat = [{"role": "user", "content": "hi"}]
    assert loaded_tok.apply_chat_template(chat, True) == tok.apply_chat_template(chat, True)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eos_id and generation["pad_token_id"] == tok.pad_id


def test_f16_and_bf16_are_within_their_rounding(tmp_path):
    m = model()
    reference = weights(m)
    for dtype, kind in (("f16", "F16"), ("bf16", "BF16")):
        save_hf_folder(m, ByteTokenizer(), tmp_path / dtype, dtype=dtype)
        header = json.loads((tmp_path / dtype / "model.safetensors").read_bytes()[8:].split(b"}}")[0] + b"}}")
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {kind}
        torch_dtype = json.loads((tmp_path / dtype / "config.json").read_text())["torch_dtype"]
        assert torch_dtype == {"f16": "float16", "bf16": "bfloat16"}[dtype]
        loaded = weights(load_hf_folder(tmp_path / dtype)[0])
        for name, w in reference.items():
            if dtype == "f16":
                np.testing.assert_array_equal(loaded[name], w.astype(np.float16).astype(np.float32))
            else:  # 7 mantissa bits: a relative error of at most 2^-8
                assert np.all(np.abs(loaded[name] - w) <= np.abs(w) * 2.0**-8), name
        assert max(np.abs(loaded[n] - w).max() for n, w in reference.items()) > 0  # rounded, not kept


def test_bf16_rounds_to_nearest_even():
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)], np.float32)  # exactly halfway between two bf16
    above = np.array([1 + 2**-8 + 2**-20, 3.0e38, np.inf, np.nan], np.float32)
    assert to_bfloat16_bits(ties).tolist() == [0x3F80, 0x3F82, 0xBF80]
    assert to_bfloat16_bits(above).tolist() == [0x3F81, 0x7F62, 0x7F80, 0x7FC0]


def test_weights_past_the_shard_size_are_sharded_with_an_index_and_load_back(tmp_path):
    m = model(tie_embeddings=False)
    save_hf_folder(m, ByteTokenizer(), tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(m.state_dict()) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(4 * a.size for a in m.state_dict().values())
    assert all(sum(a.nbytes for a in load_file(tmp_path / s).values()) <= 40_000 for s in shards)
    np.testing.assert_array_equal(logits(load_hf_folder(tmp_path)[0]), logits(m))
    save_hf_folder(m, ByteTokenizer(), tmp_path)  # saved again in one file: the old shards go
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


@pytest.mark.parametrize("changes", [{}, dict(tie_embeddings=False, attention_bias=True, mlp_bias=True,
                                              rope_theta=5e5, norm_eps=1e-6, init_std=0.05, n_kv_heads=4)])
def test_the_config_round_trips_through_transformers_keys(changes):
    config = model(**changes).config
    hf = hf_config_from_llama(config, dtype="bf16", eos_id=258)
    assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"] and hf["eos_token_id"] == 258
    assert llama_config_from_hf(hf) == config
    del hf["rope_parameters"]  # a reader of transformers 4's keys gets the same
    assert llama_config_from_hf(hf) == config


def refused(tmp_path, m, message, **kwargs):
    folder = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        save_hf_folder(m, ByteTokenizer(), folder, **kwargs)
    assert not folder.exists()


def test_an_unknown_dtype_is_refused_before_writing(tmp_path):
    refused(tmp_path, model(), "unknown dtype 'q8_0'.*f32, f16, bf16", dtype="q8_0")


@pytest.mark.parametrize(("surgery", "message"), [
    (lambda m: get_peft_model(m, LoraConfig(r=2)), "PeftModel.*merge_and_unload"),
    (lambda m: get_peft_model(m, LoraConfig(r=2)).model, "LoraLinear.*merge_and_unload"),
    (lambda m: quantize_model(m, blocksize=32) and m, "Linear4bit.*dequantize_model"),
    (lambda m: add_bottleneck_adapters(m, 4), "WithAdapter.*minift's own format.*surgery"),
    (lambda m: add_prefix_tuning(m, 2), "Prefix.*minift's own format.*surgery"),
])
def test_a_model_with_modules_a_llama_config_cannot_name_is_refused(tmp_path, surgery, message):
    refused(tmp_path, surgery(model()), message)


def test_a_diverged_model_is_refused(tmp_path):
    m = model()
    m.model.norm.weight.data[0] = np.nan
    refused(tmp_path, m, "model.norm.weight has NaN")


def test_an_unwritable_path_is_a_clear_error(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(OSError, match="cannot create the model folder"):
        save_hf_folder(model(), ByteTokenizer(), tmp_path / "a_file" / "model")
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_a_save_killed_half_way_leaves_the_previous_model_and_no_partial_file(tmp_path, monkeypatch):
    old, new = model(), model(tie_embeddings=False)
    save_hf_folder(old, ByteTokenizer(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = []

    def killed_on_the_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.os, "fsync", killed_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        save_hf_folder(new, ByteTokenizer(), tmp_path, max_shard_bytes=40_000)
    assert not list(tmp_path.glob(".*")), "a temporary file was left behind"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before
    np.testing.assert_array_equal(logits(load_hf_folder(tmp_path)[0]), logits(old))
