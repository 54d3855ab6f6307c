"""The HTTP server on 127.0.0.1 (ephemeral port): batching, answers, errors, CLI wiring.

Every request has a timeout and every loop is bounded; the server is stopped in the fixture's
teardown even when a test fails.
"""

import http.client
import json
import urllib.request

import numpy as np
import pytest
from serve_fixtures import CONFIG, base_model, write_adapters

from minift.cli import main
from minift.data import ByteTokenizer
from minift.io import save_model
from minift.serve.engine import build_engine
from minift.serve.server import CompletionServer
from minift.studies.serve_bench import drive, post_json

TIMEOUT_S = 60
CONTEXT = 64


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return write_adapters(tmp_path_factory.mktemp("adapters"), names=["r1", "r3", "r8"])


@pytest.fixture(scope="module")
def server(adapters):
    tok = ByteTokenizer()
    model = base_model(np.float32, vocab_size=tok.vocab_size, max_seq_len=CONTEXT)
    engine = build_engine(model, adapters, n_slots=4, max_batch=4, eos_id=tok.eos_id)
    srv = CompletionServer(engine, tok, port=0, window_ms=20, timeout_s=TIMEOUT_S).start()
    yield srv
    srv.stop()


def complete(server, body, timeout_s=TIMEOUT_S):
    return post_json(f"{server.url}/v1/completions", body, timeout_s)


def get(server, path):
    with urllib.request.urlopen(f"{server.url}{path}", timeout=TIMEOUT_S) as response:
        return json.loads(response.read())


GOOD = {"model": "base:r1", "prompt": "Hello", "max_tokens": 4, "temperature": 0}


def test_concurrent_requests_with_different_adapters_are_batched_and_match_their_single_answers(server):
    bodies = [{"model": "base", "prompt": "The claim", "max_tokens": 8, "temperature": 0},
              {"model": "base:r1", "prompt": "A policy covers", "max_tokens": 6, "temperature": 0},
              {"model": "base:r3", "prompt": "Hi", "max_tokens": 8, "temperature": 0.9, "top_p": 0.95, "seed": 7},
              {"model": "base:r8", "prompt": "Deductibles are paid", "max_tokens": 5, "temperature": 0}]
    seen, batcher = len(server.service.engine.batch_sizes), server.service.batcher
    batcher.window_s = 5.0  # a slow machine still batches; the 4th arrival (max_batch) ends the wait
    try:
        together, _ = drive(server.url, bodies, TIMEOUT_S)
    finally:
        batcher.window_s = 0.02
    assert max(server.service.engine.batch_sizes[seen:]) > 1
    alone = [complete(server, body) for body in bodies]
    for body, (status, answer), (status_alone, answer_alone) in zip(bodies, together, alone):
        assert status == status_alone == 200, answer
        assert answer["choices"][0]["text"] == answer_alone["choices"][0]["text"]
        assert answer["usage"] == answer_alone["usage"]
        usage = answer["usage"]
        assert usage["prompt_tokens"] == len(body["prompt"])  # bytes
        assert usage["completion_tokens"] >= 1 and usage["completion_tokens"] <= body["max_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert answer["model"] == body["model"] and answer["object"] == "text_completion"
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    texts = {a["choices"][0]["text"] for _, a in together}
    assert len(texts) > 1  # different adapters, different continuations


def test_models_and_stats(server):
    assert [m["id"] for m in get(server, "/v1/models")["data"]] == ["base", "base:r1", "base:r3", "base:r8"]
    stats = get(server, "/v1/stats")
    assert stats["slots"] == 4 and set(stats["adapter_cache"]) == {"hits", "misses", "evictions", "bytes_moved"}
    # d_in + d_out of each wrapped layer of a block: q, k, v, o (r1, r3) and gate, up, down (r8)
    widths = (32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 48) * 2 + (48 + 32)
    assert stats["slot_bytes"] == 4 * 8 * CONFIG["n_layers"] * widths * 4  # slots x rank 8 x blocks x float32


BAD = [
    ({"model": "base:nope", "prompt": "hi"}, 404, "model 'base:nope' does not exist; available: ['base', 'base:r1'"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model 'gpt-4' does not exist"),
    ({"model": "base:", "prompt": "hi"}, 404, "model 'base:' does not exist"),
    ({"prompt": "hi"}, 400, "'model' must be a string"),
    ({"model": "base", "prompt": 5}, 400, "'prompt' must be a non-empty string"),
    ({"model": "base", "prompt": ["a", "b"]}, 400, "'prompt' holds 2 prompts; this server answers one"),
    ({"model": "base", "prompt": ""}, 400, "'prompt' must be a non-empty string"),
    ({"model": "base", "prompt": "x" * CONTEXT}, 400, f"the prompt is {CONTEXT} tokens; the context holds {CONTEXT}"),
    ({"model": "base", "prompt": "hi", "max_tokens": CONTEXT - 1}, 400,
     f"'max_tokens' must be in [1, {CONTEXT - 2}] for this 2-token prompt"),
    ({"model": "base", "prompt": "hi", "max_tokens": 0}, 400, "'max_tokens' must be in [1, "),
    ({"model": "base", "prompt": "hi", "max_tokens": "5"}, 400, "'max_tokens' must be an integer, got \"5\""),
    ({"model": "base", "prompt": "hi", "max_tokens": True}, 400, "'max_tokens' must be an integer, got true"),
    ({"model": "base", "prompt": "hi", "temperature": "hot"}, 400, "'temperature' must be a number"),
    ({"model": "base", "prompt": "hi", "temperature": -1}, 400, "'temperature' must be in [0.0, 2.0], got -1"),
    ({"model": "base", "prompt": "hi", "top_p": 0}, 400, "'top_p' must be in (0.0, 1.0], got 0"),
    ({"model": "base", "prompt": "hi", "seed": 1.5}, 400, "'seed' must be an integer"),
    ({"model": "base", "prompt": "hi", "seed": -3}, 400, "seed must be a non-negative integer, got -3"),
    ({"model": "base", "prompt": "hi", "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"model": "base", "prompt": "hi", "n": 2}, 400, "'n' is not supported by this server"),
    (b"{not json", 400, "the body is not valid JSON"),
    (b"\xff\xfe", 400, "the body is not valid JSON"),
    (b"[1, 2]", 400, "the request body must be a JSON object"),
]


@pytest.mark.parametrize("body, status, message", BAD)
def test_bad_input_gets_a_4xx_with_a_message_and_the_server_keeps_serving(server, body, status, message):
    got, answer = complete(server, body)
    assert got == status
    assert message in answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error"
    good, answer = complete(server, GOOD)
    assert good == 200 and answer["usage"]["completion_tokens"] >= 1


def test_a_bad_request_among_concurrent_good_ones_fails_alone(server):
    bodies = [GOOD, {**GOOD, "model": "base:nope"}, {**GOOD, "model": "base:r3"}]
    answers, _ = drive(server.url, bodies, TIMEOUT_S)
    assert [status for status, _ in answers] == [200, 404, 200]


def raw_request(server, method, path, headers, body=b""):
    conn = http.client.HTTPConnection("127.0.0.1", server.httpd.server_address[1], timeout=TIMEOUT_S)
    try:
        conn.putrequest(method, path)
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.parametrize("method, path, headers, status, message", [
    ("POST", "/v1/completions", {}, 411, "Content-Length header is required"),
    ("POST", "/v1/completions", {"Content-Length": str(10**9)}, 413, "the limit is 1048576"),
    ("POST", "/v1/chat", {"Content-Length": "2"}, 404, "no route POST /v1/chat; try POST /v1/completions"),
    ("GET", "/v1/completions", {}, 404, "no route GET /v1/completions"),
])
def test_protocol_errors(server, method, path, headers, status, message):
    got, answer = raw_request(server, method, path, headers, b"{}" if headers.get("Content-Length") == "2" else b"")
    assert got == status and message in answer["error"]["message"]
    assert complete(server, GOOD)[0] == 200


def test_stop_ends_both_threads_and_closes_the_port(adapters):
    tok = ByteTokenizer()
    engine = build_engine(base_model(np.float32, vocab_size=tok.vocab_size), adapters, n_slots=1)
    srv = CompletionServer(engine, tok, port=0).start()
    try:
        assert complete(srv, GOOD)[0] == 200
    finally:
        srv.stop()
    assert not srv.service.batcher.is_alive() and not srv._thread.is_alive()
    with pytest.raises(OSError):
        complete(srv, GOOD, timeout_s=5)


def test_cli_bench_serve_prints_tokens_per_second(capsys):
    """The wiring only; the load generator itself: tests/studies/test_serve_load.py."""
    assert main(["bench-serve", "--requests", "4", "--adapters", "2", "--slots", "1", "--max-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "4 requests, Poisson arrivals at 16/s, seed 0: 4 completed, 0 failed" in out and "tokens/s" in out


def test_cli_serve_answers_over_http(tmp_path, adapters, monkeypatch, capsys):
    """``minift serve`` wiring: model folder + --adapter flags -> a server that answers. Its
    blocking loop is replaced by one request and a stop, so the test ends by itself."""
    tok = ByteTokenizer()
    save_model(base_model(np.float32, vocab_size=tok.vocab_size), tmp_path / "model")
    answers = []

    def serve_once(self):
        answers.append(self.httpd.server_address[0])
        self.start()
        try:
            answers.append(complete(self, {**GOOD, "model": "base:legal"}))
        finally:
            self.stop()

    monkeypatch.setattr(CompletionServer, "serve_forever", serve_once)
    assert main(["serve", "--model", str(tmp_path / "model"), "--adapter", f"legal={adapters['r1']}",
                 "--port", "0", "--slots", "2", "--host", "127.0.0.2"]) == 0
    assert answers[0] == "127.0.0.2" and answers[1][0] == 200 and "base:legal" in capsys.readouterr().out
    assert main(["serve", "--model", str(tmp_path / "model"), "--adapter", "legal"]) == 1
    assert "--adapter takes NAME=FOLDER" in capsys.readouterr().err
