"""A Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings.

The sub-module names follow the Hugging Face Llama layout (``model.layers.{i}.self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ``model.norm``, ``lm_head``) so that a checkpoint's
tensors and a PEFT adapter's keys map onto this model one to one. SmolLM2-135M is this
architecture with dim 576, 30 layers, 9 query heads and 3 key/value heads.

Legend: B batch, T tokens, C = dim, H query heads, Hkv key/value heads, hd head dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy

import minift.autograd.functional as F
from minift.autograd import Tensor, checkpoint, is_grad_enabled
from minift.backend import xp
from minift.nn import Embedding, Linear, Module, ModuleList, RMSNorm

#: The Linear layers of one block, by their Hugging Face names: LoRA's usual targets are the
#: attention projections; "all linear" adds the MLP's.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
BLOCK_PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS

def _check_count(name: str, value, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
    if value > limit:
        raise ValueError(f"LlamaConfig.{name} = {value} is above minift's limit LlamaConfig.LIMITS[{name!r}] = "
                         f"{limit}; the file that gave it is corrupt, or the model is far too big for minift")


def _check_real(name: str, value, allow_zero: bool) -> None:
    """A finite number, positive (or zero where ``allow_zero``): NaN fails every comparison, so
    ``value <= 0`` alone would let it through."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (is_number and math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        sign = "non-negative" if allow_zero else "positive"
        raise ValueError(f"LlamaConfig.{name} must be a finite {sign} number, got {value!r}")


@dataclass
class LlamaConfig:
    """Every number that fixes the architecture; checked on construction."""

    vocab_size: int = 260
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 352
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    init_std: float = 0.02

    #: Upper bounds on the counts, far above any model minift can train in float32 NumPy, so that
    #: a corrupt file (``n_layers: 1000000``) is refused by name instead of exhausting memory.
    LIMITS = {"vocab_size": 1 << 20, "dim": 1 << 16, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
              "ffn_dim": 1 << 18, "max_seq_len": 1 << 24}
    #: The most parameters a config may describe (2^34, 64 GiB of float32).
    MAX_PARAMETERS = 1 << 34

    def __post_init__(self):
        for name, limit in self.LIMITS.items():
            _check_count(name, getattr(self, name), limit)
        for name in ("rope_theta", "norm_eps", "init_std"):
            _check_real(name, getattr(self, name), allow_zero=name == "init_std")
        for name in ("tie_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LlamaConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"LlamaConfig: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim {self.head_dim} must be even for RoPE")
        if self.num_parameters > self.MAX_PARAMETERS:
            raise ValueError(f"LlamaConfig describes {self.num_parameters:,} parameters, above "
                             f"LlamaConfig.MAX_PARAMETERS={self.MAX_PARAMETERS:,}")

    @property
    def num_parameters(self) -> int:
        """How many numbers a model of this config holds, known before building it: a loader
        compares it with the values its file stores before allocating anything."""
        c, kv = self, self.n_kv_heads * self.head_dim
        attention = 2 * c.dim * c.dim + 2 * c.dim * kv + (2 * c.dim + 2 * kv if c.attention_bias else 0)
        mlp = 3 * c.dim * c.ffn_dim + (2 * c.ffn_dim + c.dim if c.mlp_bias else 0)
        block = attention + mlp + 2 * c.dim  # + the two RMSNorm weights
        head = 0 if c.tie_embeddings else c.vocab_size * c.dim
        return c.vocab_size * c.dim + c.n_layers * block + c.dim + head

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Keys and values of the tokens seen so far, one preallocated buffer per layer.

    Generation without a cache recomputes K and V of the whole prefix for every new token:
    O(T^2) projections for T tokens. With it, each step projects only the new token and
    appends it here. Used for inference only (no gradients flow through it).
    """

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, dtype=numpy.float32):
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self.keys = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0
        self.max_len = max_len

    def append(self, layer: int, k, v):
        """Store this layer's new (B, Hkv, T, hd) keys/values; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} tokens > max_len {self.max_len}")
        self.keys[layer][:, :, start:end] = k.data
        self.values[layer][:, :, start:end] = v.data
        return Tensor(self.keys[layer][:, :, :end]), Tensor(self.values[layer][:, :, :end])

    def advance(self, n_tokens: int) -> None:
        """Called once per forward pass, after every layer has appended its keys/values."""
        self.length += n_tokens


class LlamaAttention(Module):
    """Multi-head causal self-attention with RoPE and grouped-query key/value heads."""

    def __init__(self, config: LlamaConfig, rng: numpy.random.Generator):
        super().__init__()
        c, hd = config, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, hd
        kw = {"bias": c.attention_bias, "std": c.init_std, "rng": rng}
        self.q_proj = Linear(c.dim, c.n_heads * hd, **kw)
        self.k_proj = Linear(c.dim, c.n_kv_heads * hd, **kw)
        self.v_proj = Linear(c.dim, c.n_kv_heads * hd, **kw)
        self.o_proj = Linear(c.n_heads * hd, c.dim, **kw)
        self.prefix = None  # learned key/value prefix (prefix tuning, minift/peft/prefix.py)

    def heads(self, x, n_heads):
        """(B, T, n_heads * hd) -> (B, n_heads, T, hd)."""
        b, t, _ = x.shape
        return x.reshape(b, t, n_heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None = None, mask=None):
        """``mask``: None, a (B, Tk) key mask, or the ``SegmentLayout`` of packed rows, which
        attends within each segment only (``F.segment_attention``)."""
        b, t, _ = x.shape
        q = F.rope(self.heads(self.q_proj(x), self.n_heads), cos, sin)  # (B, H, T, hd)
        k = F.rope(self.heads(self.k_proj(x), self.n_kv_heads), cos, sin)  # (B, Hkv, T, hd)
        v = self.heads(self.v_proj(x), self.n_kv_heads)  # (B, Hkv, T, hd)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, Hkv, Tk, hd), Tk = tokens so far
        if self.prefix is not None:
            k, v = self.prefix.prepend(k, v)  # (B, Hkv, P + Tk, hd)
            mask = None if mask is None else self.prefix.extend_mask(mask)
        if isinstance(mask, F.SegmentLayout):
            o = F.segment_attention(q, k, v, layout=mask)  # (B, H, T, hd)
        else:
            o = F.scaled_dot_product_attention(q, k, v, causal=True, mask=mask)  # (B, H, T, hd)
        return self.o_proj(o.permute(0, 2, 1, 3).reshape(b, t, self.n_heads * self.head_dim))


class LlamaMLP(Module):
    """SwiGLU feed-forward (Shazeer 2020): down( silu(gate(x)) * up(x) ), the gated product as
    one fused op (``F.swiglu``)."""

    def __init__(self, config: LlamaConfig, rng: numpy.random.Generator):
        super().__init__()
        kw = {"bias": config.mlp_bias, "std": config.init_std, "rng": rng}
        self.gate_proj = Linear(config.dim, config.ffn_dim, **kw)
        self.up_proj = Linear(config.dim, config.ffn_dim, **kw)
        self.down_proj = Linear(config.ffn_dim, config.dim, **kw)

    def forward(self, x):
        return self.down_proj(F.swiglu(self.gate_proj(x), self.up_proj(x)))


class LlamaBlock(Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: LlamaConfig, rng: numpy.random.Generator):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = LlamaAttention(config, rng)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = LlamaMLP(config, rng)

    def forward(self, x, cos, sin, layer: int, cache=None, mask=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(Module):
    """Token embedding, the stack of blocks, and the final norm: ids -> hidden states (B, T, C)."""

    def __init__(self, config: LlamaConfig, rng: numpy.random.Generator):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.dim, std=config.init_std, rng=rng)
        self.layers = ModuleList(LlamaBlock(config, rng) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.checkpointed_blocks = 0  # the bottom this many blocks recompute in backward

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether any block is checkpointed (set by ``LlamaForCausalLM.gradient_checkpointing_enable``)."""
        return self.checkpointed_blocks > 0

    def forward(self, input_ids, cos, sin, cache=None, mask=None):
        x = self.embed_tokens(input_ids)  # (B, T, C)
        checkpointed = self.checkpointed_blocks if cache is None and is_grad_enabled() else 0
        for i, block in enumerate(self.layers):
            if i < checkpointed:
                x = checkpoint(lambda h, block=block, i=i: block(h, cos, sin, i, None, mask), x,
                               parameters=block.parameters())
            else:
                x = block(x, cos, sin, i, cache, mask)
        return self.norm(x)


class LlamaForCausalLM(Module):
    """The decoder plus its output head: token ids (B, T) -> next-token logits (B, T, V).

    With ``tie_embeddings`` the head reuses the embedding matrix (logits = h E^T) and there is
    no ``lm_head`` parameter, as in SmolLM2 and in Hugging Face checkpoints of tied models.
    """

    def __init__(self, config: LlamaConfig, seed: int = 0):
        super().__init__()
        self.config = config
        rng = numpy.random.default_rng(seed)
        self.model = LlamaModel(config, rng)
        self.lm_head = None if config.tie_embeddings else Linear(config.dim, config.vocab_size,
                                                                 std=config.init_std, rng=rng)

    @property
    def dtype(self):
        """The float type the model computes in (float32 by default, float64 for gradient checks):
        the embedding's rows, float32 also when the frozen table is stored in 16 bits."""
        return self.model.embed_tokens.compute_dtype

    def rope_for(self, start: int, length: int, dtype):
        return F.rope_tables(numpy.arange(start, start + length), self.config.head_dim,
                             self.config.rope_theta, dtype=dtype)

    def hidden(self, input_ids, cache: KVCache | None = None, attention_mask=None, positions=None,
               segment_ids=None):
        """Final hidden states (B, T, C): the features a linear probe or a head reads.

        ``positions`` (B, T) gives each row its own token positions — a left-padded row starts
        counting at its first real token; by default positions continue from the cache.
        ``segment_ids`` (B, T) marks packed rows (``minift/data/packing.py``): a token attends
        only to its own segment, and ``positions`` must restart per segment. Their layout is
        worked out once here and read by every layer (``F.segment_attention``).
        """
        ids = xp.asarray(input_ids.data if isinstance(input_ids, Tensor) else input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {ids.shape}")
        start = cache.length if cache is not None else 0
        if start + ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + ids.shape[1]} tokens exceeds the context "
                             f"length max_seq_len={self.config.max_seq_len}")
        if positions is None:
            cos, sin = self.rope_for(start, ids.shape[1], self.dtype)
        else:
            positions = xp.asarray(positions)
            if positions.shape != ids.shape:
                raise ValueError(f"positions {positions.shape} must have the shape of input_ids {ids.shape}")
            cos, sin = (t[:, None] for t in F.rope_tables(positions, self.config.head_dim, self.config.rope_theta,
                                                           dtype=self.dtype))  # (B, 1, T, hd)
        mask = attention_mask
        if segment_ids is not None:
            mask = self._packed_layout(segment_ids, ids.shape, cache, attention_mask, positions)
        h = self.model(ids, cos, sin, cache, mask)
        if cache is not None:
            cache.advance(ids.shape[1])
        return h

    def _packed_layout(self, segment_ids, shape, cache, attention_mask, positions):
        """The ``SegmentLayout`` of packed rows (their block-diagonal mask), refused where it
        cannot hold."""
        segment_ids = xp.asarray(segment_ids)
        if segment_ids.shape != shape:
            raise ValueError(f"segment_ids {segment_ids.shape} must have the shape of input_ids {shape}")
        if cache is not None or positions is None:
            raise ValueError("segment_ids (packed rows) are for training: pass the positions that "
                             "minift.data.pack_examples made with them, and no KV cache")
        if any(block.self_attn.prefix is not None for block in self.model.layers):
            raise ValueError("prefix tuning cannot train on packed rows: its prefix keys extend only a "
                             "(batch, keys) mask (minift/peft/prefix.py); drop --packing (minift finetune) "
                             "or use another method")
        real = segment_ids != 0
        if attention_mask is not None and not bool((xp.asarray(attention_mask, dtype=bool) == real).all()):
            raise ValueError("attention_mask must be True exactly where segment_ids is not 0 (padding is "
                             "segment 0); pass the batch that collate_packed (minift/data/packing.py) made")
        return F.segment_layout(segment_ids)

    def forward(self, input_ids, cache: KVCache | None = None, attention_mask=None,
                last_only: bool = False, positions=None, segment_ids=None):
        """Logits for every position, or only for the last one (``last_only``, generation).

        ``attention_mask`` (B, Tk), True for real tokens, hides padding keys; right-padded
        training batches do not need it, since causal attention never looks ahead.
        ``positions`` and ``segment_ids``: see ``hidden``.
        """
        h = self.hidden(input_ids, cache, attention_mask, positions, segment_ids)
        if last_only:
            h = h[:, -1:]
        if self.lm_head is None:
            return self.model.embed_tokens.attend(h)  # the tied head, widened if stored in 16 bits
        return self.lm_head(h)  # a Linear (maybe 16-bit), or whatever wraps it (a LoRA layer)

    @property
    def head_weight(self):
        """The (V, C) matrix the output head multiplies by: the embedding when tied, an untied
        plain ``Linear``'s weight; ``None`` when the head is more than one matrix (a LoRA layer
        wraps it), which the fused loss cannot run and ``head_loss`` then takes the logits."""
        if self.lm_head is None:
            return self.model.embed_tokens.weight
        return self.lm_head.weight if type(self.lm_head) is Linear else None

    def label_logprobs(self, input_ids, labels, positions=None, segment_ids=None):
        """log p(label) at every position (B, T), 0 where the label is ignored — what ``forward``
        then a log-softmax would give, without the (B, T, V) logits: the head runs in vocabulary
        chunks fused with the log-softmax (``F.linear_token_logprobs``). Training's choice."""
        h = self.hidden(input_ids, positions=positions, segment_ids=segment_ids)
        if self.head_weight is None:
            return F.token_logprobs(self.lm_head(h), labels)
        return F.linear_token_logprobs(h, self.head_weight, labels)

    def loss(self, input_ids, labels, positions=None, segment_ids=None):
        """Mean next-token cross-entropy over the counted labels (``F.linear_cross_entropy``):
        equal to ``F.cross_entropy(self(input_ids), labels)``, at a fraction of its memory."""
        h = self.hidden(input_ids, positions=positions, segment_ids=segment_ids)
        if self.head_weight is None:
            return F.cross_entropy(self.lm_head(h), labels)
        return F.linear_cross_entropy(h, self.head_weight, labels)

    def gradient_checkpointing_enable(self, blocks: int | None = None) -> None:
        """Keep only each block's input during a training forward and recompute the block in
        backward (minift/autograd/checkpointing.py): activation memory drops from every block's
        activations to one block's, for one extra forward per block. Generation (a KV cache, or
        ``no_grad``) is unaffected. Transformers' name for the same switch.

        ``blocks``: how many blocks, counted from the bottom (None: all of them). Between none
        and all, memory and step time move linearly, one block's activations against one
        block's forward. The bottom ones, not ones spread evenly, because backward reaches them
        last: by the time it recomputes one, the blocks above have freed their activations, so
        the recompute lands when the graph holds least. A block higher up would be recomputed
        while the full activations of the plain blocks below it still exist. (Frozen bottom
        blocks, ``freeze``/``last``, record nothing: checkpointing them saves nothing.)"""
        n_layers = len(self.model.layers)
        if blocks is None:
            blocks = n_layers
        if isinstance(blocks, bool) or not isinstance(blocks, int) or not 0 <= blocks <= n_layers:
            raise ValueError(f"gradient_checkpointing_enable(blocks={blocks!r}) (minift/models/llama.py): the "
                             f"model has {n_layers} blocks; pass a count in 0..{n_layers}, or None for all")
        self.model.checkpointed_blocks = blocks

    def gradient_checkpointing_disable(self) -> None:
        self.model.checkpointed_blocks = 0

    def generate(self, input_ids, max_new_tokens: int, **sampling):
        """Continue each row of ``input_ids``; see ``minift.models.generate.generate``."""
        from minift.models.generate import generate  # noqa: PLC0415 - keeps this file model-only

        return generate(self, input_ids, max_new_tokens, **sampling)
