"""Adapters loaded and unloaded while the server runs: vLLM's /v1/load_lora_adapter and
/v1/unload_lora_adapter (issue 17). Off unless asked for, confined to --lora-root, every
adapter checked in full, and requests before, during and after a load or unload answered.

Every request has a timeout; each server is stopped by its fixture even when a test fails.
"""

import threading
import time

import numpy as np
import pytest
from serve_fixtures import base_model, write_adapters

from minift.cli import build_parser, main
from minift.data import ByteTokenizer
from minift.io import load_file, save_file, save_model
from minift.nn import Linear4bit
from minift.serve.engine import build_engine
from minift.serve.server import CompletionServer
from minift.studies.serve_bench import post_json

TIMEOUT_S = 60
MAX_RANK = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The --lora-root: r1, r3 and r8 (rank 8, over MAX_RANK) inside it, r2 outside it."""
    top = tmp_path_factory.mktemp("runtime")
    write_adapters(top / "root", names=["r1", "r3", "r8"])
    write_adapters(top / "outside", names=["r2"])
    return top / "root"


def start(folders, **server_kwargs):
    tok = ByteTokenizer()
    model = base_model(np.float32, vocab_size=tok.vocab_size, max_seq_len=64)
    engine = build_engine(model, folders, n_slots=2, max_batch=4, eos_id=tok.eos_id,
                          wrap_all=True, max_rank=MAX_RANK)
    return CompletionServer(engine, tok, port=0, window_ms=5, timeout_s=TIMEOUT_S, **server_kwargs).start()


@pytest.fixture
def server(root):
    srv = start({"r1": root / "r1"}, allow_runtime_lora=True, lora_root=root)
    yield srv
    srv.stop()


def post(server, route, body):
    return post_json(f"{server.url}/v1/{route}", body, TIMEOUT_S)


def ask(server, model, prompt="Hello"):
    return post(server, "completions", {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0})


def load(server, name, path):
    return post(server, "load_lora_adapter", {"lora_name": name, "lora_path": str(path)})


def unload(server, name):
    return post(server, "unload_lora_adapter", {"lora_name": name})


def test_the_routes_are_off_unless_the_server_was_started_with_them(root):
    srv = start({})
    try:
        for route in ("load_lora_adapter", "unload_lora_adapter"):
            status, answer = post(srv, route, {"lora_name": "r3", "lora_path": "r3"})
            assert status == 404 and "start the server with --allow-runtime-lora --lora-root DIR" in \
                answer["error"]["message"]
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="allow_runtime_lora needs lora_root \\(--lora-root\\)"):
        start({}, allow_runtime_lora=True)


def test_load_serve_unload_and_the_answers_of_vllms_routes(server, root):
    assert ask(server, "base:r3")[0] == 404
    status, answer = load(server, "r3", "r3")  # relative to the root
    assert status == 200 and answer["status"] == "loaded", answer
    assert ask(server, "base:r3")[0] == 200 and ask(server, "r3")[0] == 200
    assert "base:r3" in [m["id"] for m in server.service.models()["data"]]
    status, answer = load(server, "r3", root / "r3")  # twice: 400, as vLLM answers
    assert status == 400 and "'r3' is already loaded; unload it first" in answer["error"]["message"]
    assert unload(server, "r3") == (200, {"object": "lora_adapter", "lora_name": "r3", "status": "unloaded",
                                          "message": "Success: LoRA adapter 'r3' removed"})
    status, answer = ask(server, "base:r3")
    assert status == 404 and answer["error"]["message"] == \
        "model 'base:r3' does not exist; available: ['base', 'base:r1']"
    status, answer = unload(server, "r3")
    assert status == 404 and answer["error"] == {"message": "lora_name: unknown adapter 'r3'; loaded: ['r1']",
                                                 "type": "invalid_request_error", "param": "lora_name",
                                                 "code": 404}
    assert server.service.engine.slots.resident.keys() <= {"r1"}


def test_paths_outside_the_root_are_refused(server, root, tmp_path):
    (root / "link").symlink_to(root.parent / "outside" / "r2")
    try:
        for path in ["../outside/r2", str(root.parent / "outside" / "r2"), "link", "r3/../../outside/r2"]:
            status, answer = load(server, "r2", path)
            assert status == 403 and answer["error"]["param"] == "lora_path", path
            assert "outside the server's --lora-root" in answer["error"]["message"]
    finally:
        (root / "link").unlink()
    assert "r2" not in server.service.engine.library


@pytest.mark.parametrize("body, message", [
    ({"lora_name": "x"}, "exactly the fields ['lora_name', 'lora_path']"),
    ({"lora_name": "x", "lora_path": "r3", "extra": 1}, "exactly the fields"),
    ({"lora_name": 3, "lora_path": "r3"}, "'lora_name' must be a non-empty string, got 3"),
    ({"lora_name": "a:b", "lora_path": "r3"}, "adapter name 'a:b' must be 1-64 letters"),
    ({"lora_name": "x", "lora_path": "missing"}, "missing: no such folder"),
    ({"lora_name": "big", "lora_path": "r8"}, "rank 8 is over the slot rank 4 of this server; restart it with "
                                             "--max-lora-rank 8 or more"),
])
def test_a_bad_load_is_a_400_naming_the_problem(server, body, message):
    status, answer = post(server, "load_lora_adapter", body)
    assert status == 400
    assert message in answer["error"]["message"], answer
    assert server.service.engine.library.names() == ["r1"]


def test_an_adapter_with_nan_weights_is_refused_at_runtime(server, root):
    bad = root / "nan"
    bad.mkdir(exist_ok=True)
    tensors = load_file(root / "r3" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = np.nan
    save_file(tensors, bad / "adapter_model.safetensors")
    (bad / "adapter_config.json").write_text((root / "r3" / "adapter_config.json").read_text())
    status, answer = load(server, "nan", "nan")
    assert status == 400 and f"tensor '{key}' holds NaN or infinite values" in answer["error"]["message"]


def test_requests_before_during_and_after_loads_and_unloads_all_succeed(server):
    """Threads keep asking for the base and for r1 while the admin loads and unloads r3 again and
    again: every answer is a 200 with the same greedy text as before the churn."""
    expected = {model: ask(server, model)[1]["choices"][0]["text"] for model in ("base", "base:r1")}
    stop, answers = threading.Event(), []

    def client(model):
        while not stop.is_set():
            answers.append((model, *ask(server, model)))

    threads = [threading.Thread(target=client, args=(m,)) for m in ("base", "base:r1", "base:r1")]
    for t in threads:
        t.start()
    def answered_since(seen: int) -> None:  # the admin call comes while the clients are busy
        deadline = time.monotonic() + TIMEOUT_S
        while len(answers) < seen + len(threads) and time.monotonic() < deadline:
            time.sleep(0.005)

    try:
        for _ in range(4):
            answered_since(len(answers))
            assert load(server, "r3", "r3")[0] == 200
            status, answer = ask(server, "base:r3")
            assert status == 200, answer
            answered_since(len(answers))
            assert unload(server, "r3")[0] == 200
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT_S)
    assert len(answers) >= 8 * len(threads)
    for model, status, answer in answers:
        assert status == 200, answer
        assert answer["choices"][0]["text"] == expected[model]


def test_cli_flags(tmp_path, root, monkeypatch, capsys):
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert (args.allow_runtime_lora, args.lora_root, args.max_lora_rank, args.quantize) == (False, None, 16, None)
    tok = ByteTokenizer()
    save_model(base_model(np.float32, vocab_size=tok.vocab_size), tmp_path / "model")
    seen = []

    def serve_once(self):
        engine = self.service.engine
        seen.append((self.service.lora_root, engine.slots.rank, len(engine.layers),
                     isinstance(engine.layers["model.layers.0.mlp.up_proj"].base_layer, Linear4bit)))
        self.start()
        try:
            seen.append(load(self, "r3", "r3")[0])
        finally:
            self.stop()

    monkeypatch.setattr(CompletionServer, "serve_forever", serve_once)
    assert main(["serve", "--model", str(tmp_path / "model"), "--port", "0", "--allow-runtime-lora",
                 "--lora-root", str(root), "--max-lora-rank", "8", "--quantize", "nf4"]) == 0
    assert seen == [(root.resolve(), 8, 14, True), 200]
    for flags in (["--allow-runtime-lora"], ["--lora-root", str(root)]):
        assert main(["serve", "--model", str(tmp_path / "model"), *flags]) == 1
        assert "--allow-runtime-lora and --lora-root DIR (the folder whose adapters clients may load) go " \
               "together" in capsys.readouterr().err
