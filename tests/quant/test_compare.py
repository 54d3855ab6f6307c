"""The comparison formats (issue 10): Q4_1 equals GGUF's reference quantizer, int4 keeps its bound,
and on normally distributed weights NF4 beats uniform int4 at every block size."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from minift.quant.compare import error_table, format_error_table, int4_absmax, q4_1_affine


def gaussian(n=1 << 16, seed=0):
    return (np.random.default_rng(seed).standard_normal(n) * 0.02).astype(np.float32)


def test_q4_1_at_block_32_equals_ggufs_quantize_then_dequantize_bit_for_bit():
    x = gaussian(4096).reshape(8, 512)
    x[3, 100:132] = 0.25  # a constant block: d = 0
    reference = gguf_quants.dequantize(gguf_quants.quantize(x, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
    ours, bits = q4_1_affine(x, 32)
    assert ours.tobytes() == reference.astype(np.float32).tobytes() and bits == 5.0


@pytest.mark.parametrize("blocksize", [32, 256])
def test_int4_error_is_at_most_half_a_step(blocksize):
    x = gaussian(1 << 12)
    approx, bits = int4_absmax(x, blocksize)
    absmax = np.abs(x).reshape(-1, blocksize).max(axis=1)
    error = np.abs(approx - x).reshape(-1, blocksize).max(axis=1)
    assert np.all(error <= absmax / 14 * (1 + 1e-6)) and bits == 4 + 32 / blocksize
    assert np.all(int4_absmax(np.zeros(64, np.float32), 64)[0] == 0)


def test_on_gaussian_weights_nf4_beats_int4_and_error_grows_with_the_block():
    rows = error_table(gaussian(), blocksizes=(32, 64, 256, 4096))
    table = {(r["format"], r["block"]): r for r in rows}
    for block in (32, 64, 256, 4096):
        assert table["NF4", block]["rmse"] < 0.9 * table["int4 absmax", block]["rmse"]
        assert table["NF4 + double quant", block]["bits"] < table["NF4", block]["bits"]
    for name in ("NF4", "int4 absmax", "Q4_1 affine"):
        errors = [table[name, b]["rmse"] for b in (32, 64, 256, 4096)]
        assert errors == sorted(errors), name
    assert table["NF4", 64]["bits"] == 4.5 and table["Q4_1 affine", 32]["bits"] == 5.0
    assert "NF4 + double quant" in format_error_table(rows)


def test_a_size_that_is_no_whole_number_of_blocks_is_refused():
    with pytest.raises(ValueError, match="whole blocks of 32"):
        q4_1_affine(np.ones(40, np.float32), 32)
