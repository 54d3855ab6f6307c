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
from minift.serve.library import AdapterLibrary
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


@dataclass
class Completion:
    """The new tokens of one request; ``logits`` (n_tokens, V) only when asked for (tests)."""

    tokens: list[int]
    finish_reason: str  # "stop": eos or on_token said so; "length": max_tokens; "error": see error
    prompt_tokens: int
    logits: numpy.ndarray | None = None
    error: str | None = None  # why the row failed, when finish_reason is "error"


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


def _keep_rows(cache: KVCache, keep) -> None:
    """Drop finished rows from every layer's keys and values (the batch shrinks)."""
    keep = xp.asarray(keep)
    cache.keys = [k[keep] for k in cache.keys]
    cache.values = [v[keep] for v in cache.values]


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
    ``MultiLoraLinear`` (in place, as ``get_peft_model`` does for training).
    """

    def __init__(self, model: LlamaForCausalLM, library: AdapterLibrary, n_slots: int = 4,
                 max_batch: int = 16, eos_id: int | None = None, max_rank: int | None = None):
        if library.model is not model:
            raise ValueError("the adapter library was checked against a different model")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.model, self.library = model.eval(), library
        self.layers = add_multi_lora(model, library.target_modules())
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
        slot_idx = numpy.asarray(self.slots.acquire([r.adapter for r in requests]))
        self.batch_sizes.append(len(requests))
        del self.batch_sizes[:-MAX_RECORDED]
        batch = _Batch(requests, self.model, record_logits)
        try:
            with no_grad():
                while batch.live.size:
                    set_batch_slots(self.layers.values(), slot_idx[batch.live])
                    logits = self.model(batch.ids, cache=batch.cache, attention_mask=batch.mask,
                                        positions=batch.positions, last_only=True)
                    batch.advance(to_numpy(logits.data[:, -1]), self.eos_id)  # (b, V)
        except Exception as exc:  # the batched forward failed: every live row ends; generate() retries
            batch.fail_live(f"the batched forward failed: {type(exc).__name__}: {exc}")
        finally:
            set_batch_slots(self.layers.values(), None)
        return batch.completions()


def build_engine(model: LlamaForCausalLM, adapters: dict, n_slots: int = 4, max_batch: int = 16,
                 eos_id: int | None = None) -> ServingEngine:
    """Load every ``{name: folder}`` into a library (checked against ``model``) and wrap the model."""
    library = AdapterLibrary(model)
    for name, folder in adapters.items():
        library.add(name, folder)
    return ServingEngine(model, library, n_slots=n_slots, max_batch=max_batch, eos_id=eos_id)


class _Batch:
    """The running state of one batch: which requests are live, their cache, inputs and outputs."""

    def __init__(self, requests: list[Request], model: LlamaForCausalLM, record_logits: bool):
        self.requests, self.record_logits = requests, record_logits
        self.ids, self.mask, self.positions = left_pad([r.prompt for r in requests])  # the prefill
        width, longest = self.ids.shape[1], max(r.max_tokens for r in requests)
        self.cache = KVCache(model.config, len(requests), width + longest, model.dtype)
        self.rngs = [numpy.random.default_rng(r.seed) for r in requests]
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.logits: list[list] = [[] for _ in requests]
        self.finish: list[str | None] = [None] * len(requests)
        self.errors: list[str | None] = [None] * len(requests)
        self.live = numpy.arange(len(requests))  # the request of each batch row
        self.next_pos = numpy.array([len(r.prompt) for r in requests])

    def advance(self, logits: numpy.ndarray, eos_id: int | None) -> None:
        """Pick each live row's next token, retire finished rows, set up the next step's inputs."""
        for row, i in enumerate(self.live):
            try:
                self.finish[i] = self._step_row(i, logits[row], eos_id)
            except Exception as exc:  # this row's failure is this row's alone
                self.finish[i], self.errors[i] = "error", f"{type(exc).__name__}: {exc}"
        keep = numpy.array([self.finish[i] is None for i in self.live])
        if not keep.all():
            _keep_rows(self.cache, keep)
        self.live = self.live[keep]
        self.ids = numpy.array([self.tokens[i][-1:] for i in self.live], dtype=numpy.int64).reshape(-1, 1)
        self.positions = self.next_pos[self.live][:, None]
        self.next_pos[self.live] += 1
        self.mask = numpy.concatenate([self.mask[keep], numpy.ones((self.live.size, 1), dtype=bool)], axis=1)

    def _step_row(self, i: int, logits: numpy.ndarray, eos_id: int | None) -> str | None:
        """Choose request ``i``'s next token from its logits (V,); -> why it ends now, or None."""
        r = self.requests[i]
        if not numpy.isfinite(logits).all():
            raise FloatingPointError("the model produced non-finite logits for this request "
                                     "(an adapter whose weights overflow in the model's dtype?)")
        token = int(choose_next(logits[None], r.temperature, None, r.top_p, self.rngs[i])[0])
        self.tokens[i].append(token)
        if self.record_logits:
            self.logits[i].append(logits)
        if token == eos_id or (r.on_token is not None and r.on_token(token)):
            return "stop"
        return "length" if len(self.tokens[i]) == r.max_tokens else None

    def fail_live(self, message: str) -> None:
        for i in self.live:
            self.finish[i], self.errors[i] = "error", message
        self.live = self.live[:0]

    def completions(self) -> list[Completion]:
        return [Completion(self.tokens[i], self.finish[i], len(r.prompt),
                           numpy.array(self.logits[i]) if self.record_logits else None, self.errors[i])
                for i, r in enumerate(self.requests)]
