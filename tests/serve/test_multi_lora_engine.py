"""Batched multi-adapter generation equals each request alone with its adapter merged (issue 7).

Reference: ``PeftModel.from_pretrained(copy of base).merge_and_unload()`` run on the request
alone, no padding, no batch. Tolerance: float64 logits to 1e-9 (the only difference is rounding:
W x + s B (A x) against (W + s B A) x); float32 to 2e-4. Greedy tokens must be equal.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_fixtures import (
    ADAPTERS,
    base_model,
    make_engine,
    merged_reference,
    write_overflowing_adapter,
)
from strategies import serving_requests

from minift.autograd.function import op_counts
from minift.backend import to_numpy, xp
from minift.cuda import kernels
from minift.serve import NO_ADAPTER, Request, lora_gather_delta
from minift.serve import engine as engine_module

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)


def reference_run(model, request: Request, eos_id):
    """(tokens, logits) of ``request`` alone: greedy tokens cut after eos, and the logits that
    chose each token (one forward over prompt + tokens, no cache)."""
    tokens = model.generate([request.prompt], request.max_tokens, eos_id=eos_id)[0].tolist()
    if eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id) + 1]
    seq = np.array([request.prompt + tokens[:-1]])
    return tokens, to_numpy(model(seq).data)[0, len(request.prompt) - 1:]


def check_against_merged(engine, folders, requests, eos_id, dtype, tol):
    done = engine.generate(requests, record_logits=True)
    references = {}
    for request, completion in zip(requests, done):
        if request.adapter not in references:
            references[request.adapter] = merged_reference(folders.get(request.adapter), dtype)
        tokens, logits = reference_run(references[request.adapter], request, eos_id)
        assert completion.tokens == tokens, request
        np.testing.assert_allclose(completion.logits, logits, rtol=tol, atol=tol)
        assert completion.finish_reason == ("stop" if tokens[-1] == eos_id else "length")
        assert completion.prompt_tokens == len(request.prompt)
    return done


@settings(fixture_ok, max_examples=25)
@given(mix=serving_requests(names=list(ADAPTERS), vocab_size=48, max_prompt=12, max_new=6),
       n_slots=st.integers(1, 4), max_batch=st.integers(1, 5), eos_id=st.none() | st.integers(0, 47))
def test_every_row_equals_its_request_alone_with_the_adapter_merged(backend, folders, mix, n_slots, max_batch,
                                                                     eos_id):
    engine = make_engine(folders, n_slots=n_slots, max_batch=max_batch, eos_id=eos_id)
    requests = [Request(prompt, adapter, max_tokens) for prompt, adapter, max_tokens in mix]
    check_against_merged(engine, folders, requests, eos_id, np.float64, 1e-9)
    assert sum(engine.batch_sizes) == len(requests) and max(engine.batch_sizes) <= max_batch
    assert engine.slots.stats.hits + engine.slots.stats.misses >= len({r.adapter for r in requests} - {None})


def test_float32_batch_of_every_adapter_and_the_base(backend, folders):
    engine = make_engine(folders, dtype=np.float32, n_slots=4)
    rng = np.random.default_rng(0)
    requests = [Request(rng.integers(0, 48, n).tolist(), a, 8)
                for n, a in zip([3, 11, 1, 7, 5], [None, *ADAPTERS])]
    check_against_merged(engine, folders, requests, None, np.float32, 2e-4)
    assert engine.batch_sizes == [5]


def test_the_adapters_change_the_output_so_the_comparison_means_something(folders):
    """Each adapter moves the logits well beyond the tolerance, and the base rows in a mixed
    batch equal the base model: a wrong slot or a delta on a base row would be caught."""
    prompt = [3, 1, 4, 1, 5]
    base = to_numpy(base_model()(np.array([prompt])).data)
    for name, folder in folders.items():
        adapted = to_numpy(merged_reference(folder)(np.array([prompt])).data)
        assert np.abs(adapted - base).max() > 1e-2, name


def test_a_row_that_hits_eos_stops_and_the_others_go_on(folders):
    requests = [Request([5, 6, 7], "r8", 6), Request([1, 2], "r1", 6), Request([9, 9, 9, 9], None, 6)]
    free = make_engine(folders).generate(requests)
    eos_id = free[0].tokens[1]  # row 0 will now stop at its second token
    stopped = check_against_merged(make_engine(folders, eos_id=eos_id), folders, requests, eos_id, np.float64, 1e-9)
    assert stopped[0].tokens == free[0].tokens[:2] and stopped[0].finish_reason == "stop"


def dense_delta(x, A, B, scales, idx):
    out = np.zeros((*x.shape[:-1], B.shape[1]))
    for b, i in enumerate(idx):
        if i != NO_ADAPTER:
            out[b] = scales[i] * x[b] @ (B[i] @ A[i]).T
    return out


@settings(fixture_ok, max_examples=40)
@given(data=st.data(), rows=st.integers(1, 5), tokens=st.integers(1, 4), d_in=st.integers(1, 9),
       d_out=st.integers(1, 9), slots=st.integers(1, 4), rank=st.integers(1, 6))
def test_gathered_delta_equals_the_dense_formula_per_row(backend, data, rows, tokens, d_in, d_out, slots, rank):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(size=(rows, tokens, d_in))
    A, B, scales = rng.normal(size=(slots, rank, d_in)), rng.normal(size=(slots, d_out, rank)), rng.normal(size=slots)
    idx = np.array(data.draw(st.lists(st.integers(NO_ADAPTER, slots - 1), min_size=rows, max_size=rows)))
    got = to_numpy(lora_gather_delta(xp.asarray(x), xp.asarray(A), xp.asarray(B), xp.asarray(scales), idx))
    np.testing.assert_allclose(got, dense_delta(x, A, B, scales, idx), rtol=1e-12, atol=1e-12)


@settings(fixture_ok, max_examples=25)
@given(seed=st.integers(0, 2**32 - 1), rank=st.integers(1, 5), pad=st.integers(1, 6))
def test_zero_padding_to_a_larger_rank_changes_nothing(backend, seed, rank, pad):
    """Padded rows of A give zeros in A x, and B's padded columns never read them."""
    rng = np.random.default_rng(seed)
    x, A, B = rng.normal(size=(2, 3, 7)), rng.normal(size=(1, rank, 7)), rng.normal(size=(1, 5, rank))
    A_pad = np.concatenate([A, np.zeros((1, pad, 7))], axis=1)
    B_pad = np.concatenate([B, np.zeros((1, 5, pad))], axis=2)
    x, scales, idx = xp.asarray(x), xp.ones(1), np.array([0, 0])
    exact = lora_gather_delta(x, xp.asarray(A), xp.asarray(B), scales, idx)
    padded = lora_gather_delta(x, xp.asarray(A_pad), xp.asarray(B_pad), scales, idx)
    np.testing.assert_allclose(to_numpy(padded), to_numpy(exact), rtol=1e-13, atol=1e-13)


# ---- the BGMV kernel path (kernels/bgmv.cu: the CPU emulator here, the GPU when present) ------
@settings(fixture_ok, max_examples=15)
@given(data=st.data(), rows=st.integers(1, 4), tokens=st.integers(1, 3), slots=st.integers(1, 3),
       rank=st.integers(1, 5))
def test_the_bgmv_kernel_path_equals_the_reference(backend, data, rows, tokens, slots, rank):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    arrays = [rng.normal(size=s).astype(np.float32) for s in
              [(rows, tokens, 11), (slots, rank, 11), (slots, 6, rank), (slots,)]]
    idx = np.array(data.draw(st.lists(st.integers(NO_ADAPTER, slots - 1), min_size=rows, max_size=rows)))
    x, A, B, scales = (xp.asarray(a) for a in arrays)
    with kernels.lora_kernels("off"):
        reference = to_numpy(lora_gather_delta(x, A, B, scales, idx))
    launched = op_counts["kernel:bgmv"]
    with kernels.lora_kernels("on"):
        got = to_numpy(lora_gather_delta(x, A, B, scales, idx))
    assert op_counts["kernel:bgmv"] == launched + 1
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


def test_a_mixed_batch_on_the_bgmv_kernel_equals_the_merged_reference(backend, folders):
    engine = make_engine(folders, dtype=np.float32, n_slots=4)
    requests = [Request([7, 3, 9], "r3", 5), Request([1], None, 5), Request([2, 4, 6, 8, 10], "r8", 5)]
    launched = op_counts["kernel:bgmv"]
    with kernels.lora_kernels("on"):
        check_against_merged(engine, folders, requests, None, np.float32, 2e-4)
    assert op_counts["kernel:bgmv"] > launched


@pytest.mark.parametrize("request_, error, message", [
    (Request([], None, 2), ValueError, "the prompt is empty"),
    (Request([1, 48], None, 2), ValueError, r"prompt token ids must be in \[0, 48\), got 1..48"),
    (Request([1], "nope", 2), KeyError, "unknown adapter 'nope'"),
    (Request([1], None, 0), ValueError, "max_tokens must be a positive integer"),
    (Request([1] * 30, None, 11), ValueError, "together more than the context of 40 tokens"),
    (Request([1], None, 2, temperature=-0.5), ValueError, "temperature must be a finite number >= 0, got -0.5"),
    (Request([1], None, 2, temperature=float("nan")), ValueError, "temperature must be a finite number >= 0"),
    (Request([1], None, 2, temperature=float("inf")), ValueError, "temperature must be a finite number >= 0"),
    (Request([1], None, 2, top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (Request([1], None, 2, top_p=float("nan")), ValueError, r"top_p must be in \(0, 1\]"),
    (Request([1], None, 2, seed=-1), ValueError, "seed must be a non-negative integer"),
])
def test_a_bad_request_is_refused_before_anything_runs(folders, request_, error, message):
    engine = make_engine(folders)
    with pytest.raises(error, match=message):
        engine.generate([Request([1, 2], "r1", 2), request_])
    assert engine.batch_sizes == [] and engine.slots.stats.misses == 0


ALONE = [Request([1, 2, 3], "r1", 4), Request([5, 6], None, 3), Request([7], "r3", 5)]


def test_a_row_with_non_finite_logits_fails_alone_and_the_others_are_unchanged(tmp_path, folders):
    engine = make_engine({**folders, "overflow": write_overflowing_adapter(tmp_path)}, dtype=np.float32)
    alone = [engine.generate([r])[0] for r in ALONE]
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is the point of the test
        done = engine.generate([ALONE[0], Request([1, 2], "overflow", 4), *ALONE[1:]])
    assert done[1].finish_reason == "error" and done[1].tokens == []
    assert "non-finite logits" in done[1].error
    assert [c.tokens for c in done[:1] + done[2:]] == [c.tokens for c in alone]
    assert all(c.error is None for c in alone)
    assert engine.batch_sizes[len(alone):] == [4, 1]  # the others were not stopped; the failed row retried alone


def test_a_failing_on_token_ends_its_row_only_and_returning_true_stops_it(folders):
    engine = make_engine(folders)
    alone = [engine.generate([r])[0] for r in ALONE]

    def broken(token):
        raise RuntimeError("client callback broke")

    seen = []
    stop_after_two = Request([1, 2], "r8", 6, on_token=lambda t: seen.append(t) or len(seen) == 2)
    done = engine.generate([*ALONE, Request([4, 4], "r1", 5, on_token=broken), stop_after_two])
    assert [c.tokens for c in done[:3]] == [c.tokens for c in alone]
    assert done[3].finish_reason == "error" and "client callback broke" in done[3].error
    assert len(done[3].tokens) == 1  # it failed after its first token, so it was not run again
    assert done[4].finish_reason == "stop" and done[4].tokens == seen and len(seen) == 2


def test_a_request_that_breaks_the_batched_forward_is_run_again_alone_and_fails_alone(folders, monkeypatch):
    engine = make_engine(folders)
    alone = [engine.generate([r])[0] for r in ALONE]
    forward = type(engine.model).forward

    def poisoned(self, ids, *args, **kwargs):  # token 47 in a prompt breaks the forward
        if (np.asarray(ids) == 47).any():
            raise ValueError("poisoned input")
        return forward(self, ids, *args, **kwargs)

    monkeypatch.setattr(type(engine.model), "forward", poisoned)
    sizes = len(engine.batch_sizes)
    done = engine.generate([*ALONE, Request([3, 47], None, 2)])
    assert [c.tokens for c in done[:3]] == [c.tokens for c in alone]
    assert done[3].finish_reason == "error" and "poisoned input" in done[3].error
    assert engine.batch_sizes[sizes:] == [4, 1, 1, 1, 1]  # the batch, then each row alone


def test_the_recorded_batch_sizes_are_bounded(folders, monkeypatch):
    monkeypatch.setattr(engine_module, "MAX_RECORDED", 3)
    engine = make_engine(folders)
    for n in range(1, 6):
        engine.generate([Request([1], None, 1)] * n)
    assert engine.batch_sizes == [3, 4, 5]  # the latest three, in order
