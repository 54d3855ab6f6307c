"""GGUF writing: the Q8_0 / Q4_0 packers against their formulas and the ``gguf`` package, a small
random Llama and tokenizer through write -> read (f32 exact, f16 / q8_0 / q4_0 within their
error), the metadata llama.cpp needs, and refusals that leave no file behind."""

import os

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from strategies import quant_inputs

from minift.data.bpe import BYTE_TO_CHAR, SYSTEM_DEFAULT_CHATML, BPETokenizer
from minift.data.tokenizer import ByteTokenizer
from minift.io.gguf import GGUFError, dequantize, load_gguf, read_gguf, unpermute_rope_rows
from minift.io.gguf_writer import encode_tensor, quantize_q4_0, quantize_q8_0, write_gguf
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.nn.linear4bit import quantize_model
from minift.peft import LoraConfig, get_peft_model
from minift.peft.adapters import add_bottleneck_adapters
from minift.peft.prefix import add_prefix_tuning

# ---- the packers -------------------------------------------------------------------------------


def blocks_of(x):
    return np.asarray(x, np.float32).reshape(-1, 32)


@settings(max_examples=60, deadline=None)
@given(quant_inputs(max_values=2048))
def test_q8_0_bytes_follow_the_formula_and_equal_the_gguf_package(case):
    x = blocks_of(case[0])
    packed = quantize_q8_0(x)
    d = np.abs(x).max(axis=1) / np.float32(127)
    normal = d > 2.0**-126  # below, 1 / d overflows and gguf's copy of the reference makes NaN codes
    with np.errstate(all="ignore"):  # a block holding 1e30 has a scale float16 cannot hold
        theirs = gguf.quants.quantize(x[normal], gguf.GGMLQuantizationType.Q8_0)
    assert packed[normal].tobytes() == theirs.tobytes()
    blocks = packed.view([("d", "<f2"), ("q", "i1", (32,))])[:, 0]
    scaled = x[normal] * (np.float32(1) / d[normal, None])
    np.testing.assert_array_equal(blocks["q"][normal], np.sign(scaled) * np.floor(np.abs(scaled) + 0.5))
    d16 = blocks["d"].astype(np.float32)
    fits = np.isfinite(d16)  # the error bound, where the scale is a float16 number
    with np.errstate(invalid="ignore"):  # inf * 0
        error = np.abs(dequantize(packed, "Q8_0", x.shape) - x).max(axis=1)
    bound = d / 2 + 127 * np.abs(d - d16) + 1e-6 * d
    assert (error[fits] <= bound[fits]).all()


@settings(max_examples=60, deadline=None)
@given(quant_inputs(max_values=2048))
def test_q4_0_bytes_equal_the_gguf_package_and_read_back_within_one_step(case):
    x = blocks_of(case[0])
    packed = quantize_q4_0(x)
    largest = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]
    normal = np.abs(largest / 8) > 2.0**-126
    with np.errstate(all="ignore"):
        assert packed[normal].tobytes() == gguf.quants.quantize(x[normal], gguf.GGMLQuantizationType.Q4_0).tobytes()
    d = np.abs(largest / np.float32(-8))
    with np.errstate(over="ignore", invalid="ignore"):
        d16 = np.abs(np.float16(largest / np.float32(-8)).astype(np.float32))
        error = np.abs(dequantize(packed, "Q4_0", x.shape) - x).max(axis=1)
    fits = np.isfinite(d16)
    bound = d + 8 * np.abs(d - d16) + 1e-6 * d  # d/2 from rounding, d at the clipped end (-m -> 7d)
    assert (error[fits] <= bound[fits]).all()


def test_q8_0_rounds_halves_away_from_zero_like_llama_cpp():
    x = np.zeros(32, np.float32)
    x[:4] = [127.0, 2.5, -2.5, 0.5]  # d = 1: halves land exactly on .5
    q = quantize_q8_0(x)[2:].view(np.int8)
    assert q[:4].tolist() == [127, 3, -3, 1]  # NumPy's rint would give 2, -2, 0


def test_encode_tensor_keeps_norms_in_float32_and_falls_back_to_f16_for_odd_rows():
    rng = np.random.default_rng(0)
    assert encode_tensor(rng.normal(size=64).astype(np.float32), "q8_0")[0] == "F32"
    assert encode_tensor(rng.normal(size=(4, 48)).astype(np.float32), "q8_0")[0] == "F16"
    kind, data = encode_tensor(rng.normal(size=(4, 64)).astype(np.float32), "q4_0")
    assert kind == "Q4_0" and data.shape == (4, 2 * 18)


# ---- a small model and tokenizer ---------------------------------------------------------------

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
TOKENS = SPECIAL + list(BYTE_TO_CHAR.values()) + ["".join(m) for m in MERGES]
TEMPLATE = SYSTEM_DEFAULT_CHATML.replace("@SYSTEM@", "You are tiny.")
IDS = np.array([[1, 50, 7, 200, 3, 99, 260, 12, 2]])


def tokenizer(pretokenizer="smollm"):
    return BPETokenizer(TOKENS, MERGES, SPECIAL, eos_id=2, pad_id=0, bos_id=1, pretokenizer=pretokenizer,
                        chat_template=TEMPLATE)


def small_model(**overrides):
    """A random Llama over ``TOKENS``; its norm eps is a float32 number, as GGUF stores it."""
    config = LlamaConfig(**{"vocab_size": len(TOKENS), "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                            "ffn_dim": 96, "max_seq_len": 128, "rope_theta": 50000.0, "norm_eps": 2.0**-20,
                            **overrides})
    model = LlamaForCausalLM(config, seed=5)
    rng = np.random.default_rng(6)
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith("bias"):
            p.data = (p.data + rng.normal(0, 0.1, p.shape)).astype(np.float32)
    return model


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"attention_bias": True, "mlp_bias": True}])
def test_f32_export_reads_back_with_identical_weights_and_logits(tmp_path, overrides):
    model = small_model(**overrides)
    loaded, _ = load_gguf(write_gguf(model, tokenizer(), tmp_path / "m.gguf"))
    assert loaded.config == model.config
    for name, array in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], array, err_msg=name)
    np.testing.assert_array_equal(loaded(IDS).data, model(IDS).data)


def test_q_and_k_rows_are_stored_in_llama_cpp_order(tmp_path):
    model = small_model()
    file = read_gguf(write_gguf(model, tokenizer(), tmp_path / "m.gguf"))
    stored = file.array("blk.1.attn_k.weight")
    original = model.model.layers[1].self_attn.k_proj.weight.data
    assert not np.array_equal(stored, original)
    np.testing.assert_array_equal(unpermute_rope_rows(stored, 2), original)


#: dtype -> (GGML type of the 2-D weights, bound on max |logit difference| for this small model).
LOSSY = {"f16": ("F16", 2e-3), "q8_0": ("Q8_0", 2e-2), "q4_0": ("Q4_0", 0.3)}


@pytest.mark.parametrize("dtype", list(LOSSY))
def test_lossy_exports_read_back_as_their_dequantized_weights(tmp_path, dtype):
    model = small_model()
    path = write_gguf(model, tokenizer(), tmp_path / f"m.{dtype}.gguf", dtype=dtype)
    kind, logit_bound = LOSSY[dtype]
    file = read_gguf(path)
    assert file.tensors["blk.0.ffn_down.weight"].type_name == kind
    assert file.tensors["blk.0.attn_norm.weight"].type_name == "F32"
    loaded, _ = load_gguf(path)
    w = model.model.layers[0].mlp.down_proj.weight.data
    expected = w.astype(np.float16).astype(np.float32) if dtype == "f16" else \
        dequantize(encode_tensor(w, dtype)[1], kind, w.shape)
    np.testing.assert_array_equal(loaded.model.layers[0].mlp.down_proj.weight.data, expected)
    np.testing.assert_array_equal(loaded.model.norm.weight.data, model.model.norm.weight.data)
    diff = np.abs(loaded(IDS).data - model(IDS).data).max()
    assert 0 < diff < logit_bound, diff


# ---- metadata ----------------------------------------------------------------------------------


def test_metadata_holds_what_llama_cpp_reads(tmp_path):
    model = small_model()
    meta = read_gguf(write_gguf(model, tokenizer(), tmp_path / "m.gguf", dtype="q8_0")).metadata
    c = model.config
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 7
    assert (meta["llama.context_length"], meta["llama.embedding_length"], meta["llama.block_count"],
            meta["llama.feed_forward_length"], meta["llama.attention.head_count"],
            meta["llama.attention.head_count_kv"], meta["llama.rope.dimension_count"], meta["llama.vocab_size"]) == \
        (c.max_seq_len, c.dim, c.n_layers, c.ffn_dim, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size)
    assert meta["llama.rope.freq_base"] == c.rope_theta
    assert meta["llama.attention.layer_norm_rms_epsilon"] == np.float32(c.norm_eps)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.tokens"] == TOKENS and meta["tokenizer.ggml.merges"] == ["Ġ t", "h e", "Ġt he"]
    assert meta["tokenizer.ggml.token_type"] == [3] * 3 + [1] * (len(TOKENS) - 3)
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.padding_token_id"]) == (1, 2, 0)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == TEMPLATE


@pytest.mark.parametrize("pretokenizer", ["smollm", "gpt2"])
def test_the_tokenizer_reads_back_the_same(tmp_path, pretokenizer):
    tok = tokenizer(pretokenizer)
    _, back = load_gguf(write_gguf(small_model(), tok, tmp_path / "m.gguf"))
    assert (back.tokens, back.merges, back.special_tokens, back.pretokenizer) == \
        (tok.tokens, tok.merges, tok.special_tokens, tok.pretokenizer)
    assert (back.eos_id, back.pad_id, back.bos_id, back.chat_template) == (2, 0, 1, TEMPLATE)
    text = "<|im_start|>the 2024 thethe<|im_end|>"
    assert back.encode(text) == tok.encode(text)


def test_a_byte_tokenizer_becomes_a_byte_level_vocabulary_with_the_same_ids(tmp_path):
    tok = ByteTokenizer()
    model = small_model(vocab_size=tok.vocab_size)
    path = write_gguf(model, tok, tmp_path / "bytes.gguf")
    loaded, back = load_gguf(path)
    text = "<|im_start|>user\nhé 42 🐈<|im_end|>\n"
    assert back.encode(text) == tok.encode(text) and back.decode(tok.encode(text)) == text
    assert (back.eos_id, back.pad_id, back.bos_id) == (tok.eos_id, tok.pad_id, None)
    assert back.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert read_gguf(path).metadata["tokenizer.ggml.merges"] == []
    ids = np.array([tok.encode(text)])
    np.testing.assert_array_equal(loaded(ids).data, model(ids).data)


# ---- refusals ----------------------------------------------------------------------------------


def only_the_target(folder):
    return sorted(os.listdir(folder))


def test_an_unknown_dtype_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(GGUFError, match="unknown GGUF dtype 'q5_k'; minift writes f32, f16, q8_0, q4_0"):
        write_gguf(small_model(), tokenizer(), tmp_path / "m.gguf", dtype="q5_k")
    assert only_the_target(tmp_path) == []


def with_lora(model):
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize(("change", "message"), [
    (with_lora, "still carries LoRA adapters .*lora_A.default.weight.; merge them"),
    (lambda m: with_lora(m).model, "still carries LoRA adapters"),
    (lambda m: add_bottleneck_adapters(m, 8), "not a tensor of a plain Llama.*bottleneck"),
    (lambda m: add_prefix_tuning(m, 4), "self_attn.prefix.keys is not a tensor of a plain Llama"),
    (lambda m: quantize_model(m) and m, "no float weight for blk.0.attn_k.weight.*Linear4bit"),
])
def test_a_model_that_is_not_a_plain_llama_is_refused(tmp_path, change, message):
    model = change(small_model())
    with pytest.raises(GGUFError, match=message):
        write_gguf(model, tokenizer(), tmp_path / "m.gguf")
    assert only_the_target(tmp_path) == []


def test_a_merged_lora_model_exports(tmp_path):
    peft = with_lora(small_model())
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data = np.full(p.shape, 0.01, np.float32)
    merged = peft.merge_and_unload()
    loaded, _ = load_gguf(write_gguf(merged, tokenizer(), tmp_path / "m.gguf"))
    np.testing.assert_array_equal(loaded(IDS).data, merged(IDS).data)


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path):
    with pytest.raises(GGUFError, match=f"the tokenizer has {len(TOKENS)} tokens but the model's vocabulary is 300"):
        write_gguf(small_model(vocab_size=300), tokenizer(), tmp_path / "m.gguf")
    with pytest.raises(GGUFError, match="cannot write a dict to GGUF"):
        write_gguf(small_model(), {}, tmp_path / "m.gguf")
    assert only_the_target(tmp_path) == []


def test_an_unwritable_path_is_an_error_and_leaves_nothing(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(OSError):
        write_gguf(small_model(), tokenizer(), tmp_path / "a_file" / "m.gguf")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        write_gguf(small_model(), tokenizer(), tmp_path)
    assert only_the_target(tmp_path) == ["a_file"]


def test_an_interrupted_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = write_gguf(small_model(), tokenizer(), tmp_path / "m.gguf")
    before = path.read_bytes()

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", killed)
    with pytest.raises(KeyboardInterrupt):
        write_gguf(small_model(tie_embeddings=False), tokenizer(), path)
    assert only_the_target(tmp_path) == ["m.gguf"] and path.read_bytes() == before
