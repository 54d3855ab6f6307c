"""Row blocks on threads (minift/autograd/parallel.py) and the ops that use them.

The promise is "the same bits as one call on all rows". Each op test runs forward and backward
once on one thread (the reference: one block) and again with the work forced onto 2, 3 and
7 threads (``MIN_ELEMENTS_PER_THREAD`` lowered to 1 so small arrays split too), then compares
every output and gradient byte for byte. A spy on ``row_blocks`` makes sure the threaded run
really cut the rows, so a test cannot pass by never splitting. Row counts include 1, odd ones
and fewer rows than threads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import minift.autograd.functional as F
from minift.autograd import Tensor, parallel

THREADS = (2, 3, 7)


@pytest.fixture
def split_counts(monkeypatch):
    """Let any array split; return a function that sets the thread count and the list of block
    counts ``row_blocks`` handed out since."""
    monkeypatch.setattr(parallel, "MIN_ELEMENTS_PER_THREAD", 1)
    counts = []
    plain = parallel.row_blocks

    def spy(rows, size, threads=None):
        blocks = plain(rows, size, threads)
        counts.append(len(blocks))
        return blocks

    monkeypatch.setattr(parallel, "row_blocks", spy)

    def use(threads: int) -> list[int]:
        monkeypatch.setattr(parallel, "blas_threads", lambda: threads)
        counts.clear()
        return counts

    return use


def forward_backward(op, arrays, frozen=(), seed=0):
    """op(*tensors) and the gradient of every input but the ``frozen`` ones under a fixed
    random upstream gradient."""
    tensors = [Tensor(a.copy(), requires_grad=i not in frozen) for i, a in enumerate(arrays)]
    y = op(*tensors)
    y.backward(np.random.default_rng(seed).standard_normal(y.shape).astype(y.data.dtype))
    return [y.data] + [t.grad for i, t in enumerate(tensors) if i not in frozen]


def assert_same_bits(reference, threaded):
    assert len(reference) == len(threaded)
    for want, got in zip(reference, threaded):
        assert want.dtype == got.dtype and want.shape == got.shape
        assert want.tobytes() == got.tobytes()


def check_threads_change_no_bit(split_counts, op, arrays, frozen=()):
    split_counts(1)
    reference = forward_backward(op, arrays, frozen)
    for threads in THREADS:
        counts = split_counts(threads)
        assert_same_bits(reference, forward_backward(op, arrays, frozen))
        rows = next(a for a in arrays).shape[0]
        if rows > 1:
            assert max(counts) > 1, "the threaded run never split its rows"


def normal(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# ---- the helper itself --------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [0, 1, 2, 5, 17])
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_row_blocks_cover_the_rows_once_in_order(monkeypatch, rows, threads):
    monkeypatch.setattr(parallel, "MIN_ELEMENTS_PER_THREAD", 1)
    blocks = parallel.row_blocks(rows, rows * 10, threads)
    assert blocks[0][0] == 0 and blocks[-1][1] == rows
    assert all(stop == start for (_, stop), (start, _) in zip(blocks, blocks[1:]))
    assert len(blocks) == max(1, min(threads, rows))
    assert all(stop > start for start, stop in blocks) or rows == 0


@pytest.mark.parametrize(("given", "expected"), [(None, "4"), ("9", "9")])
def test_importing_minift_lets_openblas_workers_sleep_unless_told_otherwise(given, expected):
    """``import minift`` sets OPENBLAS_THREAD_TIMEOUT before NumPy loads; a value in the
    environment wins. Checked in a fresh interpreter: this one loaded NumPy long ago."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    code = "import os, minift; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_a_small_array_is_not_split(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_ELEMENTS_PER_THREAD", 100)
    assert parallel.row_blocks(64, 199, threads=8) == [(0, 64)]
    assert parallel.row_blocks(64, 200, threads=8) == [(0, 32), (32, 64)]


def test_blocks_run_on_other_threads_and_the_first_on_the_caller(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_ELEMENTS_PER_THREAD", 1)
    seen = np.zeros(4, dtype=np.int64)

    def mark(block):
        block[:] = threading.get_ident()

    parallel.over_row_blocks(mark, seen, threads=2)
    assert seen[0] == threading.get_ident() and seen[2] != threading.get_ident()


def test_a_device_array_is_never_split(monkeypatch):
    """Anything that is not a NumPy array (a CuPy array) goes to ``fn`` whole, once."""
    monkeypatch.setattr(parallel, "MIN_ELEMENTS_PER_THREAD", 1)

    class DeviceArray:
        shape, size = (8, 8), 64

    device, calls = DeviceArray(), []
    parallel.over_row_blocks(lambda *blocks: calls.append(blocks), device, None, threads=4)
    assert calls == [(device, None)]


def test_an_error_in_any_block_reaches_the_caller_after_every_block_ended(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_ELEMENTS_PER_THREAD", 1)
    finished = []

    def fail_on_the_last_block(block):
        finished.append(block[0])
        if block[0] == 3:
            raise ValueError("block 3")

    with pytest.raises(ValueError, match="block 3"):
        parallel.over_row_blocks(fail_on_the_last_block, np.arange(4), threads=4)
    assert sorted(finished) == [0, 1, 2, 3]


# ---- the ops: threaded == serial, bit for bit, forward and backward -----------------------------
@pytest.mark.parametrize("shape", [(1, 64), (5, 33), (3, 7, 48), (2, 1, 16)])
@pytest.mark.parametrize("frozen", [(), (1,)], ids=["weight-trains", "weight-frozen"])
def test_rms_norm(split_counts, shape, frozen):
    rng = np.random.default_rng(1)
    x, w = normal(rng, *shape), normal(rng, shape[-1])
    check_threads_change_no_bit(split_counts, lambda a, b: F.rms_norm(a, b, eps=1e-5), [x, w], frozen)


@pytest.mark.parametrize("frozen", [(), (0,), (1,)], ids=["both-train", "gate-frozen", "up-frozen"])
@pytest.mark.parametrize("shape", [(1, 40), (5, 33), (3, 7, 24)])
def test_swiglu(split_counts, shape, frozen):
    rng = np.random.default_rng(2)
    gate, up = normal(rng, *shape, scale=3.0), normal(rng, *shape)
    check_threads_change_no_bit(split_counts, F.swiglu, [gate, up], frozen)


@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("per_row_positions", [False, True], ids=["shared-table", "table-per-row"])
def test_rope(split_counts, batch, per_row_positions):
    rng = np.random.default_rng(3)
    heads, t, d = 3, 9, 16
    positions = rng.integers(0, 50, (batch, t)) if per_row_positions else np.arange(t)
    cos, sin = F.rope_tables(positions, d)
    if per_row_positions:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, d)
    x = normal(rng, batch, heads, t, d)
    check_threads_change_no_bit(split_counts, lambda a: F.rope(a, cos, sin), [x])


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "causal+padding"])
def test_attention(split_counts, batch, padded):
    rng = np.random.default_rng(4)
    q, k, v = normal(rng, batch, 6, 7, 8), normal(rng, batch, 2, 7, 8), normal(rng, batch, 2, 7, 8)
    mask = None
    if padded:  # left padding: row 0's first three keys are padding, so its first queries see nothing
        mask = np.ones((batch, 7), dtype=bool)
        mask[0, :3] = False
    check_threads_change_no_bit(split_counts, lambda a, b, c: F.scaled_dot_product_attention(a, b, c, mask=mask),
                                [q, k, v])


@pytest.mark.parametrize("rows", [1, 5, 12])
def test_the_fused_head_with_a_trainable_weight(split_counts, rows):
    """Forward (online logsumexp over 4 chunks) and backward (dh, and dW's recomputed chunks)."""
    rng = np.random.default_rng(5)
    h, weight = normal(rng, rows, 16), normal(rng, 50, 16)
    targets = rng.integers(0, 50, rows)
    targets[0] = -100  # an ignored row
    check_threads_change_no_bit(
        split_counts, lambda a, b: F.linear_token_logprobs(a, b, targets, chunk_elements=rows * 13), [h, weight])
