"""kernels/nf4_dequant.cu and kernels/nf4_gemv.cu on every path, against minift.quant.nf4.

Dequantization is one float32 product per weight (double quantization: a product and a sum,
each rounded on its own), so the kernels must equal ``nf4.dequantize_nf4`` bit for bit, float16
outputs included (round to nearest even on both sides).
"""

import dataclasses
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import kernel_arrays, seeds

from minift.backend import to_numpy
from minift.cuda import kernels
from minift.cuda import reference as ref
from minift.cuda.kernels import KernelArgumentError
from minift.quant import nf4

out_dtypes = st.sampled_from([np.float32, np.float16])


@st.composite
def nf4_inputs(draw):
    """(packed, absmax, n, blocksize): every block size nf4.py allows, 1 to 3 blocks (sizes off
    the 512-value tile of a kernel block); absmax with zeros, huge values (float16 overflow to
    inf) and subnormals; codes are random bytes."""
    blocksize = draw(st.sampled_from(nf4.BLOCKSIZES))
    n = blocksize * draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(seeds))
    packed = rng.integers(0, 256, n // 2, dtype=np.uint8)
    absmax = np.abs(draw(kernel_arrays((n // blocksize,))))
    return packed, absmax, n, blocksize


def assert_bitwise_equal(out, expected):
    assert out.dtype == expected.dtype
    np.testing.assert_array_equal(out.view(f"u{out.itemsize}"), expected.view(f"u{out.itemsize}"))


@settings(max_examples=12, deadline=None)
@given(inputs=nf4_inputs(), dtype=out_dtypes)
def test_dequantize_equals_nf4_bit_for_bit(device, inputs, dtype):
    packed, absmax, n, blocksize = inputs
    out = device.guarded((n,), dtype=dtype)
    kernels.nf4_dequantize(device.put(packed), device.put(absmax), n, blocksize, out=out.array, dtype=dtype)
    with np.errstate(over="ignore"):  # float16 overflows to inf on both sides
        expected = ref.nf4_dequantize(packed, absmax, n, blocksize, dtype)
    assert_bitwise_equal(out.result(), expected)


@settings(max_examples=12, deadline=None)
@given(inputs=nf4_inputs(), dtype=out_dtypes, nested_blocksize=st.sampled_from([256, 1, 3]),
       offset=st.sampled_from([0.0, 0.37, -1e-3]), data=st.data())
def test_double_quantized_dequantize_equals_nf4_bit_for_bit(device, inputs, dtype, nested_blocksize, offset, data):
    """nested_blocksize 256 is bitsandbytes'; 1 and 3 make several nested blocks at small sizes."""
    packed, _, n, blocksize = inputs
    n_blocks = n // blocksize
    absmax_q = np.random.default_rng(data.draw(seeds)).integers(0, 256, n_blocks, dtype=np.uint8)
    absmax2 = np.abs(data.draw(kernel_arrays((-(-n_blocks // nested_blocksize),))))
    code2 = nf4.DYNAMIC_CODE
    out = device.guarded((n,), dtype=dtype)
    kernels.nf4_dequantize_nested(*map(device.put, (packed, absmax_q, code2, absmax2)), offset, n, blocksize,
                                  nested_blocksize, out=out.array, dtype=dtype)
    with np.errstate(over="ignore"):
        expected = ref.nf4_dequantize_nested(packed, absmax_q, code2, absmax2, offset, n, blocksize,
                                             nested_blocksize, dtype)
    assert_bitwise_equal(out.result(), expected)
    absmax = device.guarded((n_blocks,))
    kernels.nf4_absmax_nested(*map(device.put, (absmax_q, code2, absmax2)), offset, nested_blocksize, out=absmax.array)
    assert_bitwise_equal(absmax.result(), ref.nf4_absmax_nested(absmax_q, code2, absmax2, offset, nested_blocksize))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_quantized_weight_dequantizes_as_nf4_does(device, double_quant, dtype):
    """The state-based entry point on a real weight quantized by nf4.py (offset, absmax2 and all)."""
    weight = np.random.default_rng(0).normal(0, 0.02, (48, 160)).astype(np.float32)
    packed, state = nf4.quantize_nf4(weight, blocksize=64, double_quant=double_quant)
    state2 = state.state2 and dataclasses.replace(state.state2, absmax=device.put(state.state2.absmax))
    put_state = dataclasses.replace(state, absmax=device.put(state.absmax), state2=state2)  # arrays on the device
    got = to_numpy(kernels.dequantize_nf4(device.put(packed), put_state, dtype=dtype))
    assert_bitwise_equal(got, nf4.dequantize_nf4(packed, state, dtype=dtype))
    x = np.random.default_rng(1).normal(size=160).astype(np.float32)
    y = to_numpy(kernels.nf4_matvec(device.put(packed), put_state, device.put(x)))
    W = nf4.dequantize_nf4(packed, state)
    assert (np.abs(y - W.astype(np.float64) @ x) <= ref.float32_tolerance(np.matmul, W, x, terms=160)).all()


@settings(max_examples=10, deadline=None)
@given(N=st.integers(1, 40), K=st.sampled_from([32, 64, 96, 160, 256]), blocksize=st.sampled_from([32, 64, 128]),
       data=st.data())
def test_gemv_equals_dequantize_then_matvec(device, N, K, blocksize, data):
    assume(N * K % blocksize == 0)
    packed = np.random.default_rng(data.draw(seeds)).integers(0, 256, N * K // 2, dtype=np.uint8)
    absmax = np.abs(data.draw(kernel_arrays((N * K // blocksize,))))
    x = data.draw(kernel_arrays((K,)))
    y = device.guarded((N,))
    kernels.nf4_gemv(device.put(packed), device.put(absmax), device.put(x), N, K, blocksize, out=y.array)
    W = ref.nf4_dequantize(packed, absmax, N * K, blocksize).reshape(N, K)
    got, expected = y.result(), ref.nf4_gemv(packed, absmax, x, N, K, blocksize)
    assert not np.isnan(got).any()
    assert (np.abs(got - expected) <= ref.float32_tolerance(np.matmul, W, x, terms=K)).all()


@pytest.mark.parametrize("filename", ["nf4_dequant.cu", "nf4_gemv.cu"])
def test_the_kernels_codebook_is_nf4s_codebook(filename):
    """Kernels define their own constants (llm.c #33): they must be nf4.py's very float32 numbers."""
    text = (kernels.KERNEL_DIR / filename).read_text()
    table = re.search(r"__constant__ float \w+\[NF4_CODES\] = \{(.*?)\};", text, re.DOTALL).group(1)
    values = np.array([float(v.strip().rstrip("f")) for v in table.split(",")], dtype=np.float32)
    np.testing.assert_array_equal(values, nf4.NF4_CODE)
    assert kernels.kernel_constants("nf4_dequant.cu")["CODE2_SIZE"] == nf4.DYNAMIC_CODE.size


packed8, absmax2 = np.zeros(4, np.uint8), np.ones(2, np.float32)
BAD = {
    "odd blocksize": (lambda: kernels.nf4_dequantize(packed8, absmax2, 8, 5), "whole blocks of an even blocksize"),
    "a partial block": (lambda: kernels.nf4_dequantize(packed8, absmax2, 8, 16), "whole blocks of an even blocksize"),
    "packed too short": (lambda: kernels.nf4_dequantize(packed8[:3].copy(), absmax2, 8, 4),
                         r"packed has shape \(3,\), expected \(4\)"),
    "absmax count": (lambda: kernels.nf4_dequantize(packed8, absmax2, 8, 8),
                     r"absmax has shape \(2,\), expected \(1\)"),
    "packed not uint8": (lambda: kernels.nf4_dequantize(packed8.astype(np.int8), absmax2, 8, 4), "must be uint8"),
    "float64 output": (lambda: kernels.nf4_dequantize(packed8, absmax2, 8, 4, dtype=np.float64),
                       "output dtype must be float32 or float16"),
    "code2 size": (lambda: kernels.nf4_dequantize_nested(packed8, np.zeros(2, np.uint8), np.zeros(16, np.float32),
                                                         np.ones(1, np.float32), 0.0, 8, 4),
                   r"code2 has shape \(16,\), expected \(256\)"),
    "odd K": (lambda: kernels.nf4_gemv(packed8, absmax2, np.ones(7, np.float32), 1, 7, 4), "K must be even"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_nf4_arguments_are_refused(case):
    call, message = BAD[case]
    with pytest.raises(KernelArgumentError, match=message):
        call()
