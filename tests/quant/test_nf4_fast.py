"""The fast CPU decoder (``dequantize_nf4_by_byte``: byte table, row blocks on threads) against
the plain reference ``dequantize_nf4``: bit for bit, whatever the split."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

from minift.autograd.parallel import blas_threads
from minift.quant import nf4
from minift.quant.nf4 import (
    BLOCKSIZES,
    DOUBLE_QUANT_BLOCKSIZE,
    block_absmax,
    dequantize_nf4,
    dequantize_nf4_by_byte,
    quantize_nf4,
)


@st.composite
def weights(draw):
    """A 2-D float32 weight of whole blocks, with a scale per row so blocks differ in absmax."""
    blocksize = draw(st.sampled_from(BLOCKSIZES[:4]))
    blocks_per_row = draw(st.integers(1, 3))
    rows = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((rows, blocks_per_row * blocksize)) * rng.uniform(1e-3, 10, size=(rows, 1))
    return x.astype(np.float32), blocksize


@pytest.fixture
def split_small_matrices(monkeypatch):
    """Let one block be a thread's share, so that small test matrices are really cut up."""
    monkeypatch.setattr(nf4, "MIN_WEIGHTS_PER_THREAD", 1)


# The fixture only lowers a constant, the same for every example: sharing it is what we want.
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(weights(), st.booleans(), st.integers(1, 5), st.sampled_from([np.float32, np.float64, np.float16]))
def test_any_split_over_threads_equals_the_reference_bit_for_bit(split_small_matrices, case, double_quant,
                                                                   threads, dtype):
    x, blocksize = case
    packed, state = quantize_nf4(x, blocksize, double_quant=double_quant)
    plain = dequantize_nf4(packed, state, dtype=dtype)
    fast = dequantize_nf4_by_byte(packed, state, dtype=dtype, threads=threads)
    assert fast.dtype == plain.dtype == dtype and fast.shape == plain.shape == x.shape
    assert fast.tobytes() == plain.tobytes()


def test_a_large_double_quantized_weight_across_absmax2_groups_is_bit_exact():
    """More than one group of 256 absmax values, cut at block edges that are not group edges."""
    x = (np.random.default_rng(1).standard_normal((1536, 576)) * 0.02).astype(np.float32)
    packed, state = quantize_nf4(x, 64, double_quant=True)
    assert state.absmax.size > 3 * DOUBLE_QUANT_BLOCKSIZE
    plain = dequantize_nf4(packed, state)
    for threads in (1, 2, 3):
        assert dequantize_nf4_by_byte(packed, state, threads=threads).tobytes() == plain.tobytes()


@pytest.mark.parametrize("double_quant", [False, True])
def test_the_absmax_of_a_range_of_blocks_is_that_slice_of_all_of_them(double_quant):
    x = (np.random.default_rng(2).standard_normal(64 * 700) * 0.02).astype(np.float32)
    _, state = quantize_nf4(x, 64, double_quant=double_quant)
    everything = block_absmax(state)
    for start, stop in [(0, 700), (1, 255), (255, 257), (300, 700), (511, 512)]:
        assert block_absmax(state, start, stop).tobytes() == everything[start:stop].tobytes()


def test_the_row_blocks_cover_every_block_once_and_run_on_other_threads(split_small_matrices, monkeypatch):
    thread_of = {}
    decode = nf4._decode_blocks

    def recording(out, packed, state, pairs, start, stop):
        thread_of[start, stop] = threading.get_ident()
        decode(out, packed, state, pairs, start, stop)

    monkeypatch.setattr(nf4, "_decode_blocks", recording)
    packed, state = quantize_nf4(np.ones((10, 64), np.float32), 32)
    dequantize_nf4_by_byte(packed, state, threads=3)
    assert sorted(thread_of) == [(0, 6), (6, 13), (13, 20)]  # 20 blocks of 32 weights
    me = threading.get_ident()
    assert thread_of[0, 6] == me and thread_of[6, 13] != me and thread_of[13, 20] != me


def test_a_matrix_below_the_threshold_stays_on_the_calling_thread(monkeypatch):
    calls = []
    decode = nf4._decode_blocks
    monkeypatch.setattr(nf4, "_decode_blocks", lambda *a: (calls.append(threading.get_ident()), decode(*a)))
    packed, state = quantize_nf4(np.ones((576, 576), np.float32), 64)
    dequantize_nf4_by_byte(packed, state, threads=2)
    assert calls == [threading.get_ident()]


def test_the_default_thread_count_is_the_blas_limit():
    with threadpool_limits(1):
        assert blas_threads() == 1
    with threadpool_limits(2):
        assert blas_threads() == 2


def test_a_non_numpy_array_is_refused_with_where_to_go_instead():
    packed, state = quantize_nf4(np.ones(64, np.float32), 64)
    with pytest.raises(TypeError, match="dequantize_nf4_by_byte decodes NumPy arrays, got list.*dequantize_nf4"):
        dequantize_nf4_by_byte(packed.tolist(), state)
