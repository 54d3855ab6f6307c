"""NF4 (issue 10): the codebook and its construction, blockwise quantization and its error bound,
packing, double quantization, storage per weight, and the errors on bad input.

The byte-for-byte comparison with bitsandbytes is in tests/interop/test_bitsandbytes.py.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import nibbles, quant_inputs

from minift.backend import to_numpy, xp
from minift.quant import nf4
from minift.quant.nf4 import (
    BLOCKSIZES,
    DYNAMIC_CODE,
    NF4_CODE,
    bits_per_parameter,
    block_absmax,
    dequantize_dynamic_8bit,
    dequantize_nf4,
    dequantize_nf4_by_byte,
    double_quantize,
    nf4_codes,
    normal_float_codebook,
    pack_4bit,
    quantize_dynamic_8bit,
    quantize_nf4,
    unpack_4bit,
)

#: Half the largest gap between neighbouring NF4 levels (between -1 and -0.696): in units of a
#: block's absmax, the farthest any weight in [-absmax, absmax] is from its nearest level.
NF4_HALF_GAP = float(np.diff(NF4_CODE.astype(np.float64)).max() / 2)
#: Float32 slack on top: x * (1/absmax) and NF4[q] * absmax are each rounded (a few ulp of absmax).
F32_SLACK = 2.0**-20
#: The same for the 8-bit absmax code, whose levels stop at -0.99297 and 1 and whose quantizer
#: first rounds to a grid of step 2/65535 (half a step: 1/65535).
DYNAMIC_HALF_GAP = float(max(np.diff(DYNAMIC_CODE.astype(np.float64)).max() / 2, 1 + DYNAMIC_CODE.min()))
DYNAMIC_BOUND = DYNAMIC_HALF_GAP + 1 / 65535 + F32_SLACK


def per_block_error(x, approx, blocksize):
    return np.abs(approx.astype(np.float64) - x.astype(np.float64)).reshape(-1, blocksize).max(axis=1)


# ---- the codebook ------------------------------------------------------------------------------
def test_the_codebook_is_built_from_normal_quantiles_bit_for_bit():
    assert normal_float_codebook().tobytes() == NF4_CODE.tobytes()


def test_in_exact_arithmetic_the_construction_differs_from_the_table_by_float32_rounding_only():
    exact = normal_float_codebook(float32_grid=False)
    difference = np.abs(exact.astype(np.float64) - NF4_CODE)
    assert 0 < difference.max() <= 1.2e-7  # not identical, and no more than the documented amount


def test_the_codebook_is_asymmetric_with_an_exact_zero():
    assert np.all(np.diff(NF4_CODE) > 0) and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1
    assert NF4_CODE[7] == 0 and (NF4_CODE > 0).sum() == 8 and (NF4_CODE < 0).sum() == 7
    assert NF4_HALF_GAP == pytest.approx((NF4_CODE[1] - NF4_CODE[0]) / 2)


def test_the_dynamic_map_has_256_sorted_levels_from_minus_0_993_to_1():
    assert DYNAMIC_CODE.shape == (256,) and np.all(np.diff(DYNAMIC_CODE) > 0)
    assert DYNAMIC_CODE[-1] == 1 and DYNAMIC_CODE[0] == pytest.approx(-0.99297, abs=1e-5)
    assert (DYNAMIC_CODE == 0).sum() == 1
    # seven decades: the smallest non-zero magnitude is 1e-6 * (0.1 + 1) / 2
    assert np.abs(DYNAMIC_CODE[DYNAMIC_CODE != 0]).min() == pytest.approx(0.55e-6, rel=1e-6)


# ---- the round-trip error bound ----------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(quant_inputs())
def test_each_block_is_within_half_the_largest_gap_times_its_absmax(case):
    """|x - dequant(quant(x))| <= (max gap / 2 + 2^-20) * absmax of the block, for every block whose
    absmax is a normal float32 (>= 1e-38); a subnormal block is scaled as if its absmax were 1e-38
    and its error is bounded by its absmax instead. No NaN or inf anywhere."""
    x, blocksize = case
    packed, state = quantize_nf4(x, blocksize, double_quant=False)
    approx = to_numpy(dequantize_nf4(packed, state))
    assert approx.shape == x.shape and approx.dtype == np.float32 and np.isfinite(approx).all()
    absmax = np.abs(x.astype(np.float64)).reshape(-1, blocksize).max(axis=1)
    bound = np.where(absmax >= 1e-38, (NF4_HALF_GAP + F32_SLACK) * absmax, absmax)
    assert np.all(per_block_error(x, approx, blocksize) <= bound)


@settings(max_examples=60, deadline=None)
@given(quant_inputs())
def test_with_double_quantization_the_only_extra_error_is_that_of_the_absmax(case):
    """Per block: error <= (max gap / 2 + slack) * absmax + |absmax' - absmax| (levels are within
    [-1, 1]), where absmax' is the decoded absmax; and per group of 256 blocks,
    |absmax' - absmax| <= (dynamic half gap + 1/65535 + slack) * absmax2, or <= absmax2 for a
    group whose absmax2 is subnormal (scaled with 1e-38, as a subnormal 4-bit block is)."""
    x, blocksize = case
    packed, state = quantize_nf4(x, blocksize, double_quant=True)
    plain_packed, plain = quantize_nf4(x, blocksize, double_quant=False)
    assert to_numpy(packed).tobytes() == to_numpy(plain_packed).tobytes()  # the 4-bit codes do not change
    true_absmax = to_numpy(plain.absmax).astype(np.float64)
    decoded = to_numpy(block_absmax(state)).astype(np.float64)
    absmax2 = np.repeat(to_numpy(state.state2.absmax), 256)[: true_absmax.size].astype(np.float64)
    absmax_bound = np.where(absmax2 >= 1e-38, DYNAMIC_BOUND * absmax2, absmax2)
    assert np.all(np.abs(decoded - true_absmax) <= absmax_bound)
    approx = to_numpy(dequantize_nf4(packed, state))
    assert np.isfinite(approx).all()
    floor = np.where(true_absmax >= 1e-38, (NF4_HALF_GAP + F32_SLACK) * true_absmax, true_absmax)
    assert np.all(per_block_error(x, approx, blocksize) <= floor + np.abs(decoded - true_absmax) * (1 + 1e-6))


def test_all_zero_blocks_store_code_7_and_come_back_as_exact_zeros(backend):
    x = np.zeros((4, 64), dtype=np.float32)
    x[2] = np.linspace(-1, 1, 64)
    for dq in (False, True):
        packed, state = quantize_nf4(x, 64, double_quant=dq)
        packed = to_numpy(packed).reshape(4, 32)
        assert np.all(packed[[0, 1, 3]] == 0x77)
        approx = to_numpy(dequantize_nf4(xp.asarray(packed), state))
        assert np.all(approx[[0, 1, 3]] == 0) and np.isfinite(approx).all()


def test_one_huge_value_coarsens_only_its_own_block():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    x[0, 5] = 1e30
    approx = to_numpy(dequantize_nf4(*quantize_nf4(x, 64, double_quant=False)))
    assert np.isfinite(approx).all() and approx[0, 5] == np.float32(1e30)
    assert np.all(approx[0, np.arange(64) != 5] == 0)  # everything else in that block rounds to 0
    assert np.abs(approx[1] - x[1]).max() <= NF4_HALF_GAP * np.abs(x[1]).max()


def test_a_value_half_way_between_two_levels_takes_the_lower_one():
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    block = np.concatenate([[1.0], midpoints, np.zeros(64 - 16)]).astype(np.float32)  # absmax 1: 1/absmax = 1
    codes, _ = nf4_codes(block, 64)
    np.testing.assert_array_equal(to_numpy(codes)[1:16], np.arange(15))


def test_scaling_multiplies_by_the_float32_reciprocal_of_absmax():
    """Find weights where x * (1/a) and x / a fall on different sides of a midpoint; the codes must
    follow the multiplication (bitsandbytes does the same; checked in the interop test)."""
    rng = np.random.default_rng(0)
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    a = rng.uniform(0.5, 4, 4000).astype(np.float32)
    x = (a.astype(np.float64) * rng.choice(midpoints, a.size)).astype(np.float32)
    x = np.concatenate([np.nextafter(x, np.float32(-9)), x, np.nextafter(x, np.float32(9))])
    a = np.tile(a, 3)
    by_mul = np.searchsorted(midpoints, x * (np.float32(1) / a))
    by_div = np.searchsorted(midpoints, x / a)
    differ = np.nonzero(by_mul != by_div)[0]
    assert differ.size > 0
    blocks = np.zeros((differ.size, 32), dtype=np.float32)
    blocks[:, 0], blocks[:, 1] = a[differ], x[differ]
    codes = to_numpy(nf4_codes(blocks, 32)[0]).reshape(-1, 32)[:, 1]
    np.testing.assert_array_equal(codes, by_mul[differ])


# ---- packing -------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 1e30 in float16, in both versions
@given(quant_inputs(), st.booleans(), st.sampled_from([np.float32, np.float64, np.float16]))
def test_the_byte_table_dequantization_equals_the_plain_one_bit_for_bit(case, double_quant, dtype):
    x, blocksize = case
    packed, state = quantize_nf4(x, blocksize, double_quant=double_quant)
    plain = to_numpy(dequantize_nf4(packed, state, dtype=dtype))
    by_byte = to_numpy(dequantize_nf4_by_byte(packed, state, dtype=dtype))
    assert by_byte.dtype == plain.dtype == dtype and by_byte.shape == plain.shape == x.shape
    assert by_byte.tobytes() == plain.tobytes()


@settings(max_examples=50, deadline=None)
@given(nibbles())
def test_packing_round_trips_and_puts_the_first_code_in_the_high_nibble(codes):
    packed = to_numpy(pack_4bit(xp.asarray(codes)))
    assert packed.dtype == np.uint8 and packed.size == codes.size // 2
    np.testing.assert_array_equal(packed, (codes[0::2] << 4) | codes[1::2])
    np.testing.assert_array_equal(to_numpy(unpack_4bit(xp.asarray(packed))), codes)


def test_pack_order_on_a_known_pair():
    assert to_numpy(pack_4bit(xp.asarray([1, 2, 15, 0], dtype=xp.uint8))).tolist() == [0x12, 0xF0]


# ---- double quantization -------------------------------------------------------------------------
def test_the_double_quant_state_holds_uint8_codes_absmax2_per_256_blocks_and_the_mean_offset():
    x = np.random.default_rng(1).standard_normal((300, 64)).astype(np.float32) * 0.02
    packed, state = quantize_nf4(x, 64, double_quant=True)
    _, plain = quantize_nf4(x, 64, double_quant=False)
    assert state.nested and state.absmax.dtype == np.uint8 and state.absmax.shape == (300,)
    assert state.state2.blocksize == 256 and state.state2.absmax.shape == (2,)  # 300 blocks: 256 + 44
    assert state.state2.absmax.dtype == np.float32 and state.offset.dtype == np.float32
    assert state.offset == np.float32(to_numpy(plain.absmax).astype(np.float64).mean())
    assert state.state2.code is DYNAMIC_CODE and state.code is NF4_CODE


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 1000), st.sampled_from([1e-3, 1.0, 1e3]), st.integers(0, 2**32 - 1))
def test_the_8bit_absmax_code_round_trips_within_its_bound(n, scale, seed):
    values = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    codes, absmax2 = quantize_dynamic_8bit(values)
    assert codes.dtype == np.uint8 and absmax2.shape == (-(-n // 256),)
    back = to_numpy(dequantize_dynamic_8bit(codes, absmax2)).astype(np.float64)
    bound = DYNAMIC_BOUND * np.repeat(to_numpy(absmax2), 256)[:n]
    assert np.all(np.abs(back - values) <= bound)


def test_a_given_offset_is_used_as_is_and_round_trips_exactly():
    absmax = np.random.default_rng(2).uniform(0.01, 0.05, 700).astype(np.float32)
    codes, offset, state2 = double_quantize(absmax, offset=0.03125)
    assert offset == np.float32(0.03125)
    again, _, state2_again = double_quantize(absmax, offset=offset)
    np.testing.assert_array_equal(to_numpy(codes), to_numpy(again))
    np.testing.assert_array_equal(to_numpy(state2.absmax), to_numpy(state2_again.absmax))


def test_an_all_zero_group_of_absmax_gets_code_0():
    codes, absmax2 = quantize_dynamic_8bit(np.zeros(300, dtype=np.float32))
    assert np.all(to_numpy(codes) == 0) and np.all(to_numpy(absmax2) == 0)


# ---- storage -------------------------------------------------------------------------------------
def test_bits_per_weight_measured_from_nbytes_is_4_127_with_double_quant():
    x = np.random.default_rng(3).standard_normal((1024, 1024)).astype(np.float32)
    packed, state = quantize_nf4(x, 64, double_quant=True)
    bits = bits_per_parameter(packed, state)
    assert bits == 8 * (x.size // 2 + x.size // 64 + 4 * x.size // (64 * 256) + 4) / x.size
    assert round(bits, 3) == 4.127
    packed, state = quantize_nf4(x, 64, double_quant=False)
    assert bits_per_parameter(packed, state) == 4.5


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("blocksize", [16, 48, 100, 8192])
def test_an_unknown_block_size_is_refused_with_the_allowed_ones(blocksize):
    with pytest.raises(ValueError, match=r"block size .* not supported.*\(32, 64"):
        quantize_nf4(np.ones(8192, dtype=np.float32), blocksize)


def test_a_size_that_is_not_a_whole_number_of_blocks_is_refused():
    with pytest.raises(ValueError, match=r"shape \(3, 40\) \(120 values\) does not split into whole blocks of 64"):
        quantize_nf4(np.ones((3, 40), dtype=np.float32), 64)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_a_non_finite_weight_is_refused_with_its_position(bad):
    x = np.ones(128, dtype=np.float64)
    x[70] = bad
    with pytest.raises(ValueError, match="non-finite weight .* at flat index 70"):
        quantize_nf4(x, 64)


def test_integer_and_empty_inputs_are_refused():
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4(np.ones(64, dtype=np.int32), 64)
    with pytest.raises(ValueError, match="whole blocks"):
        quantize_nf4(np.ones(0, dtype=np.float32), 64)


def test_every_supported_block_size_round_trips(backend):
    x = xp.asarray(np.random.default_rng(4).standard_normal(8192).astype(np.float32))
    for blocksize in BLOCKSIZES:
        packed, state = quantize_nf4(x, blocksize)
        assert packed.shape == (4096,) and state.absmax.shape == (8192 // blocksize,)
        err = np.abs(to_numpy(dequantize_nf4(packed, state)) - to_numpy(x)).max()
        assert 0 < err <= (NF4_HALF_GAP + 0.01) * float(np.abs(to_numpy(x)).max())


def test_float64_input_comes_back_as_float64_with_float32_values():
    x = np.random.default_rng(5).standard_normal(64)
    approx = dequantize_nf4(*quantize_nf4(x, 64, double_quant=False))
    assert approx.dtype == np.float64
    assert np.array_equal(approx, approx.astype(np.float32).astype(np.float64))


def test_the_lut_picks_another_level_only_near_0_or_within_one_grid_step_of_a_midpoint():
    """Documented in quantize_dynamic_8bit: rounding to the 65536-point grid first makes bitsandbytes'
    8-bit codes differ from the exact nearest level for |s| < 1e-3 (levels finer than the grid
    step 3e-5) and for s within 1/65535 of a midpoint; nowhere else."""
    s = np.random.default_rng(6).uniform(-1, 1, 20000).astype(np.float32) ** 5
    s[0] = 1.0  # absmax2 = 1: the scaled values are s themselves
    codes = to_numpy(quantize_dynamic_8bit(s, blocksize=s.size)[0])
    exact = to_numpy(nf4.nearest_code(s, DYNAMIC_CODE))
    far = (codes != exact) & (np.abs(s) >= 1e-3)
    assert (codes != exact).any() and far.any()
    midpoints = (DYNAMIC_CODE[:-1].astype(np.float64) + DYNAMIC_CODE[1:]) / 2
    distance = np.abs(s[far, None] - midpoints[None, :]).min(axis=1)
    assert np.all(distance <= 1 / 65535 + 1e-7)


def test_subnormal_absmax_values_raise_no_float_error_and_stay_tiny():
    """Found by hypothesis: blocks whose absmax are subnormal give a subnormal absmax2, whose
    reciprocal overflowed to inf (and 0 * inf = NaN) before 1/absmax2 got the 1e-38 floor."""
    x = np.zeros(96, dtype=np.float32)
    x[64:] = np.float32(1e-40) * np.resize(np.array([-1, 3, -1, 2, -2, 0], np.float32), 32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow is expected here
        packed, state = quantize_nf4(x, 32, double_quant=True)
        approx = to_numpy(dequantize_nf4(packed, state))
    assert to_numpy(state.state2.absmax)[0] < 1.2e-38
    assert np.all(np.abs(approx - x) <= 1e-38) and np.all(approx[:64] == 0)
