"""An OpenAI-shaped completions endpoint over the multi-LoRA engine, standard library only.

    POST /v1/completions   {"model": "base" | "base:<adapter>", "prompt": "...", "max_tokens": 16,
                            "temperature": 1.0, "top_p": 0.9, "seed": 0}
    GET  /v1/models        "base" and one "base:<adapter>" per loaded adapter
    GET  /v1/stats         batch sizes run and the adapter cache's hits, misses, evictions, bytes

Each HTTP request is handled on its own thread (``ThreadingHTTPServer``), which checks the JSON,
tokenizes, and hands a ``Request`` to the one ``Batcher`` thread. The batcher waits a short
window after the first arrival (or until ``max_batch`` requests are in) and runs everything that
came as one multi-adapter batch: requests that arrive together share one ``W x`` per layer, what
S-LoRA and Punica are built around (lecture 004). Only the batcher touches the model.

Bad input never reaches the batcher: it gets a 4xx with a JSON ``{"error": {"message": ...}}``
naming the field, and the server goes on serving everyone else.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from minift.serve.engine import Completion, Request, ServingEngine

BASE = "base"
MAX_BODY_BYTES = 1 << 20


class HttpError(Exception):
    """A client error: HTTP ``status`` and a message that says what to fix."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class Job:
    """One request waiting for the batcher; the handler thread blocks on ``done``."""

    request: Request
    done: threading.Event = field(default_factory=threading.Event)
    result: Completion | None = None
    error: HttpError | None = None


class Batcher(threading.Thread):
    """Collects requests for ``window_s`` after the first one (or ``max_batch`` of them) and
    runs them as one call of ``engine.generate``, which splits by the slot policy if needed."""

    def __init__(self, engine: ServingEngine, window_s: float = 0.015):
        super().__init__(name="minift-batcher", daemon=True)
        self.engine, self.window_s = engine, window_s
        self.queue: queue.Queue[Job] = queue.Queue()
        self.stopping = threading.Event()

    def submit(self, request: Request) -> Job:
        job = Job(request)
        self.queue.put(job)
        return job

    def run(self) -> None:
        while not self.stopping.is_set():
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
        try:
            for job, completion in zip(jobs, self.engine.generate([j.request for j in jobs])):
                job.result = completion
        except Exception as exc:  # a bug, not the client's fault: every waiting client gets a 500
            for job in jobs:
                job.error = HttpError(500, f"generation failed: {type(exc).__name__}: {exc}")
        finally:
            for job in jobs:
                job.done.set()

    def _fail_waiting(self, error: HttpError) -> None:
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            job.error = error
            job.done.set()


def _number(body: dict, name: str, default, low: float, high: float, low_open: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HttpError(400, f"'{name}' must be a number, got {json.dumps(value)}", name)
    if value > high or value < low or (low_open and value == low):
        raise HttpError(400, f"'{name}' must be in {'(' if low_open else '['}{low}, {high}], got {value}", name)
    return float(value)


def _integer(body: dict, name: str, default):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise HttpError(400, f"'{name}' must be an integer, got {json.dumps(value)}", name)
    return value


class CompletionService:
    """What the HTTP handler calls: JSON in, JSON out, ``HttpError`` for the client's mistakes."""

    def __init__(self, engine: ServingEngine, tokenizer, window_s: float, timeout_s: float):
        self.engine, self.tokenizer, self.timeout_s = engine, tokenizer, timeout_s
        self.batcher = Batcher(engine, window_s)

    def models(self) -> dict:
        ids = [BASE] + [f"{BASE}:{name}" for name in self.engine.library.names()]
        return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "minift"} for i in ids]}

    def stats(self) -> dict:
        return {"batch_sizes": list(self.engine.batch_sizes), "adapter_cache": self.engine.slots.stats.to_dict(),
                "slots": self.engine.slots.n_slots, "slot_bytes": self.engine.slots.slot_bytes,
                "resident": list(self.engine.slots.resident)}

    def parse(self, body) -> tuple[str, Request]:
        """Check every field of a completions request and turn it into an engine ``Request``."""
        if not isinstance(body, dict):
            raise HttpError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise HttpError(400, f"'model' must be a string like {BASE!r} or '{BASE}:<adapter>'", "model")
        adapter = self._adapter(model)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise HttpError(400, "'prompt' must be a non-empty string", "prompt")
        if body.get("stream"):
            raise HttpError(400, "'stream' is not supported; send stream=false", "stream")
        if _integer(body, "n", 1) != 1:
            raise HttpError(400, "'n' must be 1 (one completion per request)", "n")
        ids = self.tokenizer.encode(prompt)
        context = self.engine.context
        if len(ids) >= context:
            raise HttpError(400, f"the prompt is {len(ids)} tokens; the context holds {context}, "
                                 "including at least one new token", "prompt")
        max_tokens = _integer(body, "max_tokens", 16)
        if max_tokens < 1 or len(ids) + max_tokens > context:
            raise HttpError(400, f"'max_tokens' must be in [1, {context - len(ids)}] for this {len(ids)}-token "
                                 f"prompt (context {context}), got {max_tokens}", "max_tokens")
        seed = _integer(body, "seed", None)
        request = Request(ids, adapter, max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                          top_p=_number(body, "top_p", None, 0.0, 1.0, low_open=True),
                          seed=secrets.randbits(63) if seed is None else seed)
        try:
            self.engine.validate(request)  # what the JSON checks cannot see (token ids, seed range)
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        return model, request

    def _adapter(self, model: str) -> str | None:
        base, _, adapter = model.partition(":")
        if base != BASE or (adapter and adapter not in self.engine.library) or model == f"{BASE}:":
            known = [m["id"] for m in self.models()["data"]]
            raise HttpError(404, f"model {model!r} does not exist; available: {known}", "model")
        return adapter or None

    def complete(self, body) -> dict:
        model, request = self.parse(body)
        job = self.batcher.submit(request)
        if not job.done.wait(self.timeout_s):
            raise HttpError(503, f"no answer within {self.timeout_s} s; the server is overloaded")
        if job.error:
            raise job.error
        done = job.result
        text = self.tokenizer.decode(done.tokens, skip_special=True)
        return {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": done.finish_reason, "logprobs": None}],
                "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.tokens),
                          "total_tokens": done.prompt_tokens + len(done.tokens)}}


def _error_body(exc: HttpError) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.status}}


class _Handler(BaseHTTPRequestHandler):
    server_version = "minift"
    protocol_version = "HTTP/1.1"

    @property
    def service(self) -> CompletionService:
        return self.server.service

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        routes = {"/v1/models": self.service.models, "/v1/stats": self.service.stats}
        self._respond(lambda: routes[self.path]() if self.path in routes else self._not_found())

    def do_POST(self) -> None:  # noqa: N802
        self._respond(lambda: self.service.complete(self._json_body()) if self.path == "/v1/completions"
                      else self._not_found())

    def _not_found(self):
        raise HttpError(404, f"no route {self.command} {self.path}; try POST /v1/completions or GET /v1/models")

    def _json_body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HttpError(411, "a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            raise HttpError(413, f"the body is {length} bytes; the limit is {MAX_BODY_BYTES}")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"the body is not valid JSON: {exc}") from None

    def _respond(self, make) -> None:
        try:
            status, payload = 200, make()
        except HttpError as exc:
            status, payload = exc.status, _error_body(exc)
        except Exception as exc:  # a bug must not drop the connection without an answer
            status, payload = 500, _error_body(HttpError(500, f"internal error: {type(exc).__name__}: {exc}"))
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.close_connection = True  # the body of a rejected request may be unread
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args) -> None:  # noqa: A002 - http.server's signature
        if self.server.verbose:
            super().log_message(format, *args)


class CompletionServer:
    """The HTTP server on 127.0.0.1 plus its batcher; ``port=0`` picks a free port.

    ``start()`` serves on background threads (tests, ``bench-serve``), ``serve_forever()`` in
    the calling thread (``minift serve``); ``stop()`` ends both. Also a context manager.
    """

    def __init__(self, engine: ServingEngine, tokenizer, port: int = 0, window_ms: float = 15.0,
                 timeout_s: float = 600.0, verbose: bool = False):
        self.service = CompletionService(engine, tokenizer, window_ms / 1000, timeout_s)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.service, self.httpd.verbose = self.service, verbose
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
