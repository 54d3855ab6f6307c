"""OpenAI-compatible endpoints over the multi-LoRA engine, standard library only.

    POST /v1/completions        {"model", "prompt", "max_tokens": 16, "temperature": 1.0, "top_p",
                                 "seed", "stop", "stream", "stream_options": {"include_usage"},
                                 "logprobs": 0-5 (not streamed)}; a prompt is a string or token ids
    POST /v1/chat/completions   the same with "messages": [{"role", "content"}, ...] instead of
                                 "prompt", rendered with the tokenizer's chat template;
                                 "logprobs": true, "top_logprobs": 0-20
    GET  /v1/models[/{id}]      "base" and one "base:<adapter>" per loaded adapter
    GET  /v1/stats              recent batch sizes and the adapter cache's hits, misses, bytes
    POST /v1/load_lora_adapter   {"lora_name", "lora_path"}: load an adapter while serving, and
    POST /v1/unload_lora_adapter {"lora_name"}: unload one (vLLM's routes; only when the server
                                 was started with allow_runtime_lora, from folders under lora_root)

A model is "base", "base:<adapter>", or the bare adapter name (vLLM's way of naming one).

Each HTTP request is handled on its own thread (``ThreadingHTTPServer``), which checks every
field, tokenizes, and hands a ``Request`` to the one batcher thread; only the batcher touches the
model. Rows of one batch share one ``W x`` per layer whatever their adapters, what S-LoRA and
Punica are built around (lecture 004). Two batchers (``batching=``):

- ``"continuous"`` (the default; ``ContinuousBatcher`` over ``Scheduler``): a request joins the
  running batch at the next decode step and is answered the moment its row ends (Orca, vLLM).
- ``"static"`` (``Batcher``): wait a short window after the first arrival (or until ``max_batch``
  requests are in), then run everything that came to its end; a later request waits for it.

Each request's ``on_token`` feeds its ``StopText`` on the batcher thread as tokens are chosen;
a streaming handler sends the new text as Server-Sent Events (``data: {chunk}``, then
``data: [DONE]``), and a stop string ends the row in the batch at once.

Isolation: bad input never reaches the batcher (a 4xx naming the field, in OpenAI's error shape);
NaN and infinities are refused while the JSON is read; a prompt too long for the context is
refused by its character count before it is tokenized; a row that fails inside a batch ends
alone (``ServingEngine``). Sockets time out, so a client that stops sending cannot hold a thread.
"""

from __future__ import annotations

import json
import math
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import numpy

from minift.serve.engine import MAX_TOP_LOGPROBS, Completion, Request, ServingEngine
from minift.serve.library import AdapterError
from minift.serve.scheduler import Scheduler

BASE = "base"
MAX_BODY_BYTES = 1 << 20
LISTEN_BACKLOG = 128  # socketserver's default of 5 resets connections under a burst of clients
MAX_STOP_STRINGS = 4  # OpenAI's limit
ROLES = ("system", "user", "assistant")

SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user"}
FIELDS = {"completions": SAMPLING_FIELDS | {"prompt", "logprobs"},
          "chat": SAMPLING_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}}
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions' "logprobs"
#: fields accepted only at the value that changes nothing; any other value is a 400 naming them
NEUTRAL = {"n": (1,), "echo": (False,), "best_of": (1,),
           "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": (None, {}), "suffix": (None,),
           "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None,),
           "parallel_tool_calls": (None,), "response_format": (None, {"type": "text"})}


class HttpError(Exception):
    """A client error: HTTP ``status`` and a message that says what to fix."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class StopText:
    """A row's text as its tokens arrive, cut before the first stop string.

    The whole reply is decoded at each token (a token can be part of a character, see
    ``minift.models.generate.TextStream``). ``visible`` is what may be sent already: it holds
    back a trailing partial character and the last ``len(longest stop) - 1`` characters, which
    could still turn out to begin a stop string. ``text`` is the reply once it is over.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) - 1 for s in stops), default=0)
        self.ids: list[int] = []
        self.text = self.visible = ""
        self.stopped = False

    def push(self, token: int) -> bool:
        """Add one token; -> True when a stop string has now appeared (the row should end)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special=True)
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            self.text = self.visible = text[:min(cuts)]
            self.stopped = True
            return True
        safe = text.rstrip("\ufffd")
        self.text, self.visible = text, safe[:len(safe) - self.hold]
        return False


@dataclass
class Call:
    """One checked request: its route, the model as named, the engine request, how to answer."""

    route: str  # "completions" or "chat"
    model: str
    request: Request
    stops: list[str]
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Job:
    """One request waiting for the batcher. ``updates`` gets the visible text after each token
    and ``None`` once the job is done; a handler that loses its client sets ``cancelled``."""

    request: Request
    text: StopText
    updates: queue.Queue = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    result: Completion | None = None
    error: HttpError | None = None

    def on_token(self, token: int) -> bool:
        stop = self.text.push(token)
        self.updates.put(self.text.visible)
        return stop or self.cancelled

    def finish(self) -> None:
        self.done.set()
        self.updates.put(None)


class Batcher(threading.Thread):
    """Collects requests for ``window_s`` after the first one (or ``max_batch`` of them) and
    runs them as one call of ``engine.generate``, which splits by the slot policy if needed."""

    def __init__(self, engine: ServingEngine, window_s: float = 0.015):
        super().__init__(name="minift-batcher", daemon=True)
        self.engine, self.window_s = engine, window_s
        self.queue: queue.Queue[Job] = queue.Queue()
        self.commands: queue.Queue[tuple] = queue.Queue()  # (fn, Future): run_between_steps
        self.stopping = threading.Event()

    def run_between_steps(self, fn, timeout_s: float = 120.0):
        """Run ``fn()`` on the batcher thread between two steps and return its result (or raise
        its exception). Only the batcher touches the model and the adapter slots, so changing
        them (loading or unloading an adapter) waits for a moment when no forward is running."""
        future: Future = Future()
        self.commands.put((fn, future))
        return future.result(timeout=timeout_s)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self.commands.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except Exception as exc:  # the caller gets it; the batcher goes on
                future.set_exception(exc)

    def submit(self, request: Request, text: StopText) -> Job:
        job = Job(request, text)
        request.on_token = job.on_token
        self.queue.put(job)
        return job

    def run(self) -> None:
        while not self.stopping.is_set():
            self._run_commands()
            try:
                jobs = [self.queue.get(timeout=0.05)]
            except queue.Empty:
                continue
            self._collect(jobs)
            self._serve(jobs)
        self._fail_waiting(HttpError(503, "the server is shutting down"))

    def _collect(self, jobs: list[Job]) -> None:
        deadline = time.monotonic() + self.window_s
        while len(jobs) < self.engine.max_batch and (left := deadline - time.monotonic()) > 0:
            try:
                jobs.append(self.queue.get(timeout=left))
            except queue.Empty:
                break

    def _serve(self, jobs: list[Job]) -> None:
        jobs = [job for job in jobs if self._still_valid(job)]
        try:
            for job, completion in zip(jobs, self.engine.generate([j.request for j in jobs])):
                job.result = completion
                if completion.finish_reason == "error":  # this row failed alone (ServingEngine)
                    job.error = HttpError(500, f"generation failed for this request: {completion.error}")
        except Exception as exc:  # a bug outside any row: every waiting client gets a 500
            for job in jobs:
                job.error = HttpError(500, f"generation failed: {type(exc).__name__}: {exc}")
        finally:
            for job in jobs:
                job.finish()

    def _still_valid(self, job: Job) -> bool:
        """Check ``job`` again as the batcher takes it (its adapter may have been unloaded since
        the HTTP thread checked it); a job that fails now is answered alone."""
        try:
            self.engine.validate(job.request)
        except KeyError as exc:
            job.error = HttpError(404, str(exc.args[0]), "model")
        except ValueError as exc:
            job.error = HttpError(400, str(exc))
        else:
            return True
        job.finish()
        return False

    def _fail_waiting(self, error: HttpError) -> None:
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            job.error = error
            job.finish()



class ContinuousBatcher(Batcher):
    """Continuous batching (``Scheduler``): every waiting request joins the running batch at the
    next decode step, and a finished row is answered at once. Commands (``run_between_steps``)
    run between two steps, never inside one."""

    def run(self) -> None:
        scheduler, jobs = Scheduler(self.engine), {}  # jobs: id(request) -> Job, while it runs
        while not self.stopping.is_set():
            self._run_commands()
            self._admit(scheduler, jobs, wait=not scheduler.busy)
            if not scheduler.busy:
                continue
            try:
                ended = scheduler.step()
            except Exception as exc:  # a bug outside any row: every running client gets a 500
                for job in jobs.values():
                    job.error = HttpError(500, f"generation failed: {type(exc).__name__}: {exc}")
                    job.finish()
                scheduler, jobs = Scheduler(self.engine), {}
                continue
            for request, completion in ended:
                self._answer(jobs.pop(id(request)), completion)
        for job in jobs.values():
            job.error = HttpError(503, "the server is shutting down")
            job.finish()
        self._fail_waiting(HttpError(503, "the server is shutting down"))

    def _admit(self, scheduler: Scheduler, jobs: dict, wait: bool) -> None:
        """Move the submitted jobs into the scheduler (waiting briefly for one when idle)."""
        while True:
            try:
                job = self.queue.get(timeout=0.05) if wait else self.queue.get_nowait()
            except queue.Empty:
                return
            wait = False
            if self._still_valid(job):
                scheduler.add(job.request)
                jobs[id(job.request)] = job

    @staticmethod
    def _answer(job: Job, completion: Completion) -> None:
        job.result = completion
        if completion.finish_reason == "error":  # this row failed alone
            job.error = HttpError(500, f"generation failed for this request: {completion.error}")
        job.finish()


BATCHERS = {"continuous": ContinuousBatcher, "static": Batcher}

def read_json(raw: bytes):
    """The body as JSON, refusing what Python's reader accepts but JSON does not: NaN, Infinity,
    and numbers too large for a float (1e400 would become inf)."""
    def refuse(literal):
        raise HttpError(400, f"the body contains {literal}; every number must be finite")

    def finite(literal: str) -> float:
        value = float(literal)
        return value if math.isfinite(value) else refuse(literal)

    try:
        return json.loads(raw, parse_constant=refuse, parse_float=finite)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"the body is not valid JSON: {exc}") from None


def _number(body: dict, name: str, default, low: float, high: float, low_open: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HttpError(400, f"'{name}' must be a number, got {json.dumps(value)}", name)
    if not (low < value if low_open else low <= value) or not value <= high:  # NaN fails both
        raise HttpError(400, f"'{name}' must be in {'(' if low_open else '['}{low}, {high}], got {value}", name)
    return float(value)


def _integer(body: dict, name: str, default):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise HttpError(400, f"'{name}' must be an integer, got {json.dumps(value)}", name)
    return value


def _check_fields(body: dict, route: str) -> None:
    for name, value in body.items():
        if name in NEUTRAL and value not in NEUTRAL[name]:
            raise HttpError(400, f"'{name}' is not supported by this server; leave it out "
                                 f"(or send {json.dumps(NEUTRAL[name][-1])})", name)
        if name not in NEUTRAL and name not in FIELDS[route]:
            raise HttpError(400, f"unknown field '{name}'; this route takes {sorted(FIELDS[route])}", name)


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise HttpError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them, "
                             f"got {json.dumps(stop)}", "stop")
    return stops


def _top_logprobs(body: dict, route: str, stream: bool) -> int | None:
    """How many alternatives per token the client wants, or None for no log-probabilities.

    Completions: ``"logprobs": k`` (0-5). Chat: ``"logprobs": true`` and ``"top_logprobs": k``
    (0-20). Not with ``stream`` (refused: the streamed chunks carry text only).
    """
    wanted = body.get("logprobs")
    if route == "chat":
        if wanted is not None and not isinstance(wanted, bool):
            raise HttpError(400, f"'logprobs' must be true or false, got {json.dumps(wanted)}", "logprobs")
        top = body.get("top_logprobs")
        if top is not None and not wanted:
            raise HttpError(400, "'top_logprobs' needs \"logprobs\": true", "top_logprobs")
        k, name, high = (top or 0) if wanted else None, "top_logprobs", MAX_TOP_LOGPROBS
    else:
        k, name, high = wanted, "logprobs", MAX_COMPLETION_LOGPROBS
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= high:
        raise HttpError(400, f"'{name}' must be an integer in [0, {high}], got {json.dumps(k)}", name)
    if stream:
        raise HttpError(400, "log-probabilities are not streamed by this server; leave out 'logprobs' "
                             "or 'stream'", "logprobs")
    return k


def _by_text(top: list[tuple[int, float]], text) -> dict[str, float]:
    """{token text: log p}, likeliest first. Tokens that are parts of characters all decode to
    U+FFFD; where texts collide, the likeliest token's entry stands (the dict has fewer keys)."""
    alternatives: dict[str, float] = {}
    for token, logprob in top:
        alternatives.setdefault(text(token), logprob)
    return alternatives


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream or not isinstance(options, dict) or set(options) - {"include_usage"} \
            or not isinstance(options.get("include_usage", False), bool):
        raise HttpError(400, "'stream_options' takes only {\"include_usage\": true|false}, with stream=true",
                        "stream_options")
    return options.get("include_usage", False)


class CompletionService:
    """What the HTTP handler calls: JSON in, JSON (or chunks) out, ``HttpError`` for the client's
    mistakes."""

    def __init__(self, engine: ServingEngine, tokenizer, window_s: float, timeout_s: float,
                 lora_root: str | Path | None = None, batching: str = "continuous"):
        if batching not in BATCHERS:
            raise ValueError(f"batching must be one of {sorted(BATCHERS)}, got {batching!r}")
        self.engine, self.tokenizer, self.timeout_s = engine, tokenizer, timeout_s
        self.lora_root = None if lora_root is None else Path(lora_root).resolve()  # None: runtime LoRA off
        self.batcher = BATCHERS[batching](engine, window_s)
        # a token spans at most this many characters, so a longer text has more tokens than fit
        longest = max([getattr(tokenizer, "max_token_bytes", 1), *map(len, tokenizer.special_tokens)])
        self.max_prompt_chars = (engine.context - 1) * longest

    def models(self) -> dict:
        ids = [BASE] + [f"{BASE}:{name}" for name in self.engine.library.names()]
        return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "minift"} for i in ids]}

    def model(self, model: str) -> dict:
        self._adapter(model)
        return {"id": model, "object": "model", "owned_by": "minift"}

    def stats(self) -> dict:
        return {"batch_sizes": list(self.engine.batch_sizes), "adapter_cache": self.engine.slots.stats.to_dict(),
                "slots": self.engine.slots.n_slots, "slot_bytes": self.engine.slots.slot_bytes,
                "resident": list(self.engine.slots.resident)}

    def load_lora_adapter(self, body) -> dict:
        """vLLM's runtime load: ``{"lora_name", "lora_path"}``, the folder under ``lora_root``,
        checked in full (``ServingEngine.add_adapter``) on the batcher thread between steps."""
        name, path = self._lora_fields(body, {"lora_name", "lora_path"})
        folder = self._under_root(path)
        try:  # a name loaded already is refused here too, with 400 as vLLM answers
            self.batcher.run_between_steps(lambda: self.engine.add_adapter(name, folder))
        except AdapterError as exc:
            raise HttpError(400, str(exc)) from None
        return {"object": "lora_adapter", "lora_name": name, "status": "loaded",
                "message": f"Success: LoRA adapter {name!r} added; request it as model {name!r} or '{BASE}:{name}'"}

    def unload_lora_adapter(self, body) -> dict:
        """vLLM's runtime unload: ``{"lora_name"}``. New requests for it get a 404 at once; rows
        already running with it finish (``AdapterSlots.forget``)."""
        name, _ = self._lora_fields(body, {"lora_name"})
        try:
            self.batcher.run_between_steps(lambda: self.engine.remove_adapter(name))
        except KeyError as exc:
            raise HttpError(404, f"lora_name: {exc.args[0]}", "lora_name") from None
        return {"object": "lora_adapter", "lora_name": name, "status": "unloaded",
                "message": f"Success: LoRA adapter {name!r} removed"}

    def _lora_fields(self, body, fields: set[str]) -> tuple[str, str | None]:
        if self.lora_root is None:
            raise HttpError(404, "runtime LoRA loading is off; start the server with --allow-runtime-lora "
                                 "--lora-root DIR (CompletionServer(allow_runtime_lora=True, lora_root=DIR))")
        if not isinstance(body, dict) or set(body) != fields:
            raise HttpError(400, f"the body must be a JSON object with exactly the fields {sorted(fields)}, "
                                 f"got {sorted(body) if isinstance(body, dict) else type(body).__name__}")
        for name in fields:
            if not isinstance(body[name], str) or not body[name]:
                raise HttpError(400, f"'{name}' must be a non-empty string, got {json.dumps(body[name])}", name)
        return body["lora_name"], body.get("lora_path")

    def _under_root(self, path: str) -> Path:
        """``path`` (relative to ``lora_root``, or absolute) with symlinks and ``..`` resolved; a
        folder outside the root is refused, so a client can read nothing else on the disk."""
        folder = (self.lora_root / path).resolve()
        if not folder.is_relative_to(self.lora_root):
            raise HttpError(403, f"'lora_path' {path!r} resolves to {folder}, outside the server's --lora-root "
                                 f"{self.lora_root}; put the adapter under that folder", "lora_path")
        return folder

    def parse(self, body, route: str) -> Call:
        """Check every field of a request to ``route`` and turn it into a ``Call``."""
        if not isinstance(body, dict):
            raise HttpError(400, "the request body must be a JSON object")
        _check_fields(body, route)
        model = body.get("model")
        if not isinstance(model, str):
            raise HttpError(400, f"'model' must be a string like {BASE!r} or '{BASE}:<adapter>'", "model")
        adapter = self._adapter(model)
        param = "messages" if route == "chat" else "prompt"
        prompt = self._chat_prompt(body) if route == "chat" else self._prompt(body)
        ids = prompt if isinstance(prompt, list) else self._encode(prompt, param)
        room = self.engine.context - len(ids)
        if room < 1:
            raise HttpError(400, f"the prompt is {len(ids)} tokens; the context holds {self.engine.context}, "
                                 "including at least one new token", param)
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = _integer(body, name, 16 if route == "completions" else room)
        if not 1 <= max_tokens <= room:
            raise HttpError(400, f"'{name}' must be in [1, {room}] for this {len(ids)}-token prompt "
                                 f"(context {self.engine.context}), got {max_tokens}", name)
        seed = _integer(body, "seed", None)
        request = Request(ids, adapter, max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                          top_p=_number(body, "top_p", None, 0.0, 1.0, low_open=True),
                          seed=secrets.randbits(63) if seed is None else seed)
        try:
            self.engine.validate(request)  # what the JSON checks cannot see (token ids, seed range)
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise HttpError(400, f"'stream' must be true or false, got {json.dumps(stream)}", "stream")
        request.top_logprobs = _top_logprobs(body, route, stream)
        return Call(route, model, request, _stops(body), stream, _include_usage(body, stream))

    def _adapter(self, model: str) -> str | None:
        base, _, adapter = model.partition(":")
        if model in self.engine.library and model != BASE:
            return model
        if base != BASE or (adapter and adapter not in self.engine.library) or model == f"{BASE}:":
            known = [m["id"] for m in self.models()["data"]]
            raise HttpError(404, f"model {model!r} does not exist; available: {known}", "model")
        return adapter or None

    @staticmethod
    def _prompt(body: dict) -> str | list[int]:
        """A completion's prompt: a string, a list of one string, or token ids (a list of ints,
        used as they are). Several prompts in one request would be several choices: refused."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # [text] or [[ids]]: one prompt in a list
        if isinstance(prompt, str) and prompt:
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise HttpError(400, f"'prompt' holds {len(prompt)} prompts; this server answers one per request "
                                 "(send them as separate requests: they are batched together anyway)", "prompt")
        raise HttpError(400, "'prompt' must be a non-empty string or a non-empty list of token ids", "prompt")

    def _encode(self, text: str, param: str) -> list[int]:
        if len(text) > self.max_prompt_chars:  # before BPE, whose cost grows faster than the text
            raise HttpError(400, f"the prompt is {len(text)} characters; no text over {self.max_prompt_chars} "
                                 f"characters fits the context of {self.engine.context} tokens", param)
        return self.tokenizer.encode(text)

    def _chat_prompt(self, body: dict) -> str:
        """The conversation rendered by the model's chat template, ending in an opened assistant
        turn: the same text ``minift generate --chat`` and ``minift chat`` give the model."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HttpError(400, "'messages' must be a non-empty list of {\"role\", \"content\"}", "messages")
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict) or set(message) - {"role", "content"}:
                raise HttpError(400, f"{where} must be an object with only \"role\" and \"content\"", where)
            if message.get("role") not in ROLES:
                raise HttpError(400, f"{where}.role must be one of {list(ROLES)}, got "
                                     f"{json.dumps(message.get('role'))}", f"{where}.role")
            content = message.get("content")
            if not isinstance(content, str):
                raise HttpError(400, f"{where}.content must be a string (content parts are not supported)",
                                f"{where}.content")
            forged = [t for t in self.tokenizer.special_tokens if t in content]
            if forged:  # content must not open or close turns of its own
                raise HttpError(400, f"{where}.content contains the control token {forged[0]!r}; remove it",
                                f"{where}.content")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def submit(self, call: Call) -> Job:
        return self.batcher.submit(call.request, StopText(self.tokenizer, call.stops))

    def answer(self, call: Call, job: Job) -> dict:
        """The whole response of a non-streaming call, once its job is done."""
        if not job.done.wait(self.timeout_s):
            job.cancelled = True
            raise HttpError(503, f"no answer within {self.timeout_s} s; the server is overloaded")
        if job.error:
            raise job.error
        finish = self._finish_reason(job)
        logprobs = self._logprobs(call.route, job.result.logprobs)
        choice = ({"index": 0, "message": {"role": "assistant", "content": job.text.text}, "finish_reason": finish,
                   "logprobs": logprobs} if call.route == "chat" else
                  {"index": 0, "text": job.text.text, "finish_reason": finish, "logprobs": logprobs})
        return {**self._head(call, chunk=False), "choices": [choice], "usage": self._usage(job)}

    def _logprobs(self, route: str, logprobs) -> dict | None:
        """``Completion.logprobs`` in the route's OpenAI shape: chat's ``{"content": [{"token",
        "logprob", "bytes", "top_logprobs"}]}``, completions' parallel lists ``tokens``,
        ``token_logprobs``, ``top_logprobs`` ({token: logprob}) and ``text_offset``. A token that
        is only part of a character decodes to U+FFFD; ``bytes`` (chat) has its UTF-8 bytes."""
        if logprobs is None:
            return None
        def text(token: int) -> str:
            return self.tokenizer.decode([token])

        if route == "chat":
            def entry(i, lp):
                return {"token": text(i), "logprob": lp, "bytes": list(text(i).encode())}
            return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                                for t in logprobs]}
        tokens = [text(t.token) for t in logprobs]
        offsets = numpy.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist()
        return {"tokens": tokens, "token_logprobs": [t.logprob for t in logprobs],
                "top_logprobs": [_by_text(t.top, text) for t in logprobs], "text_offset": offsets}

    def chunks(self, call: Call, job: Job):
        """The streamed response: one chunk per piece of new text, a last chunk with the finish
        reason, a usage chunk if asked, then ``[DONE]`` (chunks are dicts, ``[DONE]`` a str)."""
        if call.route == "chat":
            yield self._chunk(call, {"role": "assistant", "content": ""}, None)
        sent = ""
        while (update := job.updates.get(timeout=self.timeout_s)) is not None:
            if len(update) > len(sent):
                yield self._chunk(call, update[len(sent):], None)
                sent = update
        if job.error:
            yield _error_body(job.error)
        else:
            yield self._chunk(call, job.text.text[len(sent):], self._finish_reason(job))
            if call.include_usage:
                yield {**self._head(call, chunk=True), "choices": [], "usage": self._usage(job)}
        yield "[DONE]"

    def _chunk(self, call: Call, text, finish: str | None) -> dict:
        if call.route == "chat":
            delta = text if isinstance(text, dict) else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._head(call, chunk=True), "choices": [choice]}

    @staticmethod
    def _head(call: Call, chunk: bool) -> dict:
        chat = call.route == "chat"
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{call.id}", "object": kind, "created": call.created,
                "model": call.model}

    @staticmethod
    def _finish_reason(job: Job) -> str:
        return "stop" if job.text.stopped else job.result.finish_reason

    @staticmethod
    def _usage(job: Job) -> dict:
        done = job.result
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.tokens),
                "total_tokens": done.prompt_tokens + len(done.tokens)}


def _error_body(exc: HttpError) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.status}}


class _Handler(BaseHTTPRequestHandler):
    server_version = "minift"
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.socket_timeout_s  # StreamRequestHandler sets it on the socket
        super().setup()

    @property
    def service(self) -> CompletionService:
        return self.server.service

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        path = self.path.split("?")[0]
        if path.startswith("/v1/models/"):
            self._respond(lambda: self.service.model(unquote(path.removeprefix("/v1/models/"))))
            return
        routes = {"/v1/models": self.service.models, "/v1/stats": self.service.stats}
        self._respond(lambda: routes[path]() if path in routes else self._not_found())

    def do_POST(self) -> None:  # noqa: N802
        admin = {"/v1/load_lora_adapter": self.service.load_lora_adapter,
                 "/v1/unload_lora_adapter": self.service.unload_lora_adapter}.get(self.path.split("?")[0])
        if admin is not None:
            self._respond(lambda: admin(self._json_body()))
            return
        route = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}.get(self.path.split("?")[0])
        try:
            call = self.service.parse(self._json_body(), route) if route else self._not_found()
            job = self.service.submit(call)
        except Exception as exc:  # noqa: BLE001 - every failure is answered, see _failure
            self._send_json(*_failure(exc))
            return
        if call.stream:
            self._stream(self.service.chunks(call, job), job)
        else:
            self._respond(lambda: self.service.answer(call, job))

    def _not_found(self):
        raise HttpError(404, f"no route {self.command} {self.path}; try POST /v1/completions, "
                             "POST /v1/chat/completions or GET /v1/models")

    def _json_body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HttpError(411, "a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            raise HttpError(413, f"the body is {length} bytes; the limit is {MAX_BODY_BYTES}")
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:
            raise HttpError(408, f"the body did not arrive within {self.timeout} s") from None
        if len(raw) < int(length):
            raise HttpError(400, f"the body ended after {len(raw)} of the {length} bytes promised")
        return read_json(raw)

    def _respond(self, make) -> None:
        try:
            status, payload = 200, make()
        except Exception as exc:  # noqa: BLE001 - every failure is answered, see _failure
            status, payload = _failure(exc)
        self._send_json(status, payload)

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.close_connection = True  # the body of a rejected request may be unread
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, chunks, job: Job) -> None:
        """Server-Sent Events, the body ended by closing the connection. A client that goes away
        (or stops reading until the socket times out) cancels its row in the batch."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for chunk in chunks:
                self.wfile.write(f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
        except (OSError, queue.Empty):  # the client left, or the batcher took longer than timeout_s
            job.cancelled = True

    def log_message(self, format, *args) -> None:  # noqa: A002 - http.server's signature
        if self.server.verbose:
            super().log_message(format, *args)


def _failure(exc: Exception) -> tuple[int, dict]:
    """-> (status, error body): the client's mistake as it was raised, a bug as a 500, so that
    no failure drops the connection without an answer."""
    if not isinstance(exc, HttpError):
        exc = HttpError(500, f"internal error: {type(exc).__name__}: {exc}")
    return exc.status, _error_body(exc)


class _HttpServer(ThreadingHTTPServer):
    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True


class CompletionServer:
    """The HTTP server plus its batcher; ``port=0`` picks a free port.

    ``start()`` serves on background threads (tests, ``bench-serve``), ``serve_forever()`` in
    the calling thread (``minift serve``); ``stop()`` ends both. Also a context manager.
    ``socket_timeout_s`` bounds every read and write on a connection (and an idle keep-alive).
    """

    def __init__(self, engine: ServingEngine, tokenizer, port: int = 0, window_ms: float = 15.0,
                 timeout_s: float = 600.0, verbose: bool = False, host: str = "127.0.0.1",
                 socket_timeout_s: float = 30.0, allow_runtime_lora: bool = False,
                 lora_root: str | Path | None = None, batching: str = "continuous"):
        if allow_runtime_lora and (lora_root is None or not Path(lora_root).is_dir()):
            raise ValueError(f"allow_runtime_lora needs lora_root (--lora-root), an existing folder that holds the "
                             f"adapters clients may load; got {lora_root!r}")
        self.service = CompletionService(engine, tokenizer, window_ms / 1000, timeout_s,
                                         lora_root if allow_runtime_lora else None, batching)
        self.httpd = _HttpServer((host, port), _Handler)
        self.httpd.service, self.httpd.verbose, self.httpd.socket_timeout_s = self.service, verbose, socket_timeout_s
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> CompletionServer:
        self.service.batcher.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="minift-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.service.batcher.start()
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            self.stop()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout_s)
        self.httpd.server_close()
        self.service.batcher.stopping.set()
        if self.service.batcher.is_alive():
            self.service.batcher.join(timeout_s)

    def __enter__(self) -> CompletionServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def parse_adapter_specs(specs) -> dict[str, str]:
    """``["name=folder", ...]`` (the ``--adapter`` flags) -> {name: folder}."""
    adapters: dict[str, str] = {}
    for spec in specs or []:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--adapter takes NAME=FOLDER, got {spec!r}")
        if name in adapters:
            raise ValueError(f"--adapter {name!r} is given twice")
        adapters[name] = folder
    return adapters
