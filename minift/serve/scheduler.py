"""Continuous batching: requests join the running batch at the next step and leave when done.

Static batching (``ServingEngine.generate``) runs a batch to its end: a request that arrives
one step after a batch started waits for the whole batch, and the rows that finished early
leave holes nobody fills. Iteration-level scheduling (Orca, Yu et al. 2022; vLLM, Kwon et al.
2023; lecture 004) decides again at every decode step:

1. **Admit.** Waiting requests join in arrival order while the batch has room: at most
   ``max_batch`` rows and at most ``n_slots`` distinct adapters, counting the running rows'
   adapters, which stay pinned in their slots. The first request that does not fit waits, and
   so does everything behind it: first come, first served, so no request starves.
2. **Prefill** the newcomers together (left-padded, one forward), which gives each its first
   token, and **join** their KV caches to the running batch (``Batch.join``).
3. **Decode** one token for every row, each with its own adapter (BGMV), positions and sampler.
4. **Retire** the rows that ended (eos, ``max_tokens``, a stop string, a client gone, an error):
   they leave at once and their requests are answered.

Every row gets the tokens and logits it would get alone (up to float rounding), because
padding is masked and positions and samplers are per row (tests/serve/test_continuous_batching.py).

What this does not do: prefill and decode run as separate forwards (Orca mixes them in one,
vLLM's chunked prefill splits long prompts), and each row's cache is a slice of one rectangular
buffer, padded to the longest row. A paged cache (PagedAttention) removes that padding; see
docs/serving.md.
"""

from __future__ import annotations

from collections import deque

from minift.serve.engine import Batch, Completion, Request, Row, ServingEngine


class Scheduler:
    """The waiting queue and the running batch of one ``ServingEngine``; ``step()`` drives them.

    Not thread-safe: one thread (the server's batcher) calls ``add`` and ``step``.
    """

    def __init__(self, engine: ServingEngine, record_logits: bool = False):
        self.engine, self.record_logits = engine, record_logits
        self.waiting: deque[Request] = deque()
        self.running: Batch | None = None

    @property
    def busy(self) -> bool:
        """True while a request waits or a row is running."""
        return bool(self.waiting) or bool(self.running and self.running.rows)

    def add(self, request: Request) -> None:
        """Queue ``request``; it is checked now (``KeyError``/``ValueError``), so that a bad
        request is refused before it can reach a batch."""
        self.engine.validate(request)
        self.waiting.append(request)

    def step(self) -> list[tuple[Request, Completion]]:
        """Admit what fits, then one decode step; -> the requests that ended, with their results."""
        ended = self._admit()
        batch = self.running
        if batch is not None and batch.rows:
            self.engine.record_batch_size(len(batch.rows))
            try:
                logits = batch.forward(self.engine.model, self.engine.layers.values())
            except Exception as exc:  # no single row can be blamed: every running row ends
                ended += batch.fail(f"the batched forward failed: {type(exc).__name__}: {exc}")
            else:
                ended += batch.advance(logits, self.engine.eos_id, self.record_logits)
        return [(row.request, row.completion(self.record_logits)) for row in ended]

    def _admit(self) -> list[Row]:
        """Prefill the requests that may join now and join them to the running batch."""
        joining = self._take_joining()
        if not joining:
            return []
        newcomers, ended = self._prefill(joining, self._running_adapters())
        if newcomers is not None and newcomers.rows:
            if self.running is None or not self.running.rows:
                self.running = newcomers
            else:
                self.running.join(newcomers, self.engine.model)
        return ended

    def _running_adapters(self) -> set[str]:
        rows = self.running.rows if self.running is not None else []
        return {row.request.adapter for row in rows} - {None}

    def _take_joining(self) -> list[Request]:
        """Waiting requests that fit, first come first served (see the module docstring)."""
        room = self.engine.max_batch - (len(self.running.rows) if self.running is not None else 0)
        adapters = self._running_adapters()
        joining: list[Request] = []
        while self.waiting and len(joining) < room:
            wanted = adapters | ({self.waiting[0].adapter} - {None})
            if len(wanted) > self.engine.slots.n_slots:
                break
            adapters = wanted
            joining.append(self.waiting.popleft())
        return joining

    def _prefill(self, requests: list[Request], pinned: set[str]) -> tuple[Batch | None, list[Row]]:
        """One forward over the newcomers' prompts. If it fails, each newcomer is prefilled
        alone, so that a request which breaks the forward fails by itself."""
        engine = self.engine
        batch = None
        try:
            batch = Batch(requests, engine.model, engine.slots.acquire([r.adapter for r in requests], pinned))
            logits = batch.forward(engine.model, engine.layers.values())
        except Exception as exc:
            if len(requests) > 1:
                return self._prefill_alone(requests, pinned)
            message = f"the prefill failed: {type(exc).__name__}: {exc}"
            return None, [Row.failed(requests[0], message)] if batch is None else batch.fail(message)
        return batch, batch.advance(logits, engine.eos_id, self.record_logits)

    def _prefill_alone(self, requests: list[Request], pinned: set[str]) -> tuple[Batch | None, list[Row]]:
        joined: Batch | None = None
        ended: list[Row] = []
        for request in requests:
            alone, done = self._prefill([request], pinned)
            ended += done
            if alone is not None and alone.rows:
                pinned = pinned | {request.adapter} - {None}  # its slot must stay while it runs
                if joined is None:
                    joined = alone
                else:
                    joined.join(alone, self.engine.model)
        return joined, ended
