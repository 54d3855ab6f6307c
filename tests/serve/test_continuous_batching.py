"""Continuous batching (``minift.serve.Scheduler``): every row equals its request served alone.

Requests arrive at chosen decode steps, join the running batch mid-flight, and leave early (eos,
``max_tokens``, a stop). Reference: ``engine.generate([request])``, the request alone in a batch
of one, which tests/serve/test_multi_lora_engine.py holds to the merged adapter. Tolerance:
float64 logits to 1e-10 (padding is masked exactly; only the rounding of different batch sizes
and widths remains); greedy tokens equal.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_fixtures import ADAPTERS, make_engine
from strategies import serving_requests

from minift.serve import Request, Scheduler

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)


def run_schedule(scheduler: Scheduler, arrivals: dict[int, list[Request]]):
    """Add ``arrivals[step]`` before each step; -> {id(request): completion}."""
    done, step = {}, 0
    while scheduler.busy or any(s >= step for s in arrivals):
        for request in arrivals.get(step, []):
            scheduler.add(request)
        for request, completion in scheduler.step():
            done[id(request)] = completion
        step += 1
    return done


def check_alone(engine, requests, done, tol=1e-10):
    for request in requests:
        alone = engine.generate([request], record_logits=True)[0]
        got = done[id(request)]
        assert got.tokens == alone.tokens, request
        assert got.finish_reason == alone.finish_reason
        np.testing.assert_allclose(got.logits, alone.logits, rtol=tol, atol=tol)


def test_requests_that_join_mid_flight_and_leave_early_equal_their_runs_alone(folders):
    engine = make_engine(folders, n_slots=4, max_batch=8, eos_id=7)
    arrivals = {
        0: [Request([1, 2, 3, 4, 5], "r1", 9), Request([9], None, 3)],
        2: [Request([4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4], "r3", 6)],  # longer than anything running
        3: [Request([2, 3], "r8", 1), Request([5, 6, 7, 8], "r2", 8)],  # one token only: leaves at once
        6: [Request([11, 12, 13], "r1", 5), Request([1], None, 4)],
    }
    scheduler = Scheduler(engine, record_logits=True)
    done = run_schedule(scheduler, arrivals)
    sizes = list(engine.batch_sizes)
    check_alone(engine, [r for batch in arrivals.values() for r in batch], done)
    # rows per decode step: the base request leaves after step 1 and the r3 one takes its place
    # at step 2; at step 3 the one-token request ends in its prefill while r2 joins; two join at
    # step 6 as r3 ends; then rows leave one by one
    assert sizes == [2, 2, 2, 3, 3, 3, 5, 4, 3, 2]


def test_a_join_keeps_the_running_rows_tokens_and_logits(folders):
    """The same early request, once alone and once with others joining it at steps 1..4."""
    engine = make_engine(folders, eos_id=None)
    first = Request([3, 1, 4, 1, 5], "r8", 8)
    arrivals = {0: [first], **{step: [Request([step + 20] * (3 * step), "r3", 3)] for step in range(1, 5)}}
    done = run_schedule(Scheduler(engine, record_logits=True), arrivals)
    check_alone(engine, [first, *[r for s in range(1, 5) for r in arrivals[s]]], done)


@settings(fixture_ok, max_examples=20)
@given(mix=serving_requests(names=list(ADAPTERS), vocab_size=48, max_prompt=10, max_new=6, max_requests=7),
       steps=st.lists(st.integers(0, 6), min_size=7, max_size=7), n_slots=st.integers(1, 4),
       max_batch=st.integers(1, 5), eos_id=st.none() | st.integers(0, 47))
def test_any_arrival_schedule_gives_every_request_its_run_alone(folders, mix, steps, n_slots, max_batch, eos_id):
    engine = make_engine(folders, n_slots=n_slots, max_batch=max_batch, eos_id=eos_id)
    requests = [Request(prompt, adapter, new) for prompt, adapter, new in mix]
    arrivals: dict[int, list[Request]] = {}
    for request, step in zip(requests, steps):
        arrivals.setdefault(step, []).append(request)
    done = run_schedule(Scheduler(engine, record_logits=True), arrivals)
    assert len(done) == len(requests)
    assert max(engine.batch_sizes, default=0) <= max_batch
    check_alone(engine, requests, done)


def test_admission_respects_the_slots_and_is_first_come_first_served(folders):
    """With 2 slots, a third adapter waits until a running adapter's rows leave; the request
    behind it waits too, even though its adapter is running (no overtaking)."""
    engine = make_engine(folders, n_slots=2, max_batch=8)
    long_r1, short_r3 = Request([1, 2], "r1", 6), Request([3], "r3", 2)
    blocked_r8, behind_r1 = Request([4], "r8", 2), Request([5], "r1", 2)
    scheduler = Scheduler(engine)
    for request in (long_r1, short_r3, blocked_r8, behind_r1):
        scheduler.add(request)
    finished_at = {}
    step = 0
    while scheduler.busy:
        for request, _ in scheduler.step():
            finished_at[id(request)] = step
        assert len({row.request.adapter for row in scheduler.running.rows} - {None}) <= 2
        step += 1
    # each step gives a newcomer two tokens (its prefill's and the decode's): r3 leaves at step 0;
    # r8 joins at step 1, and so does the r1 request behind it, which could have joined at step 0
    assert finished_at[id(short_r3)] == 0
    assert finished_at[id(blocked_r8)] == finished_at[id(behind_r1)] == 1
    assert finished_at[id(long_r1)] == 4


def test_a_row_that_fails_ends_alone_and_the_running_rows_go_on(folders):
    engine = make_engine(folders)
    good = [Request([1, 2, 3], "r1", 5), Request([4], None, 5)]
    alone = [engine.generate([r])[0].tokens for r in good]

    def broken(token):
        raise RuntimeError("client callback broke")

    scheduler = Scheduler(engine)
    done = run_schedule(scheduler, {0: good[:1], 1: [Request([6, 6], "r8", 4, on_token=broken)], 2: good[1:]})
    assert [done[id(r)].tokens for r in good] == alone
    failed = [c for c in done.values() if c.finish_reason == "error"]
    assert len(failed) == 1 and "client callback broke" in failed[0].error


def test_a_newcomer_that_breaks_the_prefill_fails_alone(folders, monkeypatch):
    engine = make_engine(folders)
    forward = type(engine.model).forward

    def poisoned(self, ids, *args, **kwargs):  # token 47 in a prompt breaks the forward
        if (np.asarray(ids) == 47).any():
            raise ValueError("poisoned input")
        return forward(self, ids, *args, **kwargs)

    good = [Request([1, 2, 3], "r1", 4), Request([5, 6], "r3", 4), Request([2], None, 3)]
    alone = [engine.generate([r])[0].tokens for r in good]
    monkeypatch.setattr(type(engine.model), "forward", poisoned)
    bad = Request([3, 47], None, 2)
    done = run_schedule(Scheduler(engine), {0: good[:1], 2: [good[1], bad, good[2]]})
    assert [done[id(r)].tokens for r in good] == alone
    assert done[id(bad)].finish_reason == "error" and "poisoned input" in done[id(bad)].error


def test_a_bad_request_is_refused_when_added(folders):
    scheduler = Scheduler(make_engine(folders))
    with pytest.raises(KeyError, match="unknown adapter"):
        scheduler.add(Request([1], "nope", 2))
    with pytest.raises(ValueError, match="temperature"):
        scheduler.add(Request([1], None, 2, temperature=float("nan")))
    assert not scheduler.busy
