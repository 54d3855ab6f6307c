"""GGUF, llama.cpp's one-file model format, read into a minift Llama (and its tokenizer).

A GGUF file holds three things, in this order (little-endian throughout):

1. a header: magic ``b"GGUF"``, version, tensor count, metadata count;
2. metadata: typed key/values such as ``llama.block_count = 30`` or the whole tokenizer
   vocabulary ``tokenizer.ggml.tokens``, and ``tokenizer.chat_template``;
3. tensor infos (name, dims, type, offset) and then the aligned tensor bytes.

The ``gguf`` package (maintained with llama.cpp) parses 1-3 and memory-maps the bytes. What
this module writes out itself is everything that needs understanding:

* **dequantization** (``dequantize_q8_0``, ``dequantize_q4_0``, ``dequantize_q4_1``): the weights are stored in blocks
  of 32 numbers that share a scale; we turn them back into float32;
* **dims**: GGUF lists dims fastest-varying first (``ne0, ne1`` = in, out for a weight), the
  reverse of NumPy's row-major shape, so a listed ``[576, 1536]`` is a NumPy ``(1536, 576)``,
  which is already PyTorch/HF's ``(out_features, in_features)``;
* **names** (``minift_name``): ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``
  (``gguf_name`` is the way back);
* **RoPE row order** (``unpermute_rope_rows``): llama.cpp's converter reorders the rows of Q and K
  (``permute_rope_rows`` reorders them again for the writer, ``minift.io.gguf_writer``).
* **config** (``config_from_metadata``) from the ``llama.*`` keys.

Everything is dequantized to float32 on load: minift trains in float32, and a 135M-parameter
model is 540 MB that way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy

GGUF_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """The file is not a GGUF minift can read (the message says what is wrong and where)."""


# ---- dequantization -------------------------------------------------------------------------

#: Q8_0 block (llama.cpp ``block_q8_0``): 32 weights in 34 bytes, x_i = d * q_i.
Q8_0_BLOCK = numpy.dtype([("d", "<f2"), ("q", "i1", (32,))])

#: Q4_0 block (``block_q4_0``): 32 weights in 18 bytes, x_i = d * (q_i - 8) with 4-bit q_i.
Q4_0_BLOCK = numpy.dtype([("d", "<f2"), ("qs", "u1", (16,))])

#: Q4_1 block (``block_q4_1``): 32 weights in 20 bytes, x_i = d * q_i + m with 4-bit q_i.
Q4_1_BLOCK = numpy.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])


def dequantize_q8_0(raw: numpy.ndarray) -> numpy.ndarray:
    """Q8_0 bytes -> float32 weights, 32 per block.

    Block layout: ``d`` (float16 scale), then 32 signed bytes ``q``. Weight i is ``d * q[i]``:
    symmetric 8-bit quantization, the scale chosen per block as max|x| / 127.
    """
    blocks = raw.view(Q8_0_BLOCK)
    return (blocks["d"].astype(numpy.float32)[:, None] * blocks["q"]).reshape(-1)


def dequantize_q4_1(raw: numpy.ndarray) -> numpy.ndarray:
    """Q4_1 bytes -> float32 weights, 32 per block.

    Block layout: ``d`` (float16 step), ``m`` (float16 minimum), then 16 bytes holding 32
    unsigned 4-bit codes q in 0..15. Weight i is ``d * q[i] + m``: asymmetric quantization of
    the block's range [min, max] onto 16 levels.

    Nibble order (llama.cpp's, easy to get wrong): byte j holds weight j in its *low* nibble
    and weight j + 16 in its *high* nibble. So the low nibbles of the 16 bytes are the first
    half of the block and the high nibbles the second half, not interleaved pairs.
    """
    blocks = raw.view(Q4_1_BLOCK)
    low, high = blocks["qs"] & 0x0F, blocks["qs"] >> 4  # (n_blocks, 16) each
    q = numpy.concatenate([low, high], axis=1).astype(numpy.float32)  # (n_blocks, 32)
    d = blocks["d"].astype(numpy.float32)[:, None]
    m = blocks["m"].astype(numpy.float32)[:, None]
    return (d * q + m).reshape(-1)


def dequantize_q4_0(raw: numpy.ndarray) -> numpy.ndarray:
    """Q4_0 bytes -> float32 weights, 32 per block.

    Block layout (``block_q4_0``): ``d`` (float16 step), then 16 bytes of 4-bit codes q in
    0..15 in Q4_1's nibble order. Weight i is ``d * (q[i] - 8)``: symmetric, no minimum.
    """
    blocks = raw.view(Q4_0_BLOCK)
    q = numpy.concatenate([blocks["qs"] & 0x0F, blocks["qs"] >> 4], axis=1).astype(numpy.float32) - 8
    return (blocks["d"].astype(numpy.float32)[:, None] * q).reshape(-1)


def _f32(raw):
    return raw.view("<f4").astype(numpy.float32)


def _f16(raw):
    return raw.view("<f2").astype(numpy.float32)


#: GGML type name -> (weights per block, bytes per block, decoder of raw bytes to float32).
DEQUANTIZERS = {
    "F32": (1, 4, _f32),
    "F16": (1, 2, _f16),
    "Q8_0": (32, Q8_0_BLOCK.itemsize, dequantize_q8_0),
    "Q4_0": (32, Q4_0_BLOCK.itemsize, dequantize_q4_0),
    "Q4_1": (32, Q4_1_BLOCK.itemsize, dequantize_q4_1),
}


def dequantize(raw, type_name: str, shape: tuple[int, ...], name: str = "tensor") -> numpy.ndarray:
    """The float32 array of NumPy ``shape`` stored as ``raw`` bytes of GGML type ``type_name``."""
    if type_name not in DEQUANTIZERS:
        raise GGUFError(f"{name}: tensor type {type_name} is not supported "
                        f"(minift reads {', '.join(DEQUANTIZERS)})")
    per_block, block_bytes, decode = DEQUANTIZERS[type_name]
    count = int(numpy.prod(shape, dtype=numpy.int64))
    raw = numpy.ascontiguousarray(raw).view(numpy.uint8).reshape(-1)
    if count % per_block or raw.size != count // per_block * block_bytes:
        raise GGUFError(f"{name}: {raw.size} bytes cannot hold {count} {type_name} values "
                        f"(blocks of {per_block} in {block_bytes} bytes)")
    return decode(raw).reshape(shape)


# ---- names and RoPE row order ---------------------------------------------------------------

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def minift_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> minift (= Hugging Face Llama) parameter name."""
    if match := _BLOCK_TENSOR.fullmatch(gguf_name):
        layer, part, kind = match.groups()
        if part in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    else:
        base, _, kind = gguf_name.rpartition(".")
        if base in _GLOBAL_NAMES and kind in ("weight", "bias"):
            return f"{_GLOBAL_NAMES[base]}.{kind}"
    raise GGUFError(f"unknown GGUF tensor {gguf_name!r} for a Llama model")


_HF_GLOBAL_NAMES = {hf: name for name, hf in _GLOBAL_NAMES.items()}
_HF_BLOCK_NAMES = {hf: name for name, hf in _BLOCK_NAMES.items()}
_HF_BLOCK_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def gguf_name(name: str) -> str:
    """minift (= Hugging Face Llama) parameter name -> llama.cpp tensor name; the inverse of
    ``minift_name``, used by the writer (``minift.io.gguf_writer``)."""
    if match := _HF_BLOCK_TENSOR.fullmatch(name):
        layer, part, kind = match.groups()
        if part in _HF_BLOCK_NAMES:
            return f"blk.{layer}.{_HF_BLOCK_NAMES[part]}.{kind}"
    else:
        base, _, kind = name.rpartition(".")
        if base in _HF_GLOBAL_NAMES and kind in ("weight", "bias"):
            return f"{_HF_GLOBAL_NAMES[base]}.{kind}"
    raise GGUFError(f"{name!r} is not a tensor of a plain Llama: GGUF's 'llama' architecture has no name for it")


def llama_tensor_names(config) -> set[str]:
    """The GGUF names of the weights every Llama of ``config`` has (biases are optional extras)."""
    names = {"token_embd.weight", "output_norm.weight"} | (set() if config.tie_embeddings else {"output.weight"})
    return names | {f"blk.{i}.{part}.weight" for i in range(config.n_layers) for part in _BLOCK_NAMES}


def unpermute_rope_rows(w: numpy.ndarray, n_heads: int) -> numpy.ndarray:
    """Undo llama.cpp's reordering of the rows of a Q or K projection (weight or bias).

    Both implementations rotate pairs of coordinates of each head (RoPE), but not the same
    pairs. Hugging Face rotates ``(x[i], x[i + hd/2])`` ("rotate half"); llama.cpp rotates
    neighbours ``(x[2i], x[2i + 1])``. So ``convert_hf_to_gguf.py`` interleaves the two halves
    of each head's rows: GGUF row ``2i`` of a head is HF row ``i`` and GGUF row ``2i + 1`` is
    HF row ``i + hd/2``. Here we put them back: view the head's rows as (hd/2, 2), swap to
    (2, hd/2), flatten. ``n_heads`` is the query head count for Q and the key/value head count
    for K.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: numpy.ndarray, n_heads: int) -> numpy.ndarray:
    """Hugging Face row order -> llama.cpp's, the inverse of ``unpermute_rope_rows`` (what
    ``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` does): within each head, HF row ``i``
    becomes row ``2i`` and HF row ``i + hd/2`` row ``2i + 1``."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- the file -------------------------------------------------------------------------------


@dataclass
class GGUFTensor:
    name: str
    type_name: str
    shape: tuple[int, ...]  # NumPy order: GGUF's dims reversed
    raw: numpy.ndarray  # the stored bytes (memory-mapped)


@dataclass
class GGUFFile:
    path: Path
    metadata: dict
    tensors: dict[str, GGUFTensor]

    def array(self, name: str) -> numpy.ndarray:
        """Tensor ``name`` (GGUF name) as float32, dequantized."""
        t = self.tensors[name]
        return dequantize(t.raw, t.type_name, t.shape, f"{self.path}: {name}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse ``path`` with ``gguf.GGUFReader``; anything malformed becomes a ``GGUFError``, and
    so do tensors whose bytes overlap (``check_tensor_layout``)."""
    import gguf  # noqa: PLC0415 - only needed when a GGUF is read

    path = Path(path)
    if path.is_dir():
        raise GGUFError(f"{path} is a folder; point at the .gguf file itself")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = gguf.GGUFReader(path)
        metadata = {key: field.contents() for key, field in reader.fields.items()}
        tensors = {t.name: GGUFTensor(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)),
                                      t.data) for t in reader.tensors}
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as exc:
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({type(exc).__name__}: {exc})") from None
    check_tensor_layout({t.name: (t.data_offset, t.n_bytes) for t in reader.tensors}, path)
    return GGUFFile(path, metadata, tensors)


def check_tensor_layout(spans: dict[str, tuple[int, int]], path) -> None:
    """Refuse tensors that share bytes ({name: (offset, byte count)}): the reader would hand out
    two views of the same memory, one tensor silently aliasing another."""
    previous_end, previous = 0, None
    for name, (offset, size) in sorted(spans.items(), key=lambda item: item[1]):
        if offset < previous_end:
            raise GGUFError(f"{path}: tensors {previous!r} and {name!r} overlap (byte {offset} is inside "
                            f"{previous!r}); the file is corrupt, convert the model again")
        previous_end, previous = offset + size, name


# ---- config and weights ---------------------------------------------------------------------


def _required(metadata: dict, key: str):
    if key not in metadata:
        raise GGUFError(f"GGUF metadata has no {key!r}")
    return metadata[key]


def _typed(metadata: dict, key: str, kind: type, default=None):
    """``metadata[key]`` (or ``default`` when absent and one is given), which must be a ``kind``
    (an int is accepted for a float). A wrong type is named, not passed on to int() or float()."""
    value = _required(metadata, key) if default is None else metadata.get(key, default)
    ok = isinstance(value, kind) and not isinstance(value, bool) or (kind is float and type(value) is int)
    if not ok:
        raise GGUFError(f"GGUF metadata {key} is {value!r}, expected a {kind.__name__}")
    return value


def config_from_metadata(metadata: dict, tensors: dict[str, GGUFTensor]):
    """A ``LlamaConfig`` from the ``llama.*`` metadata keys (and which tensors exist), checked
    against the tensors before anything is built: a few bytes of metadata claiming a billion
    layers must not allocate them."""
    from minift.models import LlamaConfig  # noqa: PLC0415 - io must not need models at import

    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"GGUF architecture {arch!r} is not supported (minift reads 'llama')")
    if metadata.get("llama.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in tensors:
        raise GGUFError("GGUF uses RoPE scaling, which minift's Llama does not implement")
    if "token_embd.weight" not in tensors:
        raise GGUFError("GGUF has no token_embd.weight tensor")

    def count(key, default=None):
        return _typed(metadata, f"llama.{key}", int, default)

    heads = count("attention.head_count")
    try:
        config = LlamaConfig(
            vocab_size=count("vocab_size", tensors["token_embd.weight"].shape[0]),
            dim=count("embedding_length"), n_layers=count("block_count"), n_heads=heads,
            n_kv_heads=count("attention.head_count_kv", heads), ffn_dim=count("feed_forward_length"),
            max_seq_len=count("context_length"),
            rope_theta=float(_typed(metadata, "llama.rope.freq_base", float, 10000.0)),
            norm_eps=float(_typed(metadata, "llama.attention.layer_norm_rms_epsilon", float)),
            tie_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors, mlp_bias="blk.0.ffn_up.bias" in tensors)
    except ValueError as exc:
        raise GGUFError(f"GGUF metadata: {exc}") from None
    rope_dims = metadata.get("llama.rope.dimension_count", config.head_dim)
    if rope_dims != config.head_dim:
        raise GGUFError(f"GGUF rotates {rope_dims} of {config.head_dim} head dims; minift rotates all")
    stored = sum(math.prod(t.shape) for t in tensors.values())
    if config.num_parameters > stored:
        raise GGUFError(f"GGUF metadata describes a model of {config.num_parameters:,} parameters, but the "
                        f"file's tensors hold {stored:,} values; the metadata is corrupt")
    return config


def state_dict_from_gguf(file: GGUFFile, config, allow_nonfinite: bool = False) -> dict[str, numpy.ndarray]:
    """minift parameter name -> float32 array, with Q/K rows back in Hugging Face order.
    NaN or infinite weights are refused unless ``allow_nonfinite``."""
    state = {}
    for name in file.tensors:
        array = file.array(name)
        if not allow_nonfinite and not numpy.isfinite(array).all():
            raise GGUFError(f"{file.path}: tensor {name} holds NaN or infinite values (corrupt scales, or a "
                            "diverged model); pass allow_nonfinite=True to inspect it anyway")
        if ".attn_q." in name:
            array = unpermute_rope_rows(array, config.n_heads)
        elif ".attn_k." in name:
            array = unpermute_rope_rows(array, config.n_kv_heads)
        state[minift_name(name)] = array
    return state


def load_gguf(path: str | Path, allow_nonfinite: bool = False):
    """-> (LlamaForCausalLM, tokenizer) from a llama-architecture GGUF file. Everything is read
    and checked (metadata, tokenizer, tensors) before the model is built."""
    from minift.models import LlamaForCausalLM  # noqa: PLC0415

    file = read_gguf(path)
    try:
        config = config_from_metadata(file.metadata, file.tensors)
        tokenizer = tokenizer_from_metadata(file.metadata)
    except GGUFError as exc:
        raise GGUFError(f"{path}: {exc}") from None
    state = state_dict_from_gguf(file, config, allow_nonfinite)
    model = LlamaForCausalLM(config)
    try:
        model.load_state_dict(state)
    except (KeyError, ValueError) as exc:
        raise GGUFError(f"{path}: tensors do not fit the config in its metadata ({exc})") from None
    return model, tokenizer


#: ``tokenizer.ggml.token_type`` value of control tokens (llama.cpp ``LLAMA_TOKEN_TYPE_CONTROL``).
CONTROL_TOKEN = 3
#: llama.cpp ``tokenizer.ggml.pre`` names -> minift pre-tokenizer names (``minift.data.bpe``).
PRETOKENIZERS = {"smollm": "smollm", "gpt-2": "gpt2", "gpt2": "gpt2"}


def tokenizer_from_metadata(metadata: dict):
    """The ``BPETokenizer`` that the ``tokenizer.*`` metadata describes.

    A GGUF carries its tokenizer: ``tokenizer.ggml.tokens`` (id = position, in GPT-2's byte
    spelling), ``merges`` ("a b" strings, best first), ``token_type`` (3 = control), the eos/pad
    ids and ``tokenizer.chat_template``. ``tokenizer.ggml.pre`` names the pre-tokenizer regex.
    """
    from minift.data.bpe import BPETokenizer  # noqa: PLC0415

    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"GGUF tokenizer {model!r} is not supported (minift reads byte-level BPE, 'gpt2')")
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRETOKENIZERS:
        raise GGUFError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(PRETOKENIZERS)})")
    tokens = _string_list(metadata, "tokenizer.ggml.tokens")
    merges = _string_list(metadata, "tokenizer.ggml.merges")
    if any(m.count(" ") != 1 for m in merges):
        raise GGUFError("GGUF metadata tokenizer.ggml.merges must be \"a b\" strings with one space")
    types = metadata.get("tokenizer.ggml.token_type", [])
    special = [token for token, kind in zip(tokens, types) if kind == CONTROL_TOKEN]
    ids = {key: _token_id(metadata, f"tokenizer.ggml.{key}_token_id", len(tokens))
           for key in ("eos", "padding", "bos")}
    if ids["eos"] is None:
        raise GGUFError("GGUF metadata has no 'tokenizer.ggml.eos_token_id'")
    try:
        return BPETokenizer(tokens, [tuple(m.split(" ")) for m in merges], special, eos_id=ids["eos"],
                            pad_id=ids["padding"], bos_id=ids["bos"], pretokenizer=PRETOKENIZERS[pre],
                            chat_template=_typed(metadata, "tokenizer.chat_template", str, "") or None)
    except ValueError as exc:
        raise GGUFError(f"GGUF tokenizer: {exc}") from None


def _string_list(metadata: dict, key: str) -> list[str]:
    value = _required(metadata, key)
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise GGUFError(f"GGUF metadata {key} must be a list of strings")
    return value


def _token_id(metadata: dict, key: str, vocab_size: int) -> int | None:
    """An optional token id, which must name a token of the vocabulary."""
    value = metadata.get(key)
    if value is not None and (type(value) is not int or not 0 <= value < vocab_size):
        raise GGUFError(f"GGUF metadata {key} is {value!r}, not a token id 0..{vocab_size - 1}")
    return value
