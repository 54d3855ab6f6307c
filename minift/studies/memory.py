"""The memory ledger: where the bytes of a fine-tuning step go, predicted and measured.

Lecture 003's table (a 7B model: full fine-tuning 84 GB, LoRA 16 GB, QLoRA 6 GB) comes from a
handful of per-parameter and per-token costs. This module writes them down once and uses them
twice: ``predict`` computes every row from the model config, the method and the batch shape;
``measure`` runs a real training step under ``tracemalloc`` (NumPy reports every array buffer to
it) and reads the same rows off the allocator. ``ledger`` puts the two side by side;
``compare_checkpointing`` measures a step twice, without and with gradient checkpointing, so
what checkpointing saves is measured, not only projected.

The rows (bytes):

    weights       fp32 parameters; for QLoRA also NF4 codes (1/2 byte per weight) and their
                  quantization state (absmax codes, absmax2, offset: 0.127 bit per weight);
                  with a 16-bit base (``BASE_16BIT``) the frozen Linear weights and embedding at 2 B
    gradients     4 B per *trainable* parameter — frozen ones get none (docs/design.md, principle 2)
    optimizer     AdamW's m and v: 8 B per trainable parameter; with ``optimizer="adamw8bit"``
                  2 B of codes + 8 B of absmax per 256 (``state_nbytes_8bit``), 8 B below 4096 values
    activations   what the autograd graph keeps from the forward pass for the backward pass:
                  the arrays the recorded ops save (per token and block, below), including the
                  attention probabilities (H x T per token per block)
    peak          weights + optimizer + max(activations + the largest temporary of one op,
                  gradients + the AdamW update's temporaries)

With gradient checkpointing (``model.gradient_checkpointing_enable()``) the graph keeps only each
trained block's input until backward; the block being recomputed holds its own activations on
top of those, one block at a time, so they count in the peak (with the gradients that exist by then).
``gradient_checkpointing_enable(blocks=n)`` checkpoints only the bottom n blocks: the others keep
their activations, and backward frees them before it recomputes the first checkpointed block.

LoRA keeps fewer activations than full fine-tuning (a frozen linear layer saves no input: its
backward needs only W), and needs far less memory besides: no gradients and no optimizer state
for the frozen weights. QLoRA keeps LoRA's activations and shrinks the frozen weights 7.75x.

``projection`` applies the same formulas to a big model in mixed precision (bf16 weights and
gradients, fp32 master weights and Adam moments, gradient checkpointing) — the setting of
lecture 003's table; ``minift memory --params 7e9`` prints it with its assumptions.
"""

from __future__ import annotations

import copy
import math
import tracemalloc
from dataclasses import dataclass, replace

import numpy

from minift.autograd.nn_ops import CHUNK_ELEMENTS, vocab_chunk
from minift.data import DataLoader
from minift.models import ATTENTION_PROJECTIONS, BLOCK_PROJECTIONS, LlamaConfig
from minift.nn import Linear4bit, Module, cast_frozen
from minift.nn import base_dtype as storage_type
from minift.optim import state_nbytes_8bit
from minift.optim.adamw8bit import CHUNK_VALUES, SCRATCH_BYTES_PER_VALUE, build_bucket_tables
from minift.quant.nf4 import DOUBLE_QUANT_BLOCKSIZE, dynamic_lut
from minift.training import TrainConfig, Trainer, causal_lm_loss
from minift.training.methods import MethodOptions, prepare_model

ROWS = ("weights fp32", "weights nf4 codes", "weights nf4 state", "gradients", "optimizer state",
        "activations", "peak")
LEDGER_METHODS = ("full", "freeze", "last", "lora", "qlora")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Precision:
    """Bytes per number of each kind. minift trains in fp32 throughout; ``MIXED`` is the usual
    GPU setting lecture 003 assumes (bf16 model, fp32 master weights and Adam moments)."""

    weight: int = 4  # a stored (frozen or trainable) parameter
    frozen_linear: int = 4  # a frozen Linear weight: 2 with a 16-bit base (minift finetune --base-dtype bf16)
    frozen_embedding: int = 4  # the frozen embedding and head (one matrix when tied): 2 with a 16-bit base
    grad: int = 4
    master: int = 0  # an fp32 copy of each trainable parameter, kept by the optimizer
    moments: int = 8  # AdamW's m and v
    activation: int = 4
    checkpointing: bool = False  # keep only each block's input; recompute one block in backward
    checkpointed_blocks: int | None = None  # with checkpointing: the bottom this many (None: every block)


MINIFT = Precision()
MIXED = Precision(weight=2, frozen_linear=2, frozen_embedding=2, grad=2, master=4, moments=8, activation=2,
                  checkpointing=True)
#: minift with ``--base-dtype bf16|f16``: what ``cast_frozen`` (minift/nn/freeze.py) stores in 16
#: bits, the frozen block Linear weights and the frozen embedding (with SmolLM2's tied head; the
#: lookup widens only the gathered rows), at 2 bytes; everything that trains stays float32.
BASE_16BIT = Precision(frozen_linear=2, frozen_embedding=2)


def minift_precision(base_dtype: str = "float32", checkpointing: bool = False,
                     checkpointed_blocks: int | None = None) -> Precision:
    """minift's precision for one measured step: float32 throughout (``MINIFT``), or with the
    frozen base in 16 bits (``BASE_16BIT``) for ``base_dtype`` "bf16" or "f16" (both 2 bytes)."""
    return replace(MINIFT if base_dtype == "float32" else BASE_16BIT, checkpointing=checkpointing,
                   checkpointed_blocks=checkpointed_blocks)


# ---- counting parameters -------------------------------------------------------------------
def projection_shapes(c: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of the seven Linear layers of one block."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return {"q_proj": (q, c.dim), "k_proj": (kv, c.dim), "v_proj": (kv, c.dim), "o_proj": (c.dim, q),
            "gate_proj": (c.ffn_dim, c.dim), "up_proj": (c.ffn_dim, c.dim), "down_proj": (c.dim, c.ffn_dim)}


def _bias_count(c: LlamaConfig) -> int:
    shapes = projection_shapes(c)
    attention = sum(shapes[n][0] for n in ATTENTION_PROJECTIONS) if c.attention_bias else 0
    return attention + (sum(shapes[n][0] for n in MLP) if c.mlp_bias else 0)


def parameter_counts(c: LlamaConfig) -> dict[str, int]:
    """Parameters by kind: block Linear weights, biases, embedding (+ untied head), norms."""
    linear = sum(o * i for o, i in projection_shapes(c).values())
    return {"linear": c.n_layers * linear, "bias": c.n_layers * _bias_count(c),
            "embedding": c.vocab_size * c.dim * (1 if c.tie_embeddings else 2),
            "norms": (2 * c.n_layers + 1) * c.dim}


def lora_parameter_count(c: LlamaConfig, o: MethodOptions) -> int:
    """r (d_in + d_out) per adapted projection and block (lecture 003's count)."""
    shapes = projection_shapes(c)
    return c.n_layers * sum(o.lora_r * sum(shapes[t]) for t in o.lora_targets)


def _frozen_blocks(c: LlamaConfig, method: str, o: MethodOptions) -> int:
    if method == "freeze":
        return c.n_layers // 2 if o.layers is None else o.layers
    if method == "last":
        return c.n_layers - (1 if o.layers is None else o.layers)
    return 0


def trainable_count(c: LlamaConfig, method: str, o: MethodOptions) -> int:
    """Parameters that get a gradient and optimizer state under ``method``."""
    counts = parameter_counts(c)
    if method == "full":
        return sum(counts.values())
    if method in ("lora", "qlora"):
        return lora_parameter_count(c, o)
    per_block = (counts["linear"] + counts["bias"]) // c.n_layers + 2 * c.dim  # + its two norms
    blocks = c.n_layers - _frozen_blocks(c, method, o)
    head = 0 if c.tie_embeddings or method == "last" else c.vocab_size * c.dim  # an untied head
    return blocks * per_block + c.dim + head  # + the final norm


def trainable_sizes(c: LlamaConfig, method: str, o: MethodOptions) -> list[int]:
    """Values of each trainable tensor under ``method`` (they add up to ``trainable_count``):
    8-bit AdamW's state depends on each tensor's size, not only on their total."""
    shapes = projection_shapes(c)
    if method in ("lora", "qlora"):
        return c.n_layers * [n for t in o.lora_targets for n in (o.lora_r * shapes[t][1], shapes[t][0] * o.lora_r)]
    biases = ([shapes[n][0] for n in ATTENTION_PROJECTIONS if c.attention_bias]
              + [shapes[n][0] for n in MLP if c.mlp_bias])
    block = [o_ * i for o_, i in shapes.values()] + biases + [c.dim, c.dim]
    head = [c.vocab_size * c.dim] if not c.tie_embeddings and method != "last" else []
    embedding = [c.vocab_size * c.dim] if method == "full" else []
    return (c.n_layers - _frozen_blocks(c, method, o)) * block + embedding + head + [c.dim]


def optimizer_state_bytes(c: LlamaConfig, method: str, o: MethodOptions, p: Precision = MINIFT,
                          optimizer: str = "adamw") -> int:
    """The optimizer's bytes: ``p.master + p.moments`` per trainable parameter for AdamW; for
    ``adamw8bit`` the moments of each tensor as ``AdamW8bit`` stores them."""
    if optimizer == "adamw":
        return (p.master + p.moments) * trainable_count(c, method, o)
    return sum(p.master * n + state_nbytes_8bit(n) for n in trainable_sizes(c, method, o))


# ---- the rows --------------------------------------------------------------------------------
def nf4_state_bytes(n: int, blocksize: int) -> int:
    """Absmax codes (1 B per block) + absmax2 (4 B per 256 blocks) + offset (4 B) of one tensor."""
    blocks = n // blocksize
    return blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCKSIZE) + 4


def frozen_linear_count(c: LlamaConfig, method: str, o: MethodOptions) -> int:
    """Weights of the frozen float ``Linear`` layers of the blocks: what ``cast_frozen``
    (minift/nn/freeze.py) stores in 16 bits. All blocks under LoRA, none under QLoRA (they are
    NF4), the frozen ones otherwise. The embedding and an untied head are ``frozen_embedding_count``."""
    blocks = c.n_layers if method == "lora" else 0 if method == "qlora" else _frozen_blocks(c, method, o)
    return blocks * (parameter_counts(c)["linear"] // c.n_layers)


def frozen_embedding_count(c: LlamaConfig, method: str) -> int:
    """Numbers of the (V, C) matrices that are frozen, stored at ``Precision.frozen_embedding``
    bytes each: the token embedding under every method but full (a tied head is the same matrix,
    counted once), and an untied head where it is frozen (lora, qlora, last; ``trainable_count``)."""
    embedding = 0 if method == "full" else c.vocab_size * c.dim
    head_frozen = not c.tie_embeddings and method in ("lora", "qlora", "last")
    return embedding + (c.vocab_size * c.dim if head_frozen else 0)


def weight_bytes(c: LlamaConfig, method: str, o: MethodOptions, p: Precision = MINIFT) -> dict[str, int]:
    """Weights by storage type. QLoRA stores the block Linear weights in NF4 (embedding, norms,
    biases and the adapters stay in float); every other method stores all of them in float.
    The "weights fp32" row holds every float weight: the frozen Linear ones at ``p.frozen_linear``
    bytes each and the frozen embedding at ``p.frozen_embedding`` (2 each with a 16-bit base),
    the rest at ``p.weight``."""
    counts = parameter_counts(c)
    adapters = lora_parameter_count(c, o) if method in ("lora", "qlora") else 0
    narrowing = ((p.weight - p.frozen_linear) * frozen_linear_count(c, method, o)
                 + (p.weight - p.frozen_embedding) * frozen_embedding_count(c, method))  # what a 16-bit base saves
    if method != "qlora":
        return {"weights fp32": p.weight * (sum(counts.values()) + adapters) - narrowing, "weights nf4 codes": 0,
                "weights nf4 state": 0}
    floats = counts["bias"] + counts["embedding"] + counts["norms"] + adapters
    state = c.n_layers * sum(nf4_state_bytes(o_ * i, o.nf4_blocksize) for o_, i in projection_shapes(c).values())
    return {"weights fp32": p.weight * floats - narrowing, "weights nf4 codes": counts["linear"] // 2,
            "weights nf4 state": state}


def trained_linears(method: str, o: MethodOptions) -> tuple[str, ...]:
    """The projections of a recorded block whose weight (or adapter) gets a gradient."""
    if method in ("lora", "qlora"):
        return tuple(o.lora_targets)
    return BLOCK_PROJECTIONS


def block_activation_elements(c: LlamaConfig, seq: int, trained: tuple[str, ...], lora_r: int = 0) -> int:
    """Numbers one block keeps per token until backward has passed it: exactly the arrays its ops
    save (the graph links nodes, not tensors, so nothing else stays alive). With C = dim,
    Cq = heads x head_dim, Ckv = kv_heads x head_dim, F = ffn_dim, H = heads, T = seq:

        norms      each norm's input and its 1/rms: block input, residual sum   2 C + 2
        attention  q and k after RoPE, v                                        Cq + 2 Ckv
                   the softmax probabilities P                                  H T
        swiglu     gate and up                                                  2 F
        linears    the input of every linear whose weight or adapter trains (dW = g^T x
                   needs x): norm output (q, k, v), merged heads (o),
                   norm output (gate, up), swiglu output (down)               C, Cq, C, F
        LoRA       per adapter, A x and its scaled copy (B's input)             2 r

    A frozen linear keeps nothing: its backward needs only W, which is stored anyway.
    """
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    inputs = {("q_proj", "k_proj", "v_proj"): c.dim, ("o_proj",): q, ("gate_proj", "up_proj"): c.dim,
              ("down_proj",): c.ffn_dim}
    saved_inputs = sum(size for names, size in inputs.items() if set(names) & set(trained))
    lora = 2 * lora_r * len(trained) if lora_r else 0
    return 2 * c.dim + 2 + q + 2 * kv + c.n_heads * seq + 2 * c.ffn_dim + saved_inputs + lora


def activation_bytes(c: LlamaConfig, method: str, o: MethodOptions, batch: int, seq: int,
                     p: Precision = MINIFT) -> int:
    """Bytes the graph holds at the end of the forward pass (the loss computed); with
    checkpointing, each checkpointed block keeps only its input (``recompute_bytes`` is the
    rest), each plain one all its activations (``plain_block_bytes``)."""
    inputs = checkpointed_recorded_blocks(c, method, o, p) * c.dim
    # The head runs fused with the loss (F.linear_cross_entropy): no logits or probabilities are
    # kept, only dloss/dh (C), plus h and the logsumexp (C + 1) when the head's weight trains.
    head_trains = c.dim + 1 if method == "full" else 0
    head = c.dim + 1 + c.dim + head_trains  # final norm (input, 1/rms), dloss/dh, (h, logsumexp)
    rope = 2 * seq * c.head_dim  # cos and sin tables, shared by the layers
    return p.activation * (batch * seq * (inputs + head) + rope) + plain_block_bytes(c, method, o, batch, seq, p)


def checkpointed_recorded_blocks(c: LlamaConfig, method: str, o: MethodOptions, p: Precision = MINIFT) -> int:
    """The recorded blocks that checkpointing covers. The model checkpoints the bottom
    ``p.checkpointed_blocks`` (minift/models/llama.py says why the bottom); the frozen bottom
    blocks of freeze and last record nothing either way, so they do not count."""
    if not p.checkpointing:
        return 0
    n = c.n_layers if p.checkpointed_blocks is None else p.checkpointed_blocks
    if not 0 <= n <= c.n_layers:
        raise ValueError(f"Precision.checkpointed_blocks={n} (minift/studies/memory.py): the model has "
                         f"{c.n_layers} blocks; pass a count in 0..{c.n_layers}, or None for all")
    return max(0, n - _frozen_blocks(c, method, o))


def plain_block_bytes(c: LlamaConfig, method: str, o: MethodOptions, batch: int, seq: int,
                      p: Precision = MINIFT) -> int:
    """The activations of the recorded blocks that are not checkpointed. They sit above the
    checkpointed ones, so backward has freed them before it recomputes any block."""
    plain = c.n_layers - _frozen_blocks(c, method, o) - checkpointed_recorded_blocks(c, method, o, p)
    return p.activation * batch * seq * plain * _block_elements(c, method, o, seq)


def _block_elements(c: LlamaConfig, method: str, o: MethodOptions, seq: int) -> int:
    lora_r = o.lora_r if method in ("lora", "qlora") else 0
    return block_activation_elements(c, seq, trained_linears(method, o), lora_r)


def recompute_bytes(c: LlamaConfig, method: str, o: MethodOptions, batch: int, seq: int,
                    p: Precision = MINIFT) -> int:
    """With checkpointing, the activations of the one block that backward is recomputing: they
    exist only while its local backward runs, so they count in the peak, not in ``activations``."""
    if checkpointed_recorded_blocks(c, method, o, p) == 0:
        return 0
    return p.activation * batch * seq * _block_elements(c, method, o, seq)


def largest_temporary(c: LlamaConfig, method: str, batch: int, seq: int, p: Precision = MINIFT) -> int:
    """Bytes of the biggest scratch one op allocates on top of what the graph keeps: the SwiGLU
    backward (3 N x F), attention scores (3 B x H x T^2), one vocabulary chunk of the fused head
    and loss (about ``CHUNK_ELEMENTS`` logits) or, for QLoRA, dequantizing the largest NF4
    weight (W and the gathered levels: 8 B per weight in fp32)."""
    n = batch * seq
    head_chunk = n * vocab_chunk(n, c.vocab_size, CHUNK_ELEMENTS)
    candidates = [3 * n * c.ffn_dim, 3 * batch * c.n_heads * seq * seq, head_chunk]
    scratch = max(candidates) * p.activation
    if method == "qlora":
        largest = max(o_ * i for o_, i in projection_shapes(c).values())
        scratch = max(scratch, 2 * p.weight * largest)
    return scratch


def update_temporary(c: LlamaConfig, method: str, o: MethodOptions, optimizer: str = "adamw") -> int:
    """While all the gradients exist, the update adds about two fp32 arrays the size of the
    largest trainable parameter: clipping replaces each gradient by a scaled copy (the old one
    freed after), and AdamW writes its intermediates into one scratch array (``adamw_arithmetic``).
    Measured, not derived: with 8-bit AdamW, whose own scratch is only ``SCRATCH_BYTES_PER_VALUE``
    per value of one chunk, SmolLM2 still showed 1.9 embedding-sized arrays above the gradients,
    and the fp32 AdamW ledger stayed within 0.1 % of ``tracemalloc`` after the scratch change."""
    shapes = projection_shapes(c)
    if method in ("lora", "qlora"):
        largest = max(o.lora_r * max(shapes[t]) for t in o.lora_targets)
    else:
        largest = max(*(a * b for a, b in shapes.values()), c.vocab_size * c.dim if method == "full" else 0)
    chunk_scratch = SCRATCH_BYTES_PER_VALUE * min(largest, CHUNK_VALUES) if optimizer == "adamw8bit" else 0
    return 2 * 4 * largest + chunk_scratch


def predict(c: LlamaConfig, method: str, batch: int, seq: int, options: MethodOptions | None = None,
            precision: Precision = MINIFT, optimizer: str = "adamw") -> dict[str, int]:
    """Every row of the ledger, in bytes, from the config, the method, the batch shape and the
    optimizer (``TrainConfig.optimizer``)."""
    if method not in LEDGER_METHODS:
        raise ValueError(f"the memory ledger predicts methods {LEDGER_METHODS}, not {method!r}")
    o, p = options or MethodOptions(), precision
    rows = weight_bytes(c, method, o, p)
    trainable = trainable_count(c, method, o)
    rows["gradients"] = p.grad * trainable
    rows["optimizer state"] = optimizer_state_bytes(c, method, o, p, optimizer)
    rows["activations"] = activation_bytes(c, method, o, batch, seq, p)
    rows["peak"] = _peak(rows, largest_temporary(c, method, batch, seq, p), update_temporary(c, method, o, optimizer),
                         recompute_bytes(c, method, o, batch, seq, p), plain_block_bytes(c, method, o, batch, seq, p))
    return rows


def _peak(rows: dict[str, int], activation_scratch: int, update_scratch: int, recompute: int = 0,
          plain_blocks: int = 0) -> int:
    """Weights and optimizer state live throughout; on top, either the forward/backward (saved
    activations plus one op's scratch) or the update (all gradients plus its scratch).

    With checkpointing (``recompute`` > 0: one block's activations) the backward's memory no
    longer shrinks as it goes while the gradients grow: the first block is recomputed when
    nearly every gradient exists already, so the backward holds the larger of the kept inputs
    and the gradients, plus one block and one op's scratch. With only the bottom blocks
    checkpointed, backward first walks the plain blocks above them, holding at most the
    forward's activations, and recomputes only after their ``plain_blocks`` bytes are freed."""
    stored = sum(rows[r] for r in ROWS[:3]) + rows["optimizer state"]
    backward = rows["activations"]
    if recompute:
        backward = max(backward, max(rows["activations"] - plain_blocks, rows["gradients"]) + recompute)
    return stored + max(backward + activation_scratch, rows["gradients"] + update_scratch)


# ---- measuring a real step --------------------------------------------------------------------
def _token_batches(c: LlamaConfig, batch: int, seq: int, seed: int) -> DataLoader:
    rng = numpy.random.default_rng(seed)
    ids = rng.integers(0, c.vocab_size, (batch, seq + 1))
    examples = [{"input_ids": row[:-1], "labels": row[1:]} for row in ids]
    return DataLoader(examples, batch, shuffle=False, pad_id=0)


def measure(model: Module, method: str, batch: int, seq: int, options: MethodOptions | None = None,
            seed: int = 0, checkpointing: bool = False, base_dtype: str = "float32",
            optimizer: str = "adamw", checkpointed_blocks: int | None = None) -> dict[str, int]:
    """The ledger's rows read from ``tracemalloc`` during real ``Trainer`` steps on random tokens.

    A copy of ``model`` is prepared for ``method`` under tracing (weights = what that allocates),
    one step creates the optimizer state, and a second step is watched: activations when the
    loss is computed, gradients just before ``optimizer.step()``, and the peak of the step.
    The storage split of the weights is read from the arrays' ``nbytes``. ``checkpointing``
    turns on the prepared model's gradient checkpointing; ``base_dtype`` "bf16" or "f16" stores
    its frozen base in 16 bits as ``minift finetune --base-dtype`` does (``cast_frozen``, which
    refuses a method with no frozen float weight to cast: full, qlora).
    """
    c, o = model.config, options or MethodOptions()
    loader = _token_batches(c, batch, seq, seed)
    dynamic_lut()  # a shared table built once per process: not part of any model
    build_bucket_tables()  # likewise, 8-bit AdamW's
    storage_type(base_dtype)  # bf16's first use imports ml_dtypes, megabytes of modules: not part of a model
    seen: dict[str, int] = {}

    def current() -> int:
        return tracemalloc.get_traced_memory()[0]

    def loss_fn(m, b):
        value = causal_lm_loss(m, b)
        seen["forward"] = current()
        return value

    was_tracing = tracemalloc.is_tracing()  # e.g. python -X tracemalloc: leave it running after
    tracemalloc.start()
    try:
        start = current()
        prepared, _ = prepare_model(copy.deepcopy(model), method, o)
        cast_frozen(prepared, base_dtype)
        weights = current() - start
        if checkpointing:
            prepared.gradient_checkpointing_enable(checkpointed_blocks)
        trainer = Trainer(prepared, TrainConfig(max_steps=2, progress=False, plot=False, warmup_ratio=0.0,
                                                optimizer=optimizer), loader, loss_fn=loss_fn)
        step = trainer.optimizer.step

        def watched_step():
            seen["gradients"] = current()
            step()

        trainer.optimizer.step = watched_step
        before_first = current()
        trainer.train_step()
        steady = current()
        tracemalloc.reset_peak()
        trainer.train_step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not was_tracing:
            tracemalloc.stop()
    rows = _weights_by_storage(prepared, weights)
    rows["gradients"] = seen["gradients"] - steady
    rows["optimizer state"] = steady - before_first
    rows["activations"] = seen["forward"] - steady
    rows["peak"] = peak - start
    return rows


def _weights_by_storage(model: Module, measured: int) -> dict[str, int]:
    """Split the traced weight bytes by storage type; Python objects go to the fp32 row."""
    codes = state = 0
    for _, layer in model.named_modules():
        if isinstance(layer, Linear4bit):
            codes += int(layer.packed.nbytes)
            state += layer.quant_state.nbytes
    return {"weights fp32": measured - codes - state, "weights nf4 codes": codes, "weights nf4 state": state}


# ---- the table -------------------------------------------------------------------------------
def _mb(n: float) -> str:
    return f"{n / 2**20:10.2f}"


@dataclass
class Ledger:
    """Predicted and measured rows of one (model, method, batch, seq); printing gives the table."""

    method: str
    batch: int
    seq: int
    predicted: dict[str, int]
    measured: dict[str, int]
    checkpointing: bool = False
    base_dtype: str = "float32"
    optimizer: str = "adamw"
    checkpointed_blocks: int | None = None  # with checkpointing: the bottom this many (None: all)

    def error(self, row: str) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted[row] - self.measured[row]) / max(self.measured[row], 1)

    def rows_off(self, tolerance: float) -> list[str]:
        """The rows the prediction misses: off by ``tolerance`` or more (relative), or predicted
        nonzero where nothing was measured."""
        return [row for row in ROWS if (self.predicted[row] != 0 if self.measured[row] == 0
                                        else abs(self.error(row)) >= tolerance)]

    def __str__(self) -> str:
        some = "" if self.checkpointed_blocks is None else f" of {self.checkpointed_blocks} blocks"
        recompute = f", gradient checkpointing{some}" if self.checkpointing else ""
        base = "" if self.base_dtype == "float32" else f", frozen base in {self.base_dtype}"
        base += "" if self.optimizer == "adamw" else f", optimizer {self.optimizer}"
        lines = [f"memory ledger: method {self.method}{recompute}{base}, batch {self.batch} x {self.seq} tokens (MiB)",
                 f"{'':<20}{'predicted':>10}{'measured':>10}{'diff':>8}"]
        for row in ROWS:
            p, m = self.predicted[row], self.measured[row]
            diff = f"{100 * self.error(row):7.1f}%" if m else "       -"
            lines.append(f"{row:<20}{_mb(p)}{_mb(m)}{diff}")
        return "\n".join(lines)


def ledger(model: Module, method: str, batch: int, seq: int, options: MethodOptions | None = None,
           checkpointing: bool = False, base_dtype: str = "float32", optimizer: str = "adamw",
           checkpointed_blocks: int | None = None) -> Ledger:
    """Predict and measure the memory of one training step of ``model`` with ``method``
    (``base_dtype``: the frozen base's storage, as ``minift finetune --base-dtype``; ``optimizer``:
    ``TrainConfig.optimizer``, as ``--optim``; ``checkpointed_blocks``: with ``checkpointing``, how
    many bottom blocks, None for all, as ``--gradient-checkpointing N``)."""
    precision = minift_precision(base_dtype, checkpointing, checkpointed_blocks)
    predicted = predict(model.config, method, batch, seq, options, precision, optimizer)
    measured = measure(model, method, batch, seq, options, checkpointing=checkpointing, base_dtype=base_dtype,
                       optimizer=optimizer, checkpointed_blocks=checkpointed_blocks)
    return Ledger(method, batch, seq, predicted, measured, checkpointing, base_dtype, optimizer, checkpointed_blocks)


@dataclass
class CheckpointingComparison:
    """The same step measured (and predicted) twice, without and with gradient checkpointing:
    what checkpointing saves is read off the allocator, not only projected from the formulas."""

    plain: Ledger
    checkpointed: Ledger

    def ratio(self, row: str) -> float:
        """Measured bytes with checkpointing / without."""
        return self.checkpointed.measured[row] / max(self.plain.measured[row], 1)

    def __str__(self) -> str:
        p = self.plain
        base = "" if p.base_dtype == "float32" else f", frozen base in {p.base_dtype}"
        base += "" if p.optimizer == "adamw" else f", optimizer {p.optimizer}"
        blocks = self.checkpointed.checkpointed_blocks
        base += "" if blocks is None else f", the bottom {blocks} blocks checkpointed"
        lines = [f"memory ledger: method {p.method}{base}, batch {p.batch} x {p.seq} tokens, without and with "
                 "gradient checkpointing (MiB)",
                 f"{'':<20}{'plain':>20}{'checkpointed':>20}{'measured':>10}",
                 f"{'':<20}{'predicted':>10}{'measured':>10}{'predicted':>10}{'measured':>10}{'ratio':>10}"]
        for row in ROWS:
            ratio = f"{self.ratio(row):9.2f}x" if p.measured[row] else "         -"
            lines.append(f"{row:<20}{_mb(p.predicted[row])}{_mb(p.measured[row])}"
                         f"{_mb(self.checkpointed.predicted[row])}{_mb(self.checkpointed.measured[row])}{ratio}")
        return "\n".join(lines)


def compare_checkpointing(model: Module, method: str, batch: int, seq: int, options: MethodOptions | None = None,
                          base_dtype: str = "float32", optimizer: str = "adamw",
                          checkpointed_blocks: int | None = None) -> CheckpointingComparison:
    """``ledger`` of one step of ``model`` with ``method``, without and then with checkpointing
    (of the bottom ``checkpointed_blocks`` blocks; None: all)."""
    return CheckpointingComparison(ledger(model, method, batch, seq, options, False, base_dtype, optimizer),
                                   ledger(model, method, batch, seq, options, True, base_dtype, optimizer,
                                          checkpointed_blocks))


# ---- lecture 003's table at scale ----------------------------------------------------------------
def llama_shape(params: float, vocab_size: int = 32000, head_dim: int = 128) -> LlamaConfig:
    """A Llama-2-like shape for ``params`` parameters: per block 4 d^2 (attention) + 3 d * ffn
    (SwiGLU, ffn = 8/3 d rounded up to 256), i.e. about 12 d^2; depth L = d / 128 (Llama-2 7B
    and 13B: 4096/32 and 5120/40). Only the shape-dependent costs (activations, which layers
    are quantized, adapter sizes) use it; per-parameter costs use ``params`` itself."""
    layers = max(1, int((params / (12 * head_dim**2)) ** (1 / 3)))
    dim = head_dim * layers
    ffn = 256 * math.ceil(8 * dim / 3 / 256)
    return LlamaConfig(vocab_size=vocab_size, dim=dim, n_layers=layers, n_heads=layers, n_kv_heads=layers,
                       ffn_dim=ffn, max_seq_len=4096, tie_embeddings=False)


def projection(params: float, seq: int = 2048, batch: int = 1, lora_r: int = 8,
               precision: Precision = MIXED, optimizer: str = "adamw") -> dict[str, dict[str, int]]:
    """Rows for full, LoRA and QLoRA at ``params`` parameters, scaled from the ``llama_shape``
    prediction so that per-parameter rows are exactly ``params`` x bytes (``optimizer``:
    ``adamw8bit`` stores the moments in 8 bits, the fp32 master weights stay)."""
    shape = llama_shape(params)
    scale = params / sum(parameter_counts(shape).values())
    options = MethodOptions(lora_r=lora_r)
    table = {}
    for method in ("full", "lora", "qlora"):
        rows = predict(shape, method, batch, seq, options, precision, optimizer)
        per_parameter = set(ROWS[:3]) | ({"gradients", "optimizer state"} if method == "full" else set())
        rows = {r: round(v * scale) if r in per_parameter else v for r, v in rows.items()}
        rows["peak"] = _peak(rows, largest_temporary(shape, method, batch, seq, precision),
                             round(scale * update_temporary(shape, method, options, optimizer)),
                             recompute_bytes(shape, method, options, batch, seq, precision))
        table[method] = rows
    return table


LECTURE_003_GB = {"full": 84, "lora": 16, "qlora": 6}


def format_projection(params: float, seq: int = 2048, batch: int = 1, lora_r: int = 8,
                      optimizer: str = "adamw") -> str:
    """Lecture 003's memory table recomputed, with every assumption printed; with
    ``optimizer="adamw8bit"``, the same table with AdamW's moments in 8 bits."""
    shape = llama_shape(params)
    table = projection(params, seq, batch, lora_r, optimizer=optimizer)
    gb = 1e9
    moments = ("AdamW with fp32 master weights and fp32 m, v",
               "  (2 + 2 + 4 + 8 bytes per trained parameter; the 4 + 8 = 12 are lecture 003's 'optimizer states');")
    if optimizer == "adamw8bit":
        moments = ("AdamW8bit: fp32 master weights, m and v in 8 bits with an fp32 absmax per 256",
                   "  (2 + 2 + 4 + 2.03 bytes per trained parameter; lecture 003's column assumes fp32 m, v);")
    lines = [
        f"memory for fine-tuning a {params / 1e9:g}B-parameter model (GB = 1e9 bytes)",
        f"assumptions: bf16 weights and gradients; {moments[0]}",
        moments[1],
        f"  batch {batch} x {seq} tokens with gradient checkpointing (each block's input kept, one block",
        "  recomputed at a time); LoRA r=8 on q,k,v,o; QLoRA: block Linear weights in NF4 with",
        "  double quantization (4.127 bits), embedding and head in bf16;",
        f"  shape: Llama-2-like, {shape.n_layers} layers, d_model {shape.dim}, ffn {shape.ffn_dim}, "
        f"vocab {shape.vocab_size}.",
        f"{'method':<7}{'weights':>9}{'grads':>8}{'optim':>8}{'activ.':>8}{'total':>8}   lecture 003",
    ]
    for method, rows in table.items():
        weights = sum(rows[r] for r in ROWS[:3])
        full_note = " (= the optim column: 12 B/param)" if method == "full" and optimizer == "adamw" else ""
        lecture = f"{LECTURE_003_GB[method]} GB{full_note}"
        lines.append(f"{method:<7}{weights / gb:9.2f}{rows['gradients'] / gb:8.2f}{rows['optimizer state'] / gb:8.2f}"
                     f"{rows['activations'] / gb:8.2f}{rows['peak'] / gb:8.2f}   {lecture}")
    lines.append("total = weights + optim + max(activations + largest temporary, gradients)")
    return "\n".join(lines)
