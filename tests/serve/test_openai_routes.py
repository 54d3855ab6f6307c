"""The OpenAI-compatible routes (issue 17): chat, streaming, stop, usage, models/{id}, refusals,
and isolation (bad requests fired together with good ones harm none of them).

Reference: the greedy text of minift's own generation (``LlamaForCausalLM.generate`` on the
adapter merged into a copy of the base, cut at eos, decoded as the server decodes) for the very
text ``minift generate --chat`` would give the model. Every request has a timeout and the
servers are stopped in the fixtures' teardown.
"""

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_fixtures import base_model, write_adapters, write_overflowing_adapter

from minift.data import ByteTokenizer
from minift.peft import PeftModel
from minift.serve.engine import Request, build_engine
from minift.serve.server import LISTEN_BACKLOG, CompletionServer, StopText
from minift.studies.serve_bench import post_json

TIMEOUT_S = 60
CONTEXT = 128
TOK = ByteTokenizer()
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A claim?"}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {**write_adapters(root, names=["r1", "r3"]),
            "overflow": write_overflowing_adapter(root, vocab_size=TOK.vocab_size, max_seq_len=CONTEXT)}


def server_base():
    return base_model(np.float32, vocab_size=TOK.vocab_size, max_seq_len=CONTEXT)


def new_server(folders, **kwargs) -> CompletionServer:
    engine = build_engine(server_base(), folders, n_slots=4, max_batch=6, eos_id=TOK.eos_id)
    return CompletionServer(engine, TOK, port=0, window_ms=20, timeout_s=TIMEOUT_S, **kwargs).start()


@pytest.fixture(scope="module")
def server(folders):
    srv = new_server(folders)
    yield srv
    srv.stop()


def reference_tokens(folders, text: str, adapter: str | None, max_tokens: int) -> list[int]:
    """The tokens minift's own greedy generation gives, up to and including an eos."""
    model = server_base()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, folders[adapter]).merge_and_unload()
    tokens = model.generate([TOK.encode(text)], max_tokens, eos_id=TOK.eos_id)[0].tolist()
    return tokens[: tokens.index(TOK.eos_id) + 1] if TOK.eos_id in tokens else tokens


def reference_text(folders, text: str, adapter: str | None, max_tokens: int) -> str:
    return TOK.decode(reference_tokens(folders, text, adapter, max_tokens), skip_special=True)


def post(server, path, body):
    return post_json(f"{server.url}{path}", body, TIMEOUT_S)


def stream(server, path, body) -> list:
    """POST with stream=true; -> the SSE events in order: dicts, and the closing "[DONE]"."""
    conn = http.client.HTTPConnection("127.0.0.1", server.httpd.server_address[1], timeout=TIMEOUT_S)
    try:
        conn.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
        raw = response.read().decode()
    finally:
        conn.close()
    assert raw.endswith("\n\n")
    events = [e.removeprefix("data: ") for e in raw[:-2].split("\n\n")]
    assert all(not e.startswith("data:") for e in events)
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def answer_text(route, answer) -> str:
    choice = answer["choices"][0]
    return choice["message"]["content"] if route == "chat" else choice["text"]


def joined(route, events) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") if route == "chat" else c["choices"][0]["text"]
                   for c in events if isinstance(c, dict) and c["choices"])


def chat_body(model, **extra):
    return {"model": model, "messages": CHAT, "temperature": 0, **extra}


@pytest.mark.parametrize("model, adapter", [("base", None), ("base:r1", "r1"), ("r3", "r3")])
def test_chat_renders_the_chat_template_and_answers_as_minift_generate_does(server, folders, model, adapter):
    status, answer = post(server, "/v1/chat/completions", chat_body(model, max_tokens=10))
    assert status == 200, answer
    rendered = TOK.apply_chat_template(CHAT, add_generation_prompt=True)
    assert answer["choices"][0]["message"] == {"role": "assistant",
                                               "content": reference_text(folders, rendered, adapter, 10)}
    assert answer["object"] == "chat.completion" and answer["model"] == model and answer["id"].startswith("chatcmpl-")
    usage = answer["usage"]
    assert usage["prompt_tokens"] == len(TOK.encode(rendered))
    assert usage["completion_tokens"] == len(reference_tokens(folders, rendered, adapter, 10))  # eos counts
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_max_tokens_defaults_to_the_room_left_in_the_context(server):
    status, answer = post(server, "/v1/chat/completions", chat_body("base"))
    room = CONTEXT - answer["usage"]["prompt_tokens"]
    assert status == 200 and (answer["choices"][0]["finish_reason"] == "stop"
                              or answer["usage"]["completion_tokens"] == room)


@pytest.mark.parametrize("route", ["chat", "completions"])
@pytest.mark.parametrize("model", ["base", "base:r1"])
def test_streamed_chunks_join_to_the_non_streamed_text(server, route, model):
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    body = chat_body(model, max_tokens=12) if route == "chat" else {"model": model, "prompt": "The policy",
                                                                     "max_tokens": 12, "temperature": 0}
    status, whole = post(server, path, body)
    events = stream(server, path, {**body, "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert joined(route, chunks) == answer_text(route, whole) and len(chunks) >= 3
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    kind = "chat.completion.chunk" if route == "chat" else "text_completion"
    assert {c["object"] for c in events[:-1]} == {kind} and len({c["id"] for c in events[:-1]}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [
        whole["choices"][0]["finish_reason"]]
    if route == "chat":
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_a_stream_without_include_usage_has_no_usage_chunk(server):
    events = stream(server, "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 3, "temperature": 0})
    assert events[-1] == "[DONE]" and all(e["choices"] and "usage" not in e for e in events[:-1])


@pytest.mark.parametrize("stops, cut", [(["o w"], "hell"), (["xyz", "wor", "lo"], "hel"), ([], "hello world é!")])
def test_stop_text_never_shows_what_a_stop_string_will_cut(stops, cut):
    text = StopText(TOK, stops)
    shown = []
    for token in TOK.encode("hello world é!"):
        ended = text.push(token)
        shown.append(text.visible)
        if ended:
            break
    assert all(cut.startswith(v) for v in shown)  # nothing sent is ever taken back
    assert text.text == cut and text.stopped == bool(stops)
    assert "\ufffd" not in "".join(shown)  # half of "é" is held back, not sent as U+FFFD


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_stop_cuts_the_text_before_the_stop_string(server, route):
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    body = chat_body("base:r3", max_tokens=16) if route == "chat" else {"model": "base:r3", "prompt": "A claim",
                                                                         "max_tokens": 16, "temperature": 0}
    status, full = post(server, path, body)
    text = answer_text(route, full)
    stop = next(c for c in text[1:] if c != "\ufffd")  # the tiny model writes bytes, few of them printable
    cut = text[: text.find(stop)]
    for stops in (stop, ["never appears", stop]):
        status, answer = post(server, path, {**body, "stop": stops})
        assert status == 200 and answer_text(route, answer) == cut
        assert answer["choices"][0]["finish_reason"] == "stop"
        assert answer["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]  # the row ended early
        events = stream(server, path, {**body, "stop": stops})
        assert joined(route, events[:-1]) == cut and events[-2]["choices"][0]["finish_reason"] == "stop"


def test_models_by_id(server):
    for model in ("base", "base:r1", "r3"):
        with_id = server.url + f"/v1/models/{model}"
        conn = http.client.HTTPConnection("127.0.0.1", server.httpd.server_address[1], timeout=TIMEOUT_S)
        conn.request("GET", with_id.removeprefix(server.url))
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read()) == {"id": model, "object": "model",
                                                                           "owned_by": "minift"}
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", server.httpd.server_address[1], timeout=TIMEOUT_S)
    conn.request("GET", "/v1/models/base%3Anope")
    response = conn.getresponse()
    error = json.loads(response.read())["error"]
    conn.close()
    assert response.status == 404 and error["param"] == "model" and "model 'base:nope' does not exist" in \
        error["message"]


def test_an_adapter_named_alone_is_the_same_model_as_base_colon_name(server):
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0}
    (_, bare), (_, full) = post(server, "/v1/completions", {**body, "model": "r1"}), \
        post(server, "/v1/completions", {**body, "model": "base:r1"})
    assert bare["choices"][0]["text"] == full["choices"][0]["text"] and bare["model"] == "r1"


GOOD_PROMPT = {"model": "base", "prompt": "hi", "max_tokens": 2}
REFUSED = [
    ("/v1/completions", {**GOOD_PROMPT, "n": 2}, "n", "'n' is not supported by this server; leave it out (or send 1)"),
    ("/v1/completions", {**GOOD_PROMPT, "logprobs": 6}, "logprobs", "'logprobs' must be an integer in [0, 5]"),
    ("/v1/completions", {**GOOD_PROMPT, "logprobs": 2, "stream": True}, "logprobs", "are not streamed"),
    ("/v1/completions", {**GOOD_PROMPT, "echo": True}, "echo", "'echo' is not supported"),
    ("/v1/chat/completions", chat_body("base", tools=[{"type": "function"}]), "tools", "'tools' is not supported"),
    ("/v1/chat/completions", chat_body("base", top_logprobs=3), "top_logprobs", 'needs "logprobs": true'),
    ("/v1/chat/completions", chat_body("base", logprobs=True, top_logprobs=21), "top_logprobs", "[0, 20]"),
    ("/v1/chat/completions", chat_body("base", logprobs=1), "logprobs", "'logprobs' must be true or false"),
    ("/v1/completions", {**GOOD_PROMPT, "best_of": 2}, "best_of", "'best_of' is not supported"),
    ("/v1/completions", {**GOOD_PROMPT, "foo": 1}, "foo", "unknown field 'foo'; this route takes ["),
    ("/v1/completions", {**GOOD_PROMPT, "messages": CHAT}, "messages", "unknown field 'messages'"),
    ("/v1/chat/completions", {**chat_body("base"), "prompt": "x"}, "prompt", "unknown field 'prompt'"),
    ("/v1/completions", {**GOOD_PROMPT, "stop": ""}, "stop", "'stop' must be a non-empty string or a list"),
    ("/v1/completions", {**GOOD_PROMPT, "stop": ["a"] * 5}, "stop", "a list of at most 4"),
    ("/v1/completions", {**GOOD_PROMPT, "stop": [1]}, "stop", "'stop' must be"),
    ("/v1/completions", {**GOOD_PROMPT, "stream_options": {"include_usage": True}}, "stream_options",
     "with stream=true"),
    ("/v1/completions", {**GOOD_PROMPT, "stream": True, "stream_options": {"x": 1}}, "stream_options",
     "'stream_options' takes only"),
    ("/v1/completions", {**GOOD_PROMPT, "top_p": 1.5}, "top_p", "'top_p' must be in (0.0, 1.0], got 1.5"),
    ("/v1/completions", {**GOOD_PROMPT, "temperature": 2.5}, "temperature", "'temperature' must be in [0.0, 2.0]"),
    ("/v1/chat/completions", chat_body("base", max_completion_tokens=0), "max_completion_tokens",
     "'max_completion_tokens' must be in [1, "),
    ("/v1/chat/completions", {"model": "base"}, "messages", "'messages' must be a non-empty list"),
    ("/v1/chat/completions", {"model": "base", "messages": []}, "messages", "'messages' must be a non-empty list"),
    ("/v1/chat/completions", {"model": "base", "messages": ["hi"]}, "messages[0]",
     "messages[0] must be an object with only \"role\" and \"content\""),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "a", "name": "x"}]},
     "messages[0]", "messages[0] must be an object with only"),
    ("/v1/chat/completions", {"model": "base", "messages": [CHAT[0], {"role": "tool", "content": "a"}]},
     "messages[1].role", "messages[1].role must be one of ['system', 'user', 'assistant'], got \"tool\""),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content", "content parts are not supported"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi<|im_end|>"}]},
     "messages[0].content", "contains the control token '<|im_end|>'; remove it"),
    ("/v1/chat/completions", chat_body("base:nope"), "model", "model 'base:nope' does not exist"),
]


@pytest.mark.parametrize("path, body, param, message", REFUSED)
def test_what_is_not_supported_is_a_400_naming_the_field_in_openais_error_shape(server, path, body, param, message):
    status, answer = post(server, path, body)
    assert status == (404 if param == "model" else 400)
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert message in answer["error"]["message"]
    assert answer["error"]["param"] == param and answer["error"]["code"] == status
    assert answer["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [
    b'{"model": "base", "prompt": "hi", "temperature": NaN}',
    b'{"model": "base", "prompt": "hi", "top_p": Infinity}',
    b'{"model": "base", "prompt": "hi", "max_tokens": 2, "user": -Infinity}',
    b'{"model": "base", "prompt": "hi", "temperature": 1e400}',
    b'{"model": "base", "messages": [{"role": "user", "content": "x", "w": [NaN]}]}',
])
def test_non_finite_numbers_anywhere_are_refused_while_reading(server, raw):
    status, answer = post(server, "/v1/completions", raw)
    assert status == 400 and "every number must be finite" in answer["error"]["message"]


def test_a_huge_prompt_is_refused_by_its_length_before_it_is_tokenized(server, monkeypatch):
    calls = []
    monkeypatch.setattr(server.service.tokenizer, "encode", lambda text, *a: calls.append(text) or [])
    limit = server.service.max_prompt_chars
    assert limit == (CONTEXT - 1) * len("<|endoftext|>")  # bytes are one character, the longest special 13
    for path, body in [("/v1/completions", {"model": "base", "prompt": "a" * (limit + 1)}),
                       ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user",
                                                                                 "content": "a" * limit}]})]:
        status, answer = post(server, path, body)
        assert status == 400 and f"no text over {limit} characters fits the context of {CONTEXT} tokens" \
            in answer["error"]["message"]
    assert calls == []


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")  # the overflowing adapter's
@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_bad_and_good_requests_fired_together_the_good_ones_all_succeed(folders, batching):
    """Good requests (completions and chat, base and adapters, one streamed) together with bad
    ones: refused fields, NaN, a prompt too long, an unknown model, and an adapter whose rows
    overflow inside the batch. The five good ones and the overflowing one reach the batcher
    together: the static window ends when the sixth (max_batch) arrives; the continuous batcher
    is held between two steps until all six wait, so they join in one prefill."""
    server = new_server(folders, batching=batching)
    try:
        check_good_and_bad_together(server, folders, batching)
    finally:
        server.stop()


def check_good_and_bad_together(server, folders, batching):
    good = [("/v1/completions", {"model": "base", "prompt": "The claim", "max_tokens": 8, "temperature": 0}),
            ("/v1/completions", {"model": "base:r1", "prompt": "A policy", "max_tokens": 6, "temperature": 0}),
            ("/v1/chat/completions", chat_body("base:r3", max_tokens=7)),
            ("/v1/chat/completions", chat_body("base", max_tokens=5)),
            ("/v1/completions", {"model": "r3", "prompt": "Hi", "max_tokens": 9, "temperature": 0, "stream": True})]
    bad = [("/v1/completions", b'{"model": "base", "prompt": "hi", "temperature": NaN}', 400),
           ("/v1/completions", {"model": "base", "prompt": "x" * 2000}, 400),
           ("/v1/completions", {"model": "base", "prompt": "x", "n": 3}, 400),
           ("/v1/chat/completions", {"model": "base", "messages": [{"role": "robot", "content": "x"}]}, 400),
           ("/v1/completions", {"model": "base:missing", "prompt": "x"}, 404),
           ("/v1/completions", {"model": "base:overflow", "prompt": "Boom", "max_tokens": 4, "temperature": 0}, 500)]

    def send(item):
        path, body = item[:2]
        if isinstance(body, dict) and body.get("stream"):
            return 200, {"choices": [{"text": joined("completions", stream(server, path, body)[:-1])}]}
        return post(server, path, body)

    batcher, release = server.service.batcher, threading.Event()
    if batching == "static":
        batcher.window_s = 5.0
    else:
        held = threading.Event()
        threading.Thread(target=batcher.run_between_steps, args=(lambda: held.set() or release.wait(),)).start()
        assert held.wait(10)  # the batcher is between two steps now, and stays there until release
    with ThreadPoolExecutor(len(good) + len(bad)) as pool:
        pending = pool.map(send, good + bad)
        for _ in range(2000):  # at most 20 s for six requests to be parsed and queued
            if batcher.queue.qsize() == 6 or batching == "static":
                break
            time.sleep(0.01)
        release.set()
        answers = list(pending)
    sizes = server.service.engine.batch_sizes
    if batching == "static":
        assert 6 in sizes  # the overflowing row shared a batch with the good ones
    else:  # the six were prefilled together; the overflowing row left after it, the good ones ran on
        assert sizes[0] == 5, sizes
    for (path, body), (status, answer) in zip(good, answers):
        assert status == 200, answer
        route = "chat" if "chat" in path else "completions"
        text = (TOK.apply_chat_template(CHAT, add_generation_prompt=True) if route == "chat" else body["prompt"])
        adapter = {"base": None, "base:r1": "r1", "base:r3": "r3", "r3": "r3"}[body["model"]]
        assert answer_text(route, answer) == reference_text(folders, text, adapter, body["max_tokens"])
    for (_, _, status), (got, answer) in zip(bad, answers[len(good):]):
        assert got == status, answer
    assert "non-finite logits" in answers[-1][1]["error"]["message"]
    assert answers[-1][1]["error"]["type"] == "server_error"


def test_a_client_that_promises_more_body_than_it_sends_is_timed_out(folders):
    srv = new_server(folders, socket_timeout_s=0.5)
    try:
        assert srv.httpd.request_queue_size >= LISTEN_BACKLOG >= 128
        with socket.create_connection(srv.httpd.server_address[:2], timeout=TIMEOUT_S) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\"")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in body
        with socket.create_connection(srv.httpd.server_address[:2], timeout=TIMEOUT_S) as idle:
            assert idle.recv(1) == b""  # an idle connection is closed by the server, not kept forever
        assert post(srv, "/v1/completions", GOOD_PROMPT)[0] == 200
    finally:
        srv.stop()


def reference_logprobs(folders, ids: list[int], adapter, max_tokens: int, k: int):
    """(tokens, log p of each, the k likeliest ids per step) from the engine's recorded logits,
    by a plain float64 log-softmax: the numbers the routes must report. The model is float32 and
    the server's rows may share a batch, so the logits agree to float32 rounding: 1e-5."""
    engine = build_engine(server_base(), {a: folders[a] for a in [adapter] if a}, eos_id=TOK.eos_id)
    done = engine.generate([Request(ids, adapter, max_tokens)], record_logits=True)[0]
    logits = done.logits.astype(np.float64)
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    chosen = [float(logp[i, t]) for i, t in enumerate(done.tokens)]
    return done.tokens, chosen, [np.argsort(-row, kind="stable")[:k].tolist() for row in logp], logp


def test_completion_logprobs_are_the_models_log_softmax(server, folders):
    status, answer = post(server, "/v1/completions", {"model": "base:r1", "prompt": "The claim", "max_tokens": 6,
                                                      "temperature": 0, "logprobs": 3})
    assert status == 200, answer
    got = answer["choices"][0]["logprobs"]
    tokens, chosen, top, logp = reference_logprobs(folders, TOK.encode("The claim"), "r1", 6, 3)
    assert got["tokens"] == [TOK.decode([t]) for t in tokens]
    np.testing.assert_allclose(got["token_logprobs"], chosen, rtol=0, atol=1e-5)
    for step, (alternatives, ids) in enumerate(zip(got["top_logprobs"], top)):
        expected = {}
        for i in ids:  # partial characters all read U+FFFD: the likeliest of them keeps the key
            expected.setdefault(TOK.decode([i]), logp[step, i])
        assert list(alternatives) == list(expected)
        np.testing.assert_allclose(list(alternatives.values()), list(expected.values()), rtol=0, atol=1e-5)
    assert got["token_logprobs"][0] == max(got["top_logprobs"][0].values())  # greedy picks the likeliest
    assert got["text_offset"] == np.cumsum([0] + [len(t) for t in got["tokens"][:-1]]).tolist()


def test_chat_logprobs_in_openai_shape(server, folders):
    status, answer = post(server, "/v1/chat/completions", chat_body("base", max_tokens=5, logprobs=True,
                                                                    top_logprobs=2))
    assert status == 200, answer
    content = answer["choices"][0]["logprobs"]["content"]
    ids = TOK.encode(TOK.apply_chat_template(CHAT, add_generation_prompt=True))
    tokens, chosen, top, _ = reference_logprobs(folders, ids, None, 5, 2)
    assert [c["token"] for c in content] == [TOK.decode([t]) for t in tokens]
    np.testing.assert_allclose([c["logprob"] for c in content], chosen, rtol=0, atol=1e-5)
    assert [[a["token"] for a in c["top_logprobs"]] for c in content] == [[TOK.decode([i]) for i in t] for t in top]
    assert all(c["bytes"] == list(c["token"].encode()) for c in content)
    status, plain = post(server, "/v1/chat/completions", chat_body("base", max_tokens=5))
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"] == answer["choices"][0]["message"]


def test_a_token_id_prompt_and_a_one_string_list_equal_the_string_prompt(server):
    text = {"model": "base:r1", "prompt": "A policy", "max_tokens": 6, "temperature": 0}
    _, plain = post(server, "/v1/completions", text)
    for prompt in (TOK.encode("A policy"), ["A policy"], [TOK.encode("A policy")]):
        status, answer = post(server, "/v1/completions", {**text, "prompt": prompt})
        assert status == 200, answer
        assert answer["choices"][0]["text"] == plain["choices"][0]["text"]
        assert answer["usage"] == plain["usage"]


@pytest.mark.parametrize("prompt, message", [
    ([], "'prompt' must be a non-empty string or a non-empty list of token ids"),
    ([1, True], "'prompt' must be a non-empty string or a non-empty list of token ids"),
    ([1, 10**9], "prompt token ids must be in [0, "),
    ([[1, 2], [3]], "'prompt' holds 2 prompts"),
])
def test_bad_token_id_prompts_are_refused(server, prompt, message):
    status, answer = post(server, "/v1/completions", {"model": "base", "prompt": prompt, "max_tokens": 2})
    assert status == 400 and message in answer["error"]["message"], answer
