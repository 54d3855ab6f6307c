"""The load generator of ``minift bench-serve``: the Poisson schedule, the percentiles, and short
open-loop runs against a tiny in-process server whose counts must add up."""

import json
import math

import numpy as np
import pytest

from minift.cli import main
from minift.data import ByteTokenizer
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.serve.engine import build_engine
from minift.serve.server import CompletionServer
from minift.studies.serve_bench import (
    Arrival,
    LoadSpec,
    load_schedule,
    percentile,
    poisson_arrival_times,
    printable_text_only,
    run_load,
    send_open_loop,
    write_random_adapter,
)

TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=96)


def test_poisson_gaps_are_exponential_with_mean_one_over_rate():
    """20,000 gaps at 5/s. The mean of n exponential gaps has a relative standard deviation of
    1/sqrt(n) = 0.71 %, so 3 % is over four of them; an exponential gap exceeds its mean with
    probability exp(-1) = 0.368 (standard deviation 0.0034 here; tolerance 0.015), which fixed
    or uniform gaps would not."""
    rate = 5.0
    times = poisson_arrival_times(20_001, rate, np.random.default_rng(7))
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps >= 0).all()
    assert abs(gaps.mean() * rate - 1) < 0.03
    assert abs((gaps > 1 / rate).mean() - math.exp(-1)) < 0.015


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another():
    spec = LoadSpec(requests=50, rate=10.0, seed=3)
    adapters = ["a", "b", "c"]
    assert load_schedule(spec, adapters) == load_schedule(spec, adapters)
    other = load_schedule(LoadSpec(requests=50, rate=10.0, seed=4), adapters)
    assert [a.at_s for a in other] != [a.at_s for a in load_schedule(spec, adapters)]


def test_the_schedule_draws_within_its_ranges_and_mixes_models():
    spec = LoadSpec(requests=400, rate=10.0, prompt_words=(3, 7), max_tokens=(2, 9), base_share=0.25)
    schedule = load_schedule(spec, ["a", "b"])
    words = [len(a.body["prompt"].split()) for a in schedule]
    tokens = [a.body["max_tokens"] for a in schedule]
    assert (min(words), max(words)) == (3, 7) and (min(tokens), max(tokens)) == (2, 9)
    models = [a.body["model"] for a in schedule]
    assert set(models) == {"base", "base:a", "base:b"}
    assert abs(models.count("base") / len(models) - 0.25) < 0.08  # binomial sd 0.022
    assert all(a.body["stream"] and a.body["stream_options"] == {"include_usage": True} for a in schedule)
    assert {a.body["model"] for a in load_schedule(spec, [])} == {"base"}


@pytest.mark.parametrize("field, value", [("requests", 0), ("rate", 0.0), ("prompt_words", (5, 2)),
                                          ("max_tokens", (0, 4)), ("base_share", 1.5)])
def test_a_load_spec_out_of_range_names_the_flag(field, value):
    with pytest.raises(ValueError, match="--" + field.replace("_", "-")):
        LoadSpec(**{field: value})


def test_percentile_is_the_nearest_rank():
    assert percentile(range(1, 101), 50) == 50 and percentile(range(1, 101), 99) == 99
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and percentile([5.0], 99) == 5.0
    assert percentile([1, 2, 3], 100) == 3 and math.isnan(percentile([], 50))
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 50, 333):
        values = rng.exponential(1.0, n)
        for q in (1, 25, 50, 90, 99, 100):  # numpy's inverted CDF is the same definition
            assert percentile(values, q) == np.percentile(values, q, method="inverted_cdf")
    with pytest.raises(ValueError, match="q must be in"):
        percentile([1.0], 0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tok = ByteTokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, **TINY), seed=0)
    printable_text_only(model)
    folder = tmp_path_factory.mktemp("adapters")
    adapters = {name: write_random_adapter(model, folder / name, rank, seed=i)
                for i, (name, rank) in enumerate([("a", 2), ("b", 4)])}
    return build_engine(model, adapters, n_slots=2, max_batch=8, eos_id=tok.eos_id), tok


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_a_short_run_answers_every_request_and_its_counts_add_up(engine, batching):
    engine, tok = engine
    spec = LoadSpec(requests=8, rate=200.0, prompt_words=(1, 6), max_tokens=(2, 6), seed=1)
    batches_before = len(engine.batch_sizes)
    report = run_load(engine, tok, spec, batching, window_ms=5)
    schedule = load_schedule(spec, ["a", "b"])
    assert (report["requests"], report["completed"], report["failed"], report["failures"]) == (8, 8, 0, [])
    outcomes = report["outcomes"]
    assert [o["model"] for o in outcomes] == [a.body["model"] for a in schedule]
    assert report["output_tokens"] == sum(o["completion_tokens"] for o in outcomes)
    assert report["prompt_tokens"] == sum(len(tok.encode(a.body["prompt"])) for a in schedule)
    for o, arrival in zip(outcomes, schedule):
        limit = arrival.body["max_tokens"]
        assert o["completion_tokens"] == limit if o["finish_reason"] == "length" else o["completion_tokens"] <= limit
        assert 0 < o["ttft_s"] <= o["latency_s"]
    assert report["wall_s"] == max(o["sent_s"] + o["latency_s"] for o in outcomes)
    assert report["tokens_per_s"] == report["output_tokens"] / report["wall_s"]
    assert report["ttft_s"]["p50"] <= report["ttft_s"]["p99"] <= report["latency_s"]["p99"]
    recorded = report["server_stats"]["batch_sizes"][batches_before - len(engine.batch_sizes):]
    if batching == "static":
        assert sum(recorded) == 8  # each request in one batch
    else:  # rows per decode step: every token but the one each request's prefill gave
        assert sum(recorded) == report["output_tokens"] - 8


def test_refused_requests_are_counted_as_failures_not_raised(engine):
    engine, tok = engine
    good = load_schedule(LoadSpec(requests=1, max_tokens=(2, 2)), ["a"])[0].body
    schedule = [Arrival(0.0, good), Arrival(0.0, {**good, "model": "base:nope"}),
                Arrival(0.0, {**good, "temperature": 5})]
    with CompletionServer(engine, tok, port=0, window_ms=5) as server:
        outcomes, _ = send_open_loop(server.url, schedule, timeout_s=30)
    assert [o.error is None for o in outcomes] == [True, False, False]
    assert outcomes[1].error.startswith("HTTP 404") and outcomes[2].error.startswith("HTTP 400")
    assert outcomes[0].completion_tokens == 2


def test_cli_bench_serve_prints_the_report_and_writes_json(tmp_path, capsys):
    out_json = tmp_path / "load.json"
    assert main(["bench-serve", "--requests", "4", "--rate", "100", "--adapters", "2", "--slots", "1",
                 "--max-tokens", "3", "--prompt-words", "2,4", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "4 requests, Poisson arrivals at 100/s, seed 0: 4 completed, 0 failed" in out
    report = json.loads(out_json.read_text())
    assert report["output_tokens"] == 12 and f"{report['tokens_per_s']:.1f} tokens/s" in out
    assert report["spec"]["max_tokens"] == [3, 3]
