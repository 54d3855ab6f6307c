"""The compiled CPU NF4 decoder (kernels/nf4_decode_cpu.cpp through minift/cuda/cpu_decode.py)
against the plain reference ``dequantize_nf4``: bit for bit, in every version this CPU has, split
over any number of threads; and ``Linear4bit``'s fallback to NumPy when it cannot be built."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minift.autograd.function import op_counts
from minift.cuda import cpu_decode, emulator
from minift.cuda.cpu_decode import VERSIONS, dequantize_nf4_compiled
from minift.nn import linear4bit
from minift.nn.linear4bit import Linear4bit
from minift.quant import nf4
from minift.quant.nf4 import BLOCKSIZES, dequantize_nf4, dequantize_nf4_by_byte, quantize_nf4


def versions_on_this_cpu() -> list[str]:
    """The loops of ``VERSIONS`` this CPU can run (at least "plain"), found by asking for each."""
    packed, state = quantize_nf4(np.ones(64, np.float32), 64)
    here = []
    for version in VERSIONS:
        try:
            dequantize_nf4_compiled(packed, state, version=version)
        except ValueError:
            continue
        here.append(version)
    return here


HERE = versions_on_this_cpu()


@st.composite
def weights(draw):
    """A 2-D float32 weight of whole blocks, any NF4 block size, a scale per row so blocks differ."""
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    rows = draw(st.integers(1, max(1, 4096 // blocksize)))
    blocks_per_row = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((rows, blocks_per_row * blocksize)) * rng.uniform(1e-3, 10, size=(rows, 1))
    return x.astype(np.float32), blocksize


@pytest.fixture
def split_small_matrices(monkeypatch):
    """Let one block be a thread's share, so that small test matrices are really cut up."""
    monkeypatch.setattr(nf4, "MIN_WEIGHTS_PER_THREAD", 1)


# The fixture only lowers a constant, the same for every example: sharing it is what we want.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(weights(), st.booleans(), st.integers(1, 4), st.sampled_from(HERE),
       st.sampled_from([np.float32, np.float16, np.float64, ml_dtypes.bfloat16]))
def test_every_version_and_split_equals_the_reference_bit_for_bit(split_small_matrices, case, double_quant, threads,
                                                                  version, dtype):
    x, blocksize = case
    packed, state = quantize_nf4(x, blocksize, double_quant=double_quant)
    plain = dequantize_nf4(packed, state, dtype=dtype)
    compiled = dequantize_nf4_compiled(packed, state, dtype=dtype, threads=threads, version=version)
    assert compiled.dtype == plain.dtype == np.dtype(dtype) and compiled.shape == plain.shape == x.shape
    assert compiled.tobytes() == plain.tobytes()


def test_the_split_takes_the_asked_threads_but_not_below_the_minimum_share(split_small_matrices):
    assert cpu_decode.thread_count(n_weights=640, n_blocks=10, threads=4) == 4
    assert cpu_decode.thread_count(n_weights=640, n_blocks=3, threads=4) == 3  # whole blocks only


def test_a_small_matrix_stays_on_one_thread():
    assert cpu_decode.thread_count(n_weights=576 * 576, n_blocks=576 * 9, threads=2) == 1
    assert cpu_decode.thread_count(n_weights=2048 * 2048, n_blocks=2048 * 32, threads=2) == 2


def test_every_weight_of_a_large_double_quantized_matrix_across_absmax2_groups():
    """More than one group of 256 absmax values, the blocks cut between threads off the group edges."""
    x = (np.random.default_rng(1).standard_normal((1536, 576)) * 0.02).astype(np.float32)
    packed, state = quantize_nf4(x, 64, double_quant=True)
    plain = dequantize_nf4(packed, state)
    for threads in (1, 2, 3):
        assert dequantize_nf4_compiled(packed, state, threads=threads).tobytes() == plain.tobytes()


def test_the_output_goes_into_the_callers_buffer_and_nothing_else_is_written():
    packed, state = quantize_nf4(np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32), 32)
    buffer = np.full(8 * 64 + 2 * 16, np.nan, np.float32)  # NaN margins catch a write past either end
    out = buffer[16:-16].reshape(8, 64)
    assert dequantize_nf4_compiled(packed, state, out=out) is out
    assert out.tobytes() == dequantize_nf4(packed, state).tobytes()
    assert np.isnan(buffer[:16]).all() and np.isnan(buffer[-16:]).all()


def test_a_wrong_buffer_a_wrong_state_a_list_and_an_unknown_version_are_refused():
    packed, state = quantize_nf4(np.ones((4, 64), np.float32), 64)
    with pytest.raises(ValueError, match=r"out must be a C-contiguous float32 array of shape \(4, 64\)"):
        dequantize_nf4_compiled(packed, state, out=np.empty((64, 4), np.float32))
    with pytest.raises(ValueError, match="64 bytes hold 128 codes, the QuantState describes 256 weights"):
        dequantize_nf4_compiled(packed[:64], state)
    with pytest.raises(TypeError, match="NumPy uint8 array of packed codes, got list"):
        dequantize_nf4_compiled(packed.tolist(), state)
    with pytest.raises(ValueError, match="nf4_decode_cpu.cpp: this CPU has no 'sse9' version"):
        dequantize_nf4_compiled(packed, state, version="sse9")


def test_each_decode_is_counted_as_one_nf4_dequantize():
    layer = Linear4bit(*quantize_nf4(np.ones((4, 64), np.float32), 64))
    before = op_counts["nf4_dequantize"]
    dequantize_nf4_compiled(layer.packed, layer.quant_state)
    assert op_counts["nf4_dequantize"] == before + 1
    layer.dequantized_weight()  # through Linear4bit's CPU decoder, the compiled one here
    assert op_counts["nf4_dequantize"] == before + 2


def test_linear4bit_runs_the_compiled_decoder_unless_told_numpy(monkeypatch):
    monkeypatch.delenv(linear4bit.DECODER_ENV, raising=False)
    assert linear4bit.cpu_decoder() is dequantize_nf4_compiled
    monkeypatch.setenv(linear4bit.DECODER_ENV, "numpy")
    assert linear4bit.cpu_decoder() is dequantize_nf4_by_byte
    monkeypatch.setenv(linear4bit.DECODER_ENV, "fortran")
    with pytest.raises(ValueError, match=r"\$MINIFT_NF4_DECODER='fortran': set it to 'compiled'"):
        linear4bit.cpu_decoder()


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A process that has not tried to build the decoder yet, with an empty library cache;
    afterwards the real build is found again."""
    monkeypatch.setenv("MINIFT_CACHE", str(tmp_path))
    monkeypatch.delenv(linear4bit.DECODER_ENV, raising=False)
    cpu_decode.library.cache_clear()
    linear4bit.compiled_decoder_builds.cache_clear()
    yield
    cpu_decode.library.cache_clear()
    linear4bit.compiled_decoder_builds.cache_clear()


@pytest.mark.parametrize("break_it", ["no compiler", "compiler error"])
def test_a_failed_build_warns_once_and_training_goes_on_with_numpy(fresh_build, monkeypatch, break_it):
    if break_it == "no compiler":
        monkeypatch.setattr(emulator, "CXX", "/nonexistent/g++")
        reason = "/nonexistent/g++"
    else:
        monkeypatch.setattr(cpu_decode, "FLAGS", (*cpu_decode.FLAGS, "-fno-such-option-for-this-test"))
        reason = "-fno-such-option-for-this-test"
    layer = Linear4bit(*quantize_nf4(np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32), 64))
    with pytest.warns(RuntimeWarning, match=f"(?s)compiled NF4 decoder .*could not be built.*NumPy.*{reason}"):
        first = layer.dequantized_weight()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second decode must not warn again
        second = layer.dequantized_weight()
    assert linear4bit.cpu_decoder() is dequantize_nf4_by_byte
    reference = dequantize_nf4(layer.packed, layer.quant_state).tobytes()
    assert first.tobytes() == second.tobytes() == reference
