"""``minift bench-serve``: a server on a free localhost port, N concurrent requests, tokens/s.

Also the synthetic setup that the command and ``benchmarks/serve_throughput.py`` use when no
model is given: a small random byte-level Llama and K random adapters written as real PEFT
folders, so that loading goes through the same path as adapters trained with minift or PEFT.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy

from minift.data import ByteTokenizer
from minift.io import lora_tensors, write_adapter_folder
from minift.models import ATTENTION_PROJECTIONS, LlamaConfig, LlamaForCausalLM
from minift.peft.lora import LoraConfig, init_lora_A, target_module_names
from minift.serve.engine import ServingEngine
from minift.serve.server import CompletionServer


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


def synthetic_setup(folder: str | Path, n_adapters: int, ranks=(4, 8, 16), seed: int = 0):
    """-> (model, ByteTokenizer, {name: adapter folder}) with adapters of mixed ranks."""
    tok = ByteTokenizer()
    model = LlamaForCausalLM(bench_config(tok.vocab_size), seed=seed)
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


def run_bench_serve(engine: ServingEngine, tokenizer, n_requests: int, max_tokens: int,
                    window_ms: float = 20.0) -> dict:
    """Serve on an ephemeral port, send ``n_requests`` concurrent requests cycling over the
    adapters (and the base model when there are none), shut down; -> the measurements."""
    models = [f"base:{name}" for name in engine.library.names()] or ["base"]
    bodies = [{"model": models[i % len(models)], "prompt": f"Request {i}: " + "tell me more. " * (1 + i % 3),
               "max_tokens": max_tokens, "temperature": 0} for i in range(n_requests)]
    with CompletionServer(engine, tokenizer, port=0, window_ms=window_ms) as server:
        answers, seconds = drive(server.url, bodies)
    failed = [a for status, a in answers if status != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} of {n_requests} requests failed, first: {failed[0]}")
    tokens = sum(a["usage"]["completion_tokens"] for _, a in answers)
    return {"requests": n_requests, "adapters": len(engine.library), "completion_tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "batch_sizes": list(engine.batch_sizes),
            "adapter_cache": engine.slots.stats.to_dict()}
