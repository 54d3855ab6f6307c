"""Batched generation where every row may use a different LoRA adapter (or none).

One batch, step by step:

1. ``AdapterSlots.acquire`` puts each row's adapter in a device slot -> slot index per row.
2. Prompts of different lengths are LEFT-padded to one width, so every row's last token sits in
   the last column and one forward gives every row its next-token logits. ``attention_mask``
   hides the pad keys; ``positions`` restart at 0 on each row's first real token, so RoPE uses
   the same angles as for the request alone. (RoPE scores depend only on position differences,
   so a shifted row would be right in exact arithmetic too; equal angles avoid the rounding and
   keep every position inside the range the model was trained on.)
3. Prefill the batched ``KVCache`` (row b of the cache is request b's cache), then decode one
   token per row per step. Each row samples with its own temperature, top-p and seeded
   generator, so its text does not depend on which other requests share the batch.
4. A row that emits eos, reaches its own ``max_tokens``, or is ended by its request's
   ``on_token`` (a stop string, a client gone) leaves the batch: its cache row, mask row and
   slot index are dropped, and later steps cost only the rows still running.
5. A row that fails (non-finite logits from an overflowing adapter, a sampling or callback
   error) ends alone with ``finish_reason="error"``; the other rows go on. If the batched
   forward itself fails, no row can be blamed and every live row ends; ``generate`` then runs
   each failed row that had produced no token yet again alone, so a request that breaks the
   forward fails by itself.

Batches that cannot run together are split by ``plan_batches`` (the stated policy below).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy

from minift.autograd import no_grad
from minift.backend import to_numpy, xp
from minift.models.generate import choose_next
from minift.models.llama import KVCache, LlamaForCausalLM
from minift.nn import quantize_model
from minift.serve.library import Adapter, AdapterLibrary, every_projection
from minift.serve.multi_lora import add_multi_lora, set_batch_slots
from minift.serve.slots import AdapterSlots


@dataclass
class Request:
    """One completion request in token ids; ``adapter=None`` runs the base model.

    ``on_token(token) -> bool`` is called (on the generating thread) with each new token as it
    is chosen, which is what lets a server stream; returning True ends the row there with
    ``finish_reason="stop"``.
    """

    prompt: list[int]
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float | None = None
    seed: int = 0
    on_token: Callable[[int], bool] | None = field(default=None, repr=False, compare=False)
    top_logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k likeliest


@dataclass
class Completion:
    """The new tokens of one request; ``logits`` (n_tokens, V) only when asked for (tests)."""

    tokens: list[int]
    finish_reason: str  # "stop": eos or on_token said so; "length": max_tokens; "error": see error
    prompt_tokens: int
    logits: numpy.ndarray | None = None
    error: str | None = None  # why the row failed, when finish_reason is "error"
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked (top_logprobs)


MAX_TOP_LOGPROBS = 20  # OpenAI's limit for the most likely alternatives reported per token


@dataclass
class TokenLogprob:
    """log p(token) under the model's own distribution (softmax of the raw logits, before any
    temperature or top-p), and the ``top`` most likely tokens as (id, log p), likeliest first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprob(logits: numpy.ndarray, token: int, k: int) -> TokenLogprob:
    """The ``TokenLogprob`` of ``token`` from one row of logits (V,): a log-softmax in float64."""
    z = logits.astype(numpy.float64)
    z = z - z.max()
    logp = z - numpy.log(numpy.exp(z).sum())
    return TokenLogprob(token, float(logp[token]), [(int(i), float(logp[i])) for i in top_k(logp, k)])


def top_k(scores: numpy.ndarray, k: int) -> numpy.ndarray:
    """The ids of the ``k`` largest of ``scores`` (V,), largest first; ties: the smaller id first.

    A full sort costs O(V log V) per token, and a logprobs request asks this at every token of
    every row; ``argpartition`` finds the k largest in O(V) and only those k are sorted. The
    partition cuts ties at its boundary arbitrarily, so every score equal to the k-th largest is
    taken and the cut is made after sorting by (score, id): the same ids a stable full sort gives.
    """
    if k <= 0:
        return numpy.empty(0, dtype=numpy.int64)
    if k >= len(scores):
        return numpy.argsort(-scores, kind="stable")
    kth = scores[numpy.argpartition(-scores, k - 1)[k - 1]]  # the k-th largest value
    candidates = numpy.flatnonzero(scores >= kth)  # ascending ids: the stable sort keeps them so
    return candidates[numpy.argsort(-scores[candidates], kind="stable")][:k]


def plan_batches(requests: list[Request], n_slots: int, max_batch: int, context: int) -> list[list[int]]:
    """Split ``requests`` into batches that can run: the policy, in one place.

    Rows are grouped by adapter (adapters in order of first arrival, arrival order within one),
    then cut greedily: a batch holds at most ``max_batch`` rows and at most ``n_slots`` distinct
    adapters (base rows need no slot), and its padded width plus its largest ``max_tokens``
    must fit the context. Grouping puts all rows of one adapter in as few batches as possible,
    so an adapter is loaded once per window rather than once per batch it is scattered over.
    Returns lists of indices into ``requests``.
    """
    first_seen: dict = {}
    for r in requests:
        first_seen.setdefault(r.adapter, len(first_seen))
    order = sorted(range(len(requests)), key=lambda i: first_seen[requests[i].adapter])
    batches: list[list[int]] = []
    rows: list[int] = []
    adapters: set[str] = set()
    for i in order:
        r = requests[i]
        grown = adapters | ({r.adapter} - {None})
        width = max(len(requests[j].prompt) for j in [*rows, i])
        new = max(requests[j].max_tokens for j in [*rows, i])
        if rows and (len(rows) == max_batch or len(grown) > n_slots or width + new > context):
            batches.append(rows)
            rows, grown = [], {r.adapter} - {None}
        rows.append(i)
        adapters = grown
    return batches + [rows] if rows else batches


def left_pad(prompts: list[list[int]]):
    """-> ids (B, W), attention mask (B, W), positions (B, W) for prompts padded on the left."""
    width = max(len(p) for p in prompts)
    ids = numpy.zeros((len(prompts), width), dtype=numpy.int64)
    mask = numpy.zeros((len(prompts), width), dtype=bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = True
    positions = numpy.maximum(numpy.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


MAX_RECORDED = 1000  # a server runs for weeks: its statistics must not grow without end


class ServingEngine:
    """A base model, a library of adapters, device slots for them, and batched generation.

    Construction is model surgery: the layers any library adapter targets become
    ``MultiLoraLinear`` (in place, as ``get_peft_model`` does for training). With ``wrap_all``
    every projection of every block is wrapped instead, so that adapters loaded later
    (``add_adapter``, at runtime) find their layers ready; ``max_rank`` then sizes the slots
    for the largest rank such an adapter may have (vLLM's ``--max-lora-rank``).
    """

    def __init__(self, model: LlamaForCausalLM, library: AdapterLibrary, n_slots: int = 4,
                 max_batch: int = 16, eos_id: int | None = None, max_rank: int | None = None,
                 wrap_all: bool = False):
        if library.model is not model:
            raise ValueError("the adapter library was checked against a different model")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
            raise ValueError(f"max_rank (--max-lora-rank) must be a positive integer, got {max_rank!r}")
        self.model, self.library = model.eval(), library
        targets = every_projection(model) if wrap_all else library.target_modules()
        self.layers = add_multi_lora(model, targets)
        self.slots = AdapterSlots(library, self.layers, n_slots, max_rank)
        self.max_batch, self.eos_id = max_batch, eos_id
        self.batch_sizes: list[int] = []  # rows of the last MAX_RECORDED batches, in order (stats, tests)

    @property
    def context(self) -> int:
        return self.model.config.max_seq_len

    def validate(self, r: Request) -> None:
        """Raise ``KeyError`` (unknown adapter) or ``ValueError`` (anything else wrong), before
        anything runs: one bad request must not fail the batch it would have joined."""
        if r.adapter is not None:
            self.library[r.adapter]  # noqa: B018 - raises KeyError naming the loaded adapters
        if not r.prompt:
            raise ValueError("the prompt is empty; it needs at least one token")
        vocab = self.model.config.vocab_size
        if min(r.prompt) < 0 or max(r.prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {min(r.prompt)}..{max(r.prompt)}")
        if not isinstance(r.max_tokens, int) or r.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {r.max_tokens!r}")
        if len(r.prompt) + r.max_tokens > self.context:
            raise ValueError(f"the prompt has {len(r.prompt)} tokens and max_tokens is {r.max_tokens}: "
                             f"together more than the context of {self.context} tokens")
        if not math.isfinite(r.temperature) or r.temperature < 0:  # NaN < 0 is False: test it apart
            raise ValueError(f"temperature must be a finite number >= 0, got {r.temperature}")
        if r.top_p is not None and not 0 < r.top_p <= 1:  # False for NaN, so NaN is refused
            raise ValueError(f"top_p must be in (0, 1], got {r.top_p}")
        if not isinstance(r.seed, int) or r.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {r.seed!r}")
        if r.top_logprobs is not None and not (isinstance(r.top_logprobs, int)
                                               and 0 <= r.top_logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {r.top_logprobs!r}")

    def generate(self, requests: list[Request], record_logits: bool = False) -> list[Completion]:
        """Complete every request; batches come from ``plan_batches``, results in request order."""
        for r in requests:
            self.validate(r)
        results: list[Completion | None] = [None] * len(requests)
        for batch in plan_batches(requests, self.slots.n_slots, self.max_batch, self.context):
            for i, completion in zip(batch, self._run_batch([requests[i] for i in batch], record_logits)):
                failed_at_once = completion.finish_reason == "error" and not completion.tokens
                results[i] = (self._run_batch([requests[i]], record_logits)[0]  # alone: blame it alone
                              if failed_at_once and len(batch) > 1 else completion)
        return results

    def _run_batch(self, requests: list[Request], record_logits: bool) -> list[Completion]:
        """Run one batch to its end (static batching): nobody joins, finished rows leave."""
        batch = Batch(requests, self.model, self.slots.acquire([r.adapter for r in requests]))
        self.record_batch_size(len(requests))
        rows = list(batch.rows)
        while batch.rows:
            try:
                logits = batch.forward(self.model, self.layers.values())
            except Exception as exc:  # the batched forward failed: every live row ends; generate() retries
                batch.fail(f"the batched forward failed: {type(exc).__name__}: {exc}")
                break
            batch.advance(logits, self.eos_id, record_logits)
        return [row.completion(record_logits) for row in rows]

    def record_batch_size(self, rows: int) -> None:
        self.batch_sizes.append(rows)
        del self.batch_sizes[:-MAX_RECORDED]

    def add_adapter(self, name: str, folder) -> Adapter:
        """Load the adapter in ``folder`` as ``name`` while serving: checked in full against the
        base (``AdapterLibrary``) and against the slots (rank, wrapped layers) before it joins.
        Only the thread that runs the batches may call it (the server's ``run_between_steps``)."""
        return self.library.add(name, folder, check=self.slots.check_fits)

    def remove_adapter(self, name: str) -> None:
        """Unload ``name``: new requests for it are refused; rows already running with it finish
        with its weights (``AdapterSlots.forget``). The batch thread only, as ``add_adapter``."""
        self.library.remove(name)
        self.slots.forget(name)


def build_engine(model: LlamaForCausalLM, adapters: dict, n_slots: int = 4, max_batch: int = 16,
                 eos_id: int | None = None, quantize: str | None = None, wrap_all: bool = False,
                 max_rank: int | None = None) -> ServingEngine:
    """Load every ``{name: folder}`` into a library (checked against ``model``) and wrap the model.

    ``quantize="nf4"`` first stores the base's block projections in NF4 as ``minift finetune
    --method qlora`` does (``quantize_model``): adapters are then served over the 4-bit base,
    which is the base a QLoRA adapter was trained against."""
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    if quantize == "nf4":
        quantize_model(model)
    library = AdapterLibrary(model)
    for name, folder in adapters.items():
        library.add(name, folder)
    return ServingEngine(model, library, n_slots=n_slots, max_batch=max_batch, eos_id=eos_id,
                         max_rank=max_rank, wrap_all=wrap_all)


@dataclass(eq=False)
class Row:
    """One request's progress: its sampler, its new tokens (and logits), and how it ended."""

    request: Request
    rng: numpy.random.Generator | None  # None only for a row that failed before it decoded
    tokens: list[int] = field(default_factory=list)
    logits: list = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None

    @classmethod
    def failed(cls, request: Request, message: str) -> Row:
        """A row that ended with ``message`` before it had a batch (its adapter could not get a
        slot, or its batch could not be built): no sampler, no tokens, ``finish="error"``."""
        return cls(request, None, finish="error", error=message)

    @property
    def remaining(self) -> int:
        return self.request.max_tokens - len(self.tokens)

    def step(self, logits: numpy.ndarray, eos_id: int | None, record_logits: bool) -> str | None:
        """Choose the next token from this row's logits (V,); -> why the row ends now, or None."""
        r = self.request
        if not numpy.isfinite(logits).all():
            raise FloatingPointError("the model produced non-finite logits for this request "
                                     "(an adapter whose weights overflow in the model's dtype?)")
        token = int(choose_next(logits[None], r.temperature, None, r.top_p, self.rng)[0])
        self.tokens.append(token)
        if record_logits:
            self.logits.append(logits)
        if r.top_logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, r.top_logprobs))
        if token == eos_id or (r.on_token is not None and r.on_token(token)):
            return "stop"
        return "length" if self.remaining == 0 else None

    def completion(self, record_logits: bool) -> Completion:
        return Completion(self.tokens, self.finish, len(self.request.prompt),
                          numpy.array(self.logits) if record_logits else None, self.error,
                          None if self.request.top_logprobs is None else self.logprobs)


class Batch:
    """Rows that decode together: row b of the KV cache, mask and inputs belongs to ``rows[b]``.

    Prompts are left-padded, so every row's newest token sits in the last column and one forward
    gives every row its next-token logits. Between steps ``mask`` has one column more than the
    cache holds: the column of the token each row feeds next. Positions are per row, so a row
    gets the same RoPE angles whatever it is batched with.
    """

    def __init__(self, requests: list[Request], model: LlamaForCausalLM, slot_idx):
        self.rows = [Row(r, numpy.random.default_rng(r.seed)) for r in requests]
        self.ids, self.mask, self.positions = left_pad([r.prompt for r in requests])  # the prefill
        width, longest = self.ids.shape[1], max(r.max_tokens for r in requests)
        self.cache = KVCache(model.config, len(requests), width + longest, model.dtype)
        self.slot_idx = numpy.asarray(slot_idx, dtype=numpy.int64)
        self.next_pos = numpy.array([len(r.prompt) for r in requests])

    def forward(self, model: LlamaForCausalLM, layers) -> numpy.ndarray:
        """One forward of every row with its adapter: -> the next-token logits (rows, V)."""
        set_batch_slots(layers, self.slot_idx)
        try:
            with no_grad():
                logits = model(self.ids, cache=self.cache, attention_mask=self.mask,
                               positions=self.positions, last_only=True)
        finally:
            set_batch_slots(layers, None)
        return to_numpy(logits.data[:, -1])

    def advance(self, logits: numpy.ndarray, eos_id: int | None, record_logits: bool) -> list[Row]:
        """Pick each row's next token, set up the next step's inputs; -> the rows that ended
        (they leave the batch at once: later steps cost only the rows still running)."""
        for row, row_logits in zip(self.rows, logits):
            try:
                row.finish = row.step(row_logits, eos_id, record_logits)
            except Exception as exc:  # this row's failure is this row's alone
                row.finish, row.error = "error", f"{type(exc).__name__}: {exc}"
        ended = [row for row in self.rows if row.finish is not None]
        self._keep(numpy.array([row.finish is None for row in self.rows], dtype=bool))
        self.ids = numpy.array([row.tokens[-1:] for row in self.rows], dtype=numpy.int64).reshape(-1, 1)
        self.positions = self.next_pos[:, None]
        self.next_pos = self.next_pos + 1
        self.mask = numpy.concatenate([self.mask, numpy.ones((len(self.rows), 1), dtype=bool)], axis=1)
        return ended

    def fail(self, message: str) -> list[Row]:
        """End every row with ``message`` (a forward failed and no single row can be blamed)."""
        for row in self.rows:
            row.finish, row.error = "error", message
        ended, self.rows = self.rows, []
        return ended

    def _keep(self, keep: numpy.ndarray) -> None:
        """Drop the rows where ``keep`` is False from every per-row array and the cache."""
        if keep.all():
            return
        self.rows = [row for row, k in zip(self.rows, keep) if k]
        self.mask, self.slot_idx, self.next_pos = self.mask[keep], self.slot_idx[keep], self.next_pos[keep]
        rows = xp.asarray(keep)
        self.cache.keys = [k[rows] for k in self.cache.keys]
        self.cache.values = [v[rows] for v in self.cache.values]

    def join(self, other: Batch, model: LlamaForCausalLM) -> None:
        """Add ``other``'s rows (both batches just advanced) to this batch: continuous batching.

        The two caches are right-aligned in one new buffer, as if every row had been left-padded
        together: each row's keys end in the same column, and the mask hides the columns before
        a row's first token. Leading columns no row uses any more (their rows have left) are
        dropped on the way. The copy costs what one decode step's attention reads anyway.
        """
        parts = [self, other]
        used = [_first_used_column(b.mask) for b in parts]
        width = max(b.mask.shape[1] - u for b, u in zip(parts, used))  # mask columns, incl. the pending one
        rows = self.rows + other.rows
        cache = KVCache(model.config, len(rows), width - 1 + max(row.remaining for row in rows), model.dtype)
        mask = numpy.zeros((len(rows), width), dtype=bool)
        start = 0
        for b, u in zip(parts, used):
            n, kept = len(b.rows), b.mask.shape[1] - u  # columns of b still in use
            mask[start:start + n, width - kept:] = b.mask[:, u:]
            into_rows, into_columns = slice(start, start + n), slice(width - kept, width - 1)
            for new, old in zip(cache.keys + cache.values, b.cache.keys + b.cache.values):
                new[into_rows, :, into_columns] = old[:, :, u:b.cache.length]
            start += n
        cache.length = width - 1
        self.rows, self.cache, self.mask = rows, cache, mask
        self.ids = numpy.concatenate([self.ids, other.ids])
        self.positions = numpy.concatenate([self.positions, other.positions])
        self.slot_idx = numpy.concatenate([self.slot_idx, other.slot_idx])
        self.next_pos = numpy.concatenate([self.next_pos, other.next_pos])


def _first_used_column(mask: numpy.ndarray) -> int:
    """The first column of ``mask`` that some row still attends to (the pending column always is)."""
    return int(numpy.argmax(mask.any(axis=0)))
