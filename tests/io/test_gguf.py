"""GGUF reading: block dequantization on hand-built bytes, names, RoPE row order, a round trip
through a tiny GGUF written with ``gguf.GGUFWriter``, malformed files, and the real SmolLM2."""


import gguf
import numpy as np
import pytest

from minift.data.bpe import BYTE_TO_CHAR
from minift.io.gguf import (
    GGUFError,
    config_from_metadata,
    dequantize,
    dequantize_q4_1,
    dequantize_q8_0,
    gguf_name,
    llama_tensor_names,
    load_gguf,
    minift_name,
    permute_rope_rows,
    read_gguf,
    tokenizer_from_metadata,
    unpermute_rope_rows,
)
from minift.models import LlamaConfig, LlamaForCausalLM

# ---- dequantization on blocks whose values we know -----------------------------------------


def test_q8_0_block_is_scale_times_signed_bytes():
    q = np.arange(-16, 16, dtype=np.int8) * 4  # -64, -60, ..., 60
    block = np.float16(0.5).tobytes() + q.tobytes()  # 2 + 32 = 34 bytes
    values = dequantize_q8_0(np.frombuffer(block, np.uint8))
    np.testing.assert_array_equal(values, 0.5 * q.astype(np.float32))


def test_q4_1_low_nibbles_are_the_first_half_of_the_block():
    low, high = np.arange(16), 15 - np.arange(16)  # weight j has code j, weight j + 16 has 15 - j
    qs = (low | (high << 4)).astype(np.uint8)
    block = np.float16(0.25).tobytes() + np.float16(-1.0).tobytes() + qs.tobytes()  # 20 bytes
    values = dequantize_q4_1(np.frombuffer(block, np.uint8))
    expected = 0.25 * np.concatenate([low, high]) - 1.0
    np.testing.assert_array_equal(values, expected.astype(np.float32))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "F16", "F32"])
def test_dequantize_matches_the_gguf_package_on_random_weights(qtype):
    weights = np.random.default_rng(0).normal(0, 0.1, (8, 64)).astype(np.float32)
    kind = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(weights, kind)
    ours = dequantize(raw, qtype, weights.shape)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, kind))
    assert np.abs(ours - weights).max() < (0.04 if qtype.startswith("Q4") else 2e-3)


def test_unsupported_type_and_wrong_byte_count_are_clear_errors():
    with pytest.raises(GGUFError, match="type Q4_K is not supported"):
        dequantize(np.zeros(144, np.uint8), "Q4_K", (256,), "blk.0.ffn_up.weight")
    with pytest.raises(GGUFError, match="cannot hold"):
        dequantize(np.zeros(33, np.uint8), "Q8_0", (32,))


# ---- names and row order ---------------------------------------------------------------------


@pytest.mark.parametrize(("name_in_gguf", "name"), [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
    ("blk.12.ffn_norm.weight", "model.layers.12.post_attention_layernorm.weight"),
    ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
    ("blk.3.attn_k.bias", "model.layers.3.self_attn.k_proj.bias"),
    ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
    ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
    ("blk.29.ffn_gate.weight", "model.layers.29.mlp.gate_proj.weight"),
    ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"),
    ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
])
def test_gguf_names_map_to_hugging_face_names_and_back(name_in_gguf, name):
    assert minift_name(name_in_gguf) == name
    assert gguf_name(name) == name_in_gguf


@pytest.mark.parametrize("bad", ["blk.0.attn_qkv.weight", "rope_freqs.weight", "token_embd.scales"])
def test_unknown_tensor_names_are_rejected(bad):
    with pytest.raises(GGUFError, match="unknown GGUF tensor"):
        minift_name(bad)


@pytest.mark.parametrize("bad", ["model.layers.0.self_attn.q_proj.lora_A.default.weight",
                                 "model.layers.0.self_attn.prefix.keys", "model.embed_tokens.scale"])
def test_names_a_plain_llama_does_not_have_are_rejected(bad):
    with pytest.raises(GGUFError, match="not a tensor of a plain Llama"):
        gguf_name(bad)


def test_every_weight_name_of_a_llama_is_listed():
    for tie in (True, False):
        model = tiny_model(tie)
        names = {gguf_name(name) for name in model.state_dict()}
        assert llama_tensor_names(model.config) == names


def llama_cpp_permute(w, n_heads):
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K: within each head, interleave the
    first and second half of the rows (row i -> 2i, row i + hd/2 -> 2i + 1)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_puts_interleaved_rows_back_in_rotate_half_order():
    n_heads, head_dim = 3, 8
    w = np.arange(n_heads * head_dim * 2, dtype=np.float32).reshape(n_heads * head_dim, 2)
    permuted = llama_cpp_permute(w, n_heads)
    assert permuted[1, 0] == w[head_dim // 2, 0]  # GGUF row 1 of head 0 is HF row hd/2
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, n_heads), w)
    bias = np.arange(n_heads * head_dim, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(bias, n_heads), n_heads), bias)
    np.testing.assert_array_equal(permute_rope_rows(w, n_heads), permuted)  # the writer's way there
    np.testing.assert_array_equal(permute_rope_rows(bias, n_heads), llama_cpp_permute(bias, n_heads))


# ---- a tiny model through a real GGUF file ---------------------------------------------------

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
TOKENS = SPECIAL + list(BYTE_TO_CHAR.values()) + [m.replace(" ", "") for m in MERGES]
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
def tiny_model(tie=True):
    config = LlamaConfig(vocab_size=len(TOKENS), dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                         max_seq_len=64, rope_theta=50000.0, norm_eps=2.0**-17, tie_embeddings=tie)  # f32-exact
    model = LlamaForCausalLM(config, seed=3)
    rng = np.random.default_rng(4)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = (1 + rng.normal(0, 0.1, p.shape)).astype(np.float32)
    return model


def write_gguf(path, model, arch="llama", qtypes=None, extra_tensors=()):
    """Write ``model`` the way llama.cpp's converter would: GGUF names, permuted Q/K rows,
    ``llama.*`` metadata and a byte-level BPE tokenizer. ``qtypes`` maps a GGUF tensor name to
    the GGML type to store it in (default F32)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_merges(MERGES)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(TOKENS) - len(SPECIAL)))
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    for name, p in model.named_parameters():
        data = np.asarray(p.data, dtype=np.float32)
        if "q_proj" in name:
            data = llama_cpp_permute(data, c.n_heads)
        elif "k_proj" in name:
            data = llama_cpp_permute(data, c.n_kv_heads)
        target = gguf_name(name)
        kind = (qtypes or {}).get(target, gguf.GGMLQuantizationType.F32)
        raw = gguf.quants.quantize(data, kind)  # bytes (rows, bytes per row) for a block type
        w.add_tensor(target, raw, raw_shape=raw.shape, raw_dtype=kind)
    for name, data in extra_tensors:
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_through_gguf_gives_the_same_logits(tmp_path, tie):
    model = tiny_model(tie)
    loaded, tok = load_gguf(write_gguf(tmp_path / "tiny.gguf", model))
    assert loaded.config == model.config
    ids = np.array([[1, 50, 7, 200, 3, 99, 260, 12]])
    np.testing.assert_allclose(loaded(ids).data, model(ids).data, rtol=1e-5, atol=1e-5)
    q = model.model.layers[1].self_attn.q_proj.weight.data
    assert not np.array_equal(llama_cpp_permute(q, 4), q)  # the round trip really undid a permutation


def test_tokenizer_comes_from_the_gguf_metadata(tmp_path):
    _, tok = load_gguf(write_gguf(tmp_path / "tiny.gguf", tiny_model()))
    assert tok.vocab_size == len(TOKENS) and tok.eos_id == 2 and tok.pad_id == 2
    assert set(tok.special_tokens) == set(SPECIAL)
    assert [tok.tokens[i] for i in tok.encode("<|im_start|> the 42")] == ["<|im_start|>", "Ġthe", "Ġ", "4", "2"]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).startswith(
        "<|im_start|>system\nYou are tiny.<|im_end|>\n<|im_start|>user\nhi")


def test_quantized_tensors_load_as_their_dequantized_values(tmp_path):
    model = tiny_model()
    q8, q41 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1
    qtypes = {"token_embd.weight": q8, "blk.0.attn_q.weight": q41, "blk.1.ffn_down.weight": q41}
    loaded, _ = load_gguf(write_gguf(tmp_path / "q.gguf", model, qtypes=qtypes))
    state = loaded.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        w = model.state_dict()[name]
        kind = qtypes[gguf_name(name)]
        np.testing.assert_array_equal(state[name], gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind))
    q = model.model.layers[0].self_attn.q_proj.weight.data
    expected = unpermute_rope_rows(gguf.quants.dequantize(gguf.quants.quantize(llama_cpp_permute(q, 4), q41), q41), 4)
    np.testing.assert_array_equal(state["model.layers.0.self_attn.q_proj.weight"], expected)


# ---- malformed input -------------------------------------------------------------------------


def test_a_file_that_is_not_gguf_is_named_as_such(tmp_path):
    (tmp_path / "notes.gguf").write_text("just some text, no magic here")
    (tmp_path / "empty.gguf").write_bytes(b"")
    for name in ("notes.gguf", "empty.gguf"):
        with pytest.raises(GGUFError, match="not a GGUF file"):
            read_gguf(tmp_path / name)


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.01])
def test_a_truncated_file_is_reported_as_truncated(tmp_path, keep):
    data = write_gguf(tmp_path / "full.gguf", tiny_model()).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        load_gguf(cut)


def test_unsupported_architecture_tensor_type_and_tensor_are_clear_errors(tmp_path):
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported"):
        load_gguf(write_gguf(tmp_path / "a.gguf", tiny_model(), arch="gpt2"))
    q5 = {"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q5_0}
    with pytest.raises(GGUFError, match="blk.0.ffn_up.weight: tensor type Q5_0 is not supported"):
        load_gguf(write_gguf(tmp_path / "b.gguf", tiny_model(), qtypes=q5))
    extra = [("blk.0.attn_qkv.weight", np.zeros((4, 4), np.float32))]
    with pytest.raises(GGUFError, match="unknown GGUF tensor 'blk.0.attn_qkv.weight'"):
        load_gguf(write_gguf(tmp_path / "c.gguf", tiny_model(), extra_tensors=extra))


@pytest.mark.parametrize(("change", "message"), [
    ({"llama.block_count": None}, "no 'llama.block_count'"),
    ({"llama.rope.scaling.type": "yarn"}, "RoPE scaling"),
    ({"llama.rope.dimension_count": 8}, "rotates 8 of 16 head dims"),
])
def test_metadata_minift_cannot_follow_is_named(tmp_path, change, message):
    file = read_gguf(write_gguf(tmp_path / "t.gguf", tiny_model()))
    for key, value in change.items():
        if value is None:
            del file.metadata[key]
        else:
            file.metadata[key] = value
    with pytest.raises(GGUFError, match=message):
        config_from_metadata(file.metadata, file.tensors)


@pytest.mark.parametrize(("change", "message"), [
    ({"tokenizer.ggml.model": "llama"}, "tokenizer 'llama' is not supported"),
    ({"tokenizer.ggml.pre": "qwen2"}, "pre-tokenizer 'qwen2' is not supported"),
])
def test_tokenizers_minift_cannot_reproduce_are_refused(tmp_path, change, message):
    file = read_gguf(write_gguf(tmp_path / "t.gguf", tiny_model()))
    with pytest.raises(GGUFError, match=message):
        tokenizer_from_metadata({**file.metadata, **change})


# ---- the real model --------------------------------------------------------------------------


def test_smollm2_config_and_dequantization_match_the_gguf_package(smollm2_gguf):
    file = read_gguf(smollm2_gguf)
    config = config_from_metadata(file.metadata, file.tensors)
    assert (config.vocab_size, config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.ffn_dim) == \
        (49152, 576, 30, 9, 3, 1536)
    assert config.tie_embeddings and config.rope_theta == 100000.0 and config.max_seq_len == 8192
    checked = (("token_embd.weight", "Q8_0"), ("blk.0.attn_q.weight", "Q4_1"), ("blk.7.ffn_down.weight", "Q4_1"))
    for name, kind in checked:
        t = file.tensors[name]
        assert t.type_name == kind
        reference = gguf.quants.dequantize(t.raw, gguf.GGMLQuantizationType[kind])
        np.testing.assert_array_equal(file.array(name), reference)


# ---- validated before anything is built ------------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    ({"llama.block_count": 10**9}, r"n_layers = 1000000000 is above minift's limit LlamaConfig.LIMITS\['n_layers'\]"),
    ({"llama.block_count": 1000}, "describes a model of .* parameters, but the file's tensors hold"),
    ({"llama.vocab_size": 10**9}, r"LIMITS\['vocab_size'\]"),
    ({"llama.feed_forward_length": 200_000}, "describes a model of .* parameters"),
    ({"llama.attention.layer_norm_rms_epsilon": -1e-5}, "norm_eps must be a finite positive number"),
    ({"llama.rope.freq_base": float("nan")}, "rope_theta must be a finite positive number, got nan"),
    ({"llama.block_count": "2"}, "llama.block_count is '2', expected a int"),
])
def test_metadata_is_checked_against_the_tensors_before_a_model_is_built(tmp_path, change, message):
    file = read_gguf(write_gguf(tmp_path / "t.gguf", tiny_model()))
    with pytest.raises(GGUFError, match=message):
        config_from_metadata({**file.metadata, **change}, file.tensors)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused_naming_the_tensor_unless_allowed(tmp_path, bad):
    model = tiny_model()
    model.model.layers[1].mlp.up_proj.weight.data[3, 4] = bad
    path = write_gguf(tmp_path / "t.gguf", model)
    with pytest.raises(GGUFError, match=r"t.gguf: tensor blk.1.ffn_up.weight holds NaN or infinite values"):
        load_gguf(path)
    loaded, _ = load_gguf(path, allow_nonfinite=True)
    np.testing.assert_array_equal(loaded.model.layers[1].mlp.up_proj.weight.data[3, 4], bad)


def test_tensors_sharing_bytes_are_refused(tmp_path):
    data = bytearray(write_gguf(tmp_path / "t.gguf", tiny_model()).read_bytes())
    name = b"blk.1.ffn_down.weight"
    offset_at = data.index(name) + len(name) + 4 + 2 * 8 + 4  # n_dims u32, two u64 dims, type u32
    data[offset_at:offset_at + 8] = (32).to_bytes(8, "little")  # inside the first tensor's bytes
    (tmp_path / "alias.gguf").write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="alias.gguf: tensors .* overlap"):
        read_gguf(tmp_path / "alias.gguf")


def test_a_folder_and_a_bad_token_id_are_clear_errors(tmp_path):
    with pytest.raises(GGUFError, match="is a folder"):
        read_gguf(tmp_path)
    file = read_gguf(write_gguf(tmp_path / "t.gguf", tiny_model()))
    with pytest.raises(GGUFError, match=r"eos_token_id is 100000, not a token id 0..261"):
        tokenizer_from_metadata({**file.metadata, "tokenizer.ggml.eos_token_id": 100_000})
