"""``minift bench-serve``: an open-loop load generator against the multi-LoRA server.

Requests arrive as a Poisson process at ``rate`` per second: the gaps between arrivals are
independent exponential draws of mean ``1 / rate``, the usual model of many independent users
(and what vLLM's ``benchmark_serving`` sends). The whole schedule (arrival times, adapters, prompt
lengths, ``max_tokens``) is drawn from a seeded generator *before* the run, so two servers (static
and continuous batching, say) are given exactly the same load.

The sender is open-loop: it sends each request at its time whether or not earlier ones have been
answered (a thread per request in flight). A closed-loop client, which waits for an answer before
sending the next request, slows down when the server does and so hides the queueing delay that
the measurement is about (Schroeder, Wierman and Harchol-Balter, "Open versus closed: a cautionary
tale", NSDI 2006).

Every request is streamed, so time-to-first-token (TTFT) is when the first chunk with text (or
the finish reason) arrives, and end-to-end latency is when the stream ends. Throughput is output
tokens (the server's ``usage``) over the run's wall time, from the first send to the last answer.

Also the synthetic setup that the command and ``benchmarks/serve_*.py`` use when no model is
given: a small random byte-level Llama and K random adapters written as real PEFT folders, so
that loading goes through the same path as adapters trained with minift or PEFT.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy

from minift.data import ByteTokenizer
from minift.io import lora_tensors, write_adapter_folder
from minift.models import ATTENTION_PROJECTIONS, LlamaConfig, LlamaForCausalLM
from minift.peft.lora import LoraConfig, init_lora_A, target_module_names
from minift.serve.engine import ServingEngine
from minift.serve.server import CompletionServer

#: The words prompts are drawn from; the lengths, not the meaning, matter to the server.
PROMPT_WORDS = ("the", "claim", "policy", "covers", "water", "damage", "after", "a", "storm", "when", "is",
                "my", "deductible", "due", "please", "explain", "how", "to", "file", "report")


def bench_config(vocab_size: int) -> LlamaConfig:
    """The small model of the serving benchmarks (about 3.4M parameters)."""
    return LlamaConfig(vocab_size=vocab_size, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=688,
                       max_seq_len=256)


def write_random_adapter(model, folder: str | Path, rank: int, targets=ATTENTION_PROJECTIONS, seed: int = 0,
                         std: float = 0.05) -> Path:
    """A PEFT-format adapter with random A and a non-zero B, as an adapter looks after training."""
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets))
    rng = numpy.random.default_rng(seed)
    pairs = {}
    for module in target_module_names(model, config):
        d_out, d_in = model.get_submodule(module).weight.shape
        pairs[module] = (init_lora_A((rank, d_in), True, rng).astype(numpy.float32),
                         rng.normal(0.0, std, (d_out, rank)).astype(numpy.float32))
    return write_adapter_folder(folder, config.to_peft_dict(), lora_tensors(pairs))


def printable_text_only(model) -> None:
    """Zero the (tied) embedding rows of every byte-level token but printable ASCII, so that their
    logits are 0 and a random model's greedy text is printable characters. Otherwise it often
    emits a byte that opens a UTF-8 character it never completes, and the server, rightly, holds
    back text that is not yet certain: the stream would look like one late chunk and TTFT would
    measure the whole request. Prompts are printable, so no input embedding changes."""
    weight = model.model.embed_tokens.weight
    unprintable = numpy.ones(weight.shape[0], dtype=bool)
    unprintable[ord(" "):ord("~") + 1] = False
    weight.data[unprintable] = 0


def synthetic_setup(folder: str | Path, n_adapters: int, ranks=(4, 8, 16), seed: int = 0):
    """-> (model, ByteTokenizer, {name: adapter folder}) with adapters of mixed ranks; the model
    writes printable text (``printable_text_only``)."""
    tok = ByteTokenizer()
    model = LlamaForCausalLM(bench_config(tok.vocab_size), seed=seed)
    printable_text_only(model)
    adapters = {f"task{i}": write_random_adapter(model, Path(folder) / f"task{i}", ranks[i % len(ranks)],
                                                 seed=seed + 1 + i)
                for i in range(n_adapters)}
    return model, tok, adapters


def post_json(url: str, body, timeout_s: float = 60.0) -> tuple[int, dict]:
    """POST ``body`` as JSON; -> (status, decoded JSON answer), 4xx/5xx included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def drive(url: str, bodies: list[dict], timeout_s: float = 120.0) -> tuple[list[tuple[int, dict]], float]:
    """Send all ``bodies`` at once (one thread each); -> (answers in order, wall seconds)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        answers = list(pool.map(lambda b: post_json(f"{url}/v1/completions", b, timeout_s), bodies))
    return answers, time.perf_counter() - start


@dataclass(frozen=True)
class LoadSpec:
    """The load of one run. Ranges are inclusive; each request draws its own values from them."""

    requests: int = 32
    rate: float = 16.0  # mean arrivals per second
    prompt_words: tuple[int, int] = (2, 20)
    max_tokens: tuple[int, int] = (8, 32)
    base_share: float = 0.25  # the share of requests for the base model (the rest: adapters, uniformly)
    seed: int = 0

    def __post_init__(self):
        if self.requests < 1 or not self.rate > 0:
            raise ValueError(f"bench-serve: --requests must be >= 1 and --rate > 0 (got {self.requests}, "
                             f"{self.rate})")
        for name in ("prompt_words", "max_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"bench-serve: --{name.replace('_', '-')} must be LOW,HIGH with 1 <= LOW <= HIGH "
                                 f"(got {low},{high})")
        if not 0 <= self.base_share <= 1:
            raise ValueError(f"bench-serve: --base-share must be in [0, 1] (got {self.base_share})")


@dataclass(frozen=True)
class Arrival:
    """One request of the schedule: when it is sent (seconds after the first) and its body."""

    at_s: float
    body: dict


def poisson_arrival_times(n: int, rate: float, rng: numpy.random.Generator) -> numpy.ndarray:
    """``n`` arrival times of a Poisson process of ``rate`` per second, the first at 0: the gaps are
    exponential with mean ``1 / rate`` (memoryless: how long since the last arrival says nothing
    about the next)."""
    gaps = rng.exponential(1.0 / rate, n - 1)
    return numpy.concatenate(([0.0], numpy.cumsum(gaps)))


def load_schedule(spec: LoadSpec, adapters: list[str]) -> list[Arrival]:
    """The requests of a run, all drawn before it starts from ``spec.seed``: the same spec and
    adapters give the same schedule, whichever server it is sent to. Streamed, greedy
    ``/v1/completions`` bodies; with no adapters every request is for the base model."""
    rng = numpy.random.default_rng(spec.seed)
    times = poisson_arrival_times(spec.requests, spec.rate, rng)
    schedule = []
    for at_s in times:
        base = not adapters or rng.random() < spec.base_share
        model = "base" if base else f"base:{adapters[rng.integers(len(adapters))]}"
        words = rng.choice(PROMPT_WORDS, rng.integers(spec.prompt_words[0], spec.prompt_words[1] + 1))
        body = {"model": model, "prompt": " ".join(words),
                "max_tokens": int(rng.integers(spec.max_tokens[0], spec.max_tokens[1] + 1)), "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        schedule.append(Arrival(float(at_s), body))
    return schedule


@dataclass
class Outcome:
    """What one request got. Times in seconds: ``sent_s`` after the run's start, the others after
    its own send. ``error`` is None for a request answered in full."""

    model: str
    max_tokens: int
    sent_s: float
    ttft_s: float | None = None
    latency_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


def _events(response):
    """The JSON payloads of a Server-Sent Events body (``data: ...`` lines), ``[DONE]`` as a str."""
    for line in response:
        if line.startswith(b"data: "):
            payload = line[len(b"data: "):].strip()
            yield payload.decode() if payload == b"[DONE]" else json.loads(payload)


def stream_completion(url: str, body: dict, sent_s: float, timeout_s: float) -> Outcome:
    """Send one streamed completion and time it; a refusal, an error chunk or a stream that ends
    before ``[DONE]`` is an ``Outcome`` with ``error`` set, never an exception."""
    outcome = Outcome(body["model"], body["max_tokens"], sent_s)
    start = time.perf_counter()
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    done = False
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            for event in _events(response):
                done = event == "[DONE]"
                if done:
                    break
                _record(outcome, event, time.perf_counter() - start)
    except urllib.error.HTTPError as exc:
        outcome.error = f"HTTP {exc.code}: {_error_message(exc.read())}"
    except (OSError, ValueError) as exc:  # refused, reset, timed out, or a chunk that is not JSON
        outcome.error = f"{type(exc).__name__}: {exc}"
    if not done and outcome.error is None:
        outcome.error = "the stream ended before [DONE]"
    outcome.latency_s = time.perf_counter() - start
    return outcome


def _error_message(raw: bytes) -> str:
    """The message of OpenAI's error shape, or the body itself when it is not that shape."""
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:200]


def _record(outcome: Outcome, event: dict, elapsed_s: float) -> None:
    """Fold one streamed chunk into ``outcome``: the first text or finish reason is the first token."""
    if "error" in event:
        outcome.error = f"error chunk: {event['error'].get('message')}"
    if event.get("usage"):
        outcome.prompt_tokens = event["usage"]["prompt_tokens"]
        outcome.completion_tokens = event["usage"]["completion_tokens"]
    for choice in event.get("choices", []):
        if outcome.ttft_s is None and (choice.get("text") or choice.get("finish_reason")):
            outcome.ttft_s = elapsed_s
        outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason


def send_open_loop(url: str, schedule: list[Arrival], timeout_s: float = 120.0) -> tuple[list[Outcome], float]:
    """Send every request at its scheduled time on its own thread, without waiting for answers;
    -> (outcomes in schedule order, wall seconds from the first send to the last answer)."""
    outcomes: list[Outcome | None] = [None] * len(schedule)

    def send(i: int, sent_s: float) -> None:
        outcomes[i] = stream_completion(url, schedule[i].body, sent_s, timeout_s)

    threads = []
    start = time.perf_counter()
    for i, arrival in enumerate(schedule):
        time.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
        threads.append(threading.Thread(target=send, args=(i, time.perf_counter() - start), daemon=True))
        threads[-1].start()
    for thread in threads:
        thread.join()
    return outcomes, max(o.sent_s + o.latency_s for o in outcomes)


def percentile(values, q: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``q`` % of the values at or
    below it. Always a latency that some request had (no interpolation between two requests);
    p50 of 1..100 is 50, p99 is 99, p100 the largest. NaN for no values."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile: q must be in (0, 100], got {q}")
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return float(ordered[math.ceil(q / 100 * len(ordered)) - 1])


def summarize(outcomes: list[Outcome], wall_s: float, spec: LoadSpec, batching: str, server_stats: dict) -> dict:
    """The report of one run (JSON-ready); latencies over the requests answered in full."""
    good = [o for o in outcomes if o.error is None]
    failed = [o for o in outcomes if o.error is not None]
    output_tokens = sum(o.completion_tokens for o in good)
    ttft = [o.ttft_s for o in good]
    latency = [o.latency_s for o in good]
    return {
        "batching": batching, "spec": asdict(spec), "requests": len(outcomes), "completed": len(good),
        "failed": len(failed), "failures": sorted({o.error for o in failed})[:5],
        "output_tokens": output_tokens, "prompt_tokens": sum(o.prompt_tokens for o in good),
        "wall_s": wall_s, "tokens_per_s": output_tokens / wall_s,
        "ttft_s": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
        "latency_s": {"p50": percentile(latency, 50), "p99": percentile(latency, 99)},
        "server_stats": server_stats, "outcomes": [asdict(o) for o in outcomes],
    }


def get_json(url: str, timeout_s: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def run_load(engine: ServingEngine, tokenizer, spec: LoadSpec, batching: str = "continuous", window_ms: float = 15.0,
             timeout_s: float = 120.0) -> dict:
    """Serve ``engine`` on a free localhost port with ``batching``, send ``spec``'s schedule
    open-loop, read ``/v1/stats``, stop the server; -> ``summarize``'s report."""
    schedule = load_schedule(spec, engine.library.names())
    with CompletionServer(engine, tokenizer, port=0, window_ms=window_ms, batching=batching) as server:
        outcomes, wall_s = send_open_loop(server.url, schedule, timeout_s)
        stats = get_json(f"{server.url}/v1/stats")
    return summarize(outcomes, wall_s, spec, batching, stats)


def format_report(report: dict) -> str:
    """The report as the lines ``minift bench-serve`` prints."""
    spec, stats = report["spec"], report["server_stats"]
    cache = stats.get("adapter_cache", {})
    sizes = stats.get("batch_sizes", [])
    lines = [
        f"bench-serve ({report['batching']} batching): {report['requests']} requests, Poisson arrivals at "
        f"{spec['rate']:g}/s, seed {spec['seed']}: {report['completed']} completed, {report['failed']} failed",
        f"throughput: {report['output_tokens']} output tokens in {report['wall_s']:.2f} s = "
        f"{report['tokens_per_s']:.1f} tokens/s",
        f"TTFT: p50 {report['ttft_s']['p50'] * 1000:.0f} ms, p99 {report['ttft_s']['p99'] * 1000:.0f} ms; "
        f"end-to-end latency: p50 {report['latency_s']['p50'] * 1000:.0f} ms, "
        f"p99 {report['latency_s']['p99'] * 1000:.0f} ms",
        f"server /v1/stats: {len(sizes)} batches of sizes {sizes}; adapter cache: {cache.get('hits')} hits, "
        f"{cache.get('misses')} misses, {cache.get('evictions')} evictions, {cache.get('bytes_moved')} bytes moved",
    ]
    lines += [f"failure: {reason}" for reason in report["failures"]]
    return "\n".join(lines)
