"""Writing GGUF: a minift Llama and its tokenizer as one file for llama.cpp, Ollama and transformers.

This is ``minift.io.gguf`` run backwards, and it writes what llama.cpp's own converter
(``convert_hf_to_gguf.py``) writes for a Hugging Face Llama:

* **metadata**: ``general.architecture = "llama"``, the ``llama.*`` hyperparameters, and the
  tokenizer as ``tokenizer.ggml.*`` keys (model ``"gpt2"``, i.e. byte-level BPE: tokens, merges,
  token types, special ids, ``tokenizer.chat_template``);
* **tensors** under llama.cpp's names (``gguf_name``), Q and K with their rows in llama.cpp's RoPE
  order (``permute_rope_rows``), 2-D weights in the chosen type and 1-D ones (norms, biases) in
  float32, as the converter keeps them;
* **types**: ``f32`` (minift reads it back bit for bit), ``f16``, and the block formats ``q8_0``
  and ``q4_0``, packed here (``quantize_q8_0``, ``quantize_q4_0``) with llama.cpp's reference
  rounding, so the bytes equal what ``gguf.quants`` and llama.cpp's ``quantize_row_*_ref`` make.

The ``gguf`` package (maintained with llama.cpp) lays out the container: header, key/values,
tensor infos, aligned data. The file is written under a temporary name and renamed when
complete, so an interrupted export never leaves a half-written ``.gguf`` behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy

from minift.backend import to_numpy
from minift.data.bpe import BPETokenizer
from minift.data.tokenizer import ByteTokenizer
from minift.io.gguf import (
    CONTROL_TOKEN,
    Q4_0_BLOCK,
    Q8_0_BLOCK,
    GGUFError,
    gguf_name,
    llama_tensor_names,
    permute_rope_rows,
)
from minift.io.model_dir import byte_tokenizer_as_bpe
from minift.io.safetensors import temp_file_beside

#: ``tokenizer.ggml.token_type`` of an ordinary token (llama.cpp ``LLAMA_TOKEN_TYPE_NORMAL``).
NORMAL_TOKEN = 1
#: minift pre-tokenizer -> llama.cpp ``tokenizer.ggml.pre`` (the reader's table, backwards).
PRETOKENIZER_NAMES = {"smollm": "smollm", "gpt2": "gpt-2"}


# ---- block quantization ------------------------------------------------------------------------


def _blocks_of_32(x) -> numpy.ndarray:
    x = numpy.asarray(x, dtype=numpy.float32)
    if x.shape[-1] % 32:
        raise GGUFError(f"rows of {x.shape[-1]} values do not split into GGUF blocks of 32")
    return x.reshape(-1, 32)


def _inverse(d: numpy.ndarray) -> numpy.ndarray:
    """1 / d as llama.cpp computes it, 0 where d = 0 or so small that 1 / d overflows (below
    2^-128, where the float16 copy of d is 0 and the block reads back as 0 whatever its codes)."""
    with numpy.errstate(divide="ignore", over="ignore"):
        inverse = numpy.float32(1) / d
    return numpy.where(numpy.isfinite(inverse), inverse, numpy.float32(0))


def _round_half_away(x: numpy.ndarray) -> numpy.ndarray:
    """C's ``roundf``, which llama.cpp uses (NumPy's ``rint`` rounds halves to even)."""
    magnitude = numpy.abs(x)
    whole = numpy.floor(magnitude)
    return numpy.sign(x) * (whole + (magnitude - whole >= 0.5))


def quantize_q8_0(x) -> numpy.ndarray:
    """float weights (..., n), n a multiple of 32 -> Q8_0 bytes (..., n / 32 * 34).

    Each block of 32 (llama.cpp ``block_q8_0``) stores a float16 scale and 32 signed bytes::

        d = max|x| / 127,    q_i = round(x_i * (1 / d))  (halves away from zero; q = 0 when d = 0)

    and reads back as ``d16 * q_i`` with ``d16`` = d rounded to float16. The error per weight is
    at most d/2 from rounding q plus 127 |d - d16| from rounding the scale (|d - d16| <= d 2^-11,
    so the bound is under 0.57 d).
    """
    blocks = _blocks_of_32(x)
    d = numpy.abs(blocks).max(axis=1, keepdims=True) / numpy.float32(127)
    q = _round_half_away(blocks * _inverse(d))  # times the inverse, as quantize_row_q8_0_ref
    packed = numpy.empty(len(blocks), Q8_0_BLOCK)
    with numpy.errstate(over="ignore"):  # a scale above float16's 65504 is stored as inf, as llama.cpp does
        packed["d"], packed["q"] = d[:, 0], q
    return packed.view(numpy.uint8).reshape(*numpy.shape(x)[:-1], -1)


def quantize_q4_0(x) -> numpy.ndarray:
    """float weights (..., n), n a multiple of 32 -> Q4_0 bytes (..., n / 32 * 18).

    Each block (llama.cpp ``block_q4_0``, ``quantize_row_q4_0_ref``) takes m, the weight of largest
    magnitude *with its sign*, and stores a float16 step and 32 four-bit codes::

        d = m / -8,    q_i = min(15, trunc(x_i * (1 / d) + 8.5))    read back as d16 (q_i - 8)

    so m itself is exactly -8 d and the range is [-8 d, 7 d]; a weight near -m is clipped to
    7 d. Error per weight: at most |d| / 2, or |d| for the clipped end, plus the scale's float16
    rounding (8 |d - d16|). Nibbles as in Q4_1: byte j holds weight j (low) and j + 16 (high).
    """
    blocks = _blocks_of_32(x)
    largest = numpy.take_along_axis(blocks, numpy.abs(blocks).argmax(axis=1)[:, None], axis=1)
    d = largest / numpy.float32(-8)
    q = numpy.clip(numpy.trunc(blocks * _inverse(d) + numpy.float32(8.5)), 0, 15).astype(numpy.uint8)
    packed = numpy.empty(len(blocks), Q4_0_BLOCK)
    with numpy.errstate(over="ignore"):
        packed["d"], packed["qs"] = d[:, 0], q[:, :16] | (q[:, 16:] << 4)
    return packed.view(numpy.uint8).reshape(*numpy.shape(x)[:-1], -1)


#: ``dtype`` argument -> (GGML type of the 2-D weights, its packer, llama.cpp's ``general.file_type``).
DTYPES = {
    "f32": ("F32", None, 0),  # LLAMA_FTYPE_ALL_F32
    "f16": ("F16", None, 1),  # LLAMA_FTYPE_MOSTLY_F16
    "q8_0": ("Q8_0", quantize_q8_0, 7),  # LLAMA_FTYPE_MOSTLY_Q8_0
    "q4_0": ("Q4_0", quantize_q4_0, 2),  # LLAMA_FTYPE_MOSTLY_Q4_0
}


def encode_tensor(array: numpy.ndarray, dtype: str) -> tuple[str, numpy.ndarray]:
    """-> (GGML type name, array to store): float32 for 1-D tensors and for ``f32``; float16 for
    ``f16`` and for rows that do not split into blocks of 32 (the converter's fallback too)."""
    if array.ndim == 1 or dtype == "f32":
        return "F32", array.astype(numpy.float32)
    type_name, pack, _ = DTYPES[dtype]
    if pack is None or array.shape[-1] % 32:
        return "F16", array.astype(numpy.float16)
    return type_name, pack(array)


# ---- what can be written -----------------------------------------------------------------------


def llama_tensors(model) -> dict[str, numpy.ndarray]:
    """GGUF name -> float array of every parameter, Q/K rows permuted; refuses anything that is
    not exactly a plain Llama (an attached LoRA, an extra module, a 4-bit layer's missing weight)."""
    config, params = model.config, dict(model.named_parameters())
    if lora := [name for name in params if ".lora_" in name]:
        raise GGUFError(f"the model still carries LoRA adapters ({lora[0]}); merge them into the weights first "
                        "(merge_and_unload, or minift export --adapter)")
    tensors = {}
    for name, param in params.items():
        try:
            target = gguf_name(name)
        except GGUFError:
            raise GGUFError(f"{name} is not a tensor of a plain Llama: a fine-tuning method added modules "
                            "(bottleneck adapters, prefixes) that llama.cpp's 'llama' architecture has no "
                            "place for; export with --format hf") from None
        array = numpy.asarray(to_numpy(param.data), dtype=numpy.float32)
        if ".attn_q." in target:
            array = permute_rope_rows(array, config.n_heads)
        elif ".attn_k." in target:
            array = permute_rope_rows(array, config.n_kv_heads)
        tensors[target] = array
    missing = sorted(llama_tensor_names(config) - tensors.keys())
    if missing:
        raise GGUFError(f"the model has no float weight for {missing[0]} ({len(missing)} missing): a 4-bit "
                        "(Linear4bit) layer must be dequantized, with any LoRA merged into it, before export")
    return tensors


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """The ``tokenizer.ggml.*`` values for ``tokenizer``, as ``minift.io.gguf.tokenizer_from_metadata``
    reads them back. minift's ``ByteTokenizer`` becomes byte-level BPE with no merges: token b is
    byte b spelled in GPT-2's alphabet, so every reader gives each byte its ByteTokenizer id."""
    if isinstance(tokenizer, BPETokenizer):
        tokens, merges = tokenizer.tokens, [" ".join(pair) for pair in tokenizer.merges]
        pre, template = PRETOKENIZER_NAMES[tokenizer.pretokenizer], tokenizer.chat_template
    elif isinstance(tokenizer, ByteTokenizer):
        tokens, merges = byte_tokenizer_as_bpe().tokens, []  # the same vocabulary tokenizer.json gets
        pre, template = "gpt-2", None  # plain ChatML, which llama.cpp also falls back to
    else:
        raise GGUFError(f"cannot write a {type(tokenizer).__name__} to GGUF (minift writes its BPE and byte "
                        "tokenizers); export with --format hf")
    if len(tokens) != vocab_size:
        raise GGUFError(f"the tokenizer has {len(tokens)} tokens but the model's vocabulary is {vocab_size}")
    special = set(tokenizer.special_tokens.values())
    return {"tokens": tokens, "merges": merges, "pre": pre, "chat_template": template,
            "token_types": [CONTROL_TOKEN if i in special else NORMAL_TOKEN for i in range(len(tokens))],
            "bos_id": getattr(tokenizer, "bos_id", None), "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}


# ---- the file ----------------------------------------------------------------------------------


def _writer_class(gguf):
    """``gguf.GGUFWriter``, except that it writes an empty array of strings, which the format
    allows (a count of 0) and ``gguf.GGUFWriter`` drops: a byte-level vocabulary has no merges,
    but llama.cpp refuses a "gpt2" tokenizer without the ``tokenizer.ggml.merges`` key."""

    class Writer(gguf.GGUFWriter):
        def add_array(self, key, val):
            if len(val) == 0:
                self.add_key_value(key, val, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
            else:
                super().add_array(key, val)

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def _add_metadata(writer, config, tokenizer: dict, dtype: str) -> None:
    """The keys llama.cpp's ``llm_load_hparams`` and ``llama_vocab::load`` read for a Llama."""
    writer.add_file_type(DTYPES[dtype][2])
    writer.add_quantization_version(2)  # GGML_QNT_VERSION
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer["pre"])
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(tokenizer["token_types"])
    writer.add_token_merges(tokenizer["merges"])
    writer.add_eos_token_id(tokenizer["eos_id"])
    writer.add_pad_token_id(tokenizer["pad_id"])
    if tokenizer["bos_id"] is not None:
        writer.add_bos_token_id(tokenizer["bos_id"])
    writer.add_add_bos_token(False)  # minift never prepends one; llama.cpp would for "gpt2" otherwise
    writer.add_add_space_prefix(False)
    if tokenizer["chat_template"] is not None:
        writer.add_chat_template(tokenizer["chat_template"])


def write_gguf(model, tokenizer, path: str | Path, *, dtype: str = "f32") -> Path:
    """Write ``model`` (a plain minift Llama) and ``tokenizer`` to the GGUF file ``path``.

    ``dtype`` is the type of the 2-D weights: ``f32``, ``f16``, ``q8_0`` or ``q4_0`` (norms and
    biases stay float32). GGUF keeps ``rope_theta`` and ``norm_eps`` as float32, as llama.cpp reads
    them. Everything is checked before a byte is written, and the file appears under its name
    only once complete. -> ``path``.
    """
    import gguf  # noqa: PLC0415 - only needed when a GGUF is written

    if dtype not in DTYPES:
        raise GGUFError(f"unknown GGUF dtype {dtype!r}; minift writes {', '.join(DTYPES)}")
    tensors = llama_tensors(model)
    vocab = tokenizer_metadata(tokenizer, model.config.vocab_size)
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the .gguf file's path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)  # permissions as for any new file (umask), not mkstemp's 0600
    os.close(fd)
    try:
        writer = _writer_class(gguf)(tmp, "llama")
        _add_metadata(writer, model.config, vocab, dtype)
        for name, array in tensors.items():
            type_name, data = encode_tensor(array, dtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType[type_name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
