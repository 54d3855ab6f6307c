"""minift's NF4 against bitsandbytes' ``quantize_4bit`` / ``dequantize_4bit`` on the CPU, bit for bit.

Compared: the codebook and the 8-bit dynamic map, the packed bytes, the float32 absmax, the
double-quantization state (uint8 absmax codes, absmax2, offset, nested block size, codes), and the
dequantized weights. One documented difference: bitsandbytes computes the offset with PyTorch's
float32 sum, whose rounding order depends on the CPU's vector width and threads; minift's offset
agrees to a few ulp, and given bitsandbytes' offset every stored byte is identical.
"""

import numpy as np
import pytest

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'minift[interop]')")
torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install 'minift[interop]')")
F = bnb.functional

from minift.quant.nf4 import (  # noqa: E402 - after the skips
    DYNAMIC_CODE,
    NF4_CODE,
    QuantState,
    block_absmax,
    dequantize_nf4,
    double_quantize,
    linspace_float32,
    nf4_codes,
    pack_4bit,
    quantize_nf4,
)

pytestmark = pytest.mark.interop

CASES = [((64, 64), 64), ((256, 96), 32), ((128, 512), 128), ((3, 4096), 256), ((1024, 40), 512),
         ((16, 1024), 1024), ((8, 4096), 2048), ((4, 8192), 4096), ((576, 192), 64), ((1536, 576), 64)]


def weights(shape, seed, scale=0.02):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    flat = x.reshape(-1)
    flat[: flat.size // 16] *= rng.uniform(0.1, 10)  # blocks of different scales, so absmax varies
    flat[rng.integers(flat.size)] = 0.5  # an outlier
    return x


def bnb_quantize(x, blocksize, nested):
    return F.quantize_4bit(torch.from_numpy(x.copy()), blocksize=blocksize, quant_type="nf4",
                           compress_statistics=nested)


# ---- tables --------------------------------------------------------------------------------------
def test_the_nf4_codebook_is_bitsandbytes_table():
    assert F.get_4bit_type("nf4", device="cpu").numpy().tobytes() == NF4_CODE.tobytes()


def test_the_dynamic_map_equals_create_dynamic_map_bit_for_bit():
    assert F.create_dynamic_map().numpy().tobytes() == DYNAMIC_CODE.tobytes()


@pytest.mark.parametrize("n", [2, 3, 8, 9, 17, 33, 65, 129])
@pytest.mark.parametrize("ends", [(0.9677083, 0.5), (0.1, 1.0)])
def test_the_float32_grid_is_torch_linspace(n, ends):
    assert linspace_float32(*ends, n).tobytes() == torch.linspace(*ends, n).numpy().tobytes()


# ---- quantization ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "blocksize"), CASES)
def test_packed_bytes_and_absmax_equal_quantize_4bit(shape, blocksize):
    x = weights(shape, seed=blocksize + shape[0])
    packed_ref, state_ref = bnb_quantize(x, blocksize, nested=False)
    packed, state = quantize_nf4(x, blocksize, double_quant=False)
    assert packed.tobytes() == packed_ref.numpy().tobytes()
    assert state.absmax.tobytes() == state_ref.absmax.numpy().tobytes()
    assert state.shape == tuple(state_ref.shape) and state.blocksize == state_ref.blocksize
    assert state.code.tobytes() == state_ref.code.numpy().tobytes()


@pytest.mark.parametrize(("shape", "blocksize"), CASES)
def test_the_double_quant_state_equals_compress_statistics(shape, blocksize):
    x = weights(shape, seed=7 * blocksize + shape[1])
    packed_ref, ref = bnb_quantize(x, blocksize, nested=True)
    packed, state = quantize_nf4(x, blocksize, double_quant=True)
    assert packed.tobytes() == packed_ref.numpy().tobytes()
    offset_ref = np.float32(ref.offset.item())
    assert abs(float(state.offset) - float(offset_ref)) <= 4 * np.spacing(offset_ref)  # sum order: a few ulp
    plain_absmax = nf4_codes(x, blocksize)[1]
    codes, offset, state2 = double_quantize(plain_absmax, offset=offset_ref)  # bnb's offset: same bytes
    assert codes.tobytes() == ref.absmax.numpy().tobytes()
    assert state2.absmax.tobytes() == ref.state2.absmax.numpy().tobytes()
    assert state2.blocksize == ref.state2.blocksize == 256
    assert state2.code.tobytes() == ref.state2.code.numpy().tobytes()
    # with minift's own offset (0-1 ulp away) a code flips only where absmax - offset sits on a
    # grid boundary: almost never
    assert np.mean(state.absmax == ref.absmax.numpy()) > 0.999


def as_minift_state(ref) -> QuantState:
    """A bitsandbytes QuantState in minift's dataclass (what loading a bnb checkpoint would do)."""
    state = QuantState(shape=tuple(ref.shape), blocksize=ref.blocksize, absmax=ref.absmax.numpy(),
                       code=ref.code.numpy())
    if ref.nested:
        state.offset = np.float32(ref.offset.item())
        state.state2 = QuantState(shape=tuple(ref.absmax.shape), blocksize=ref.state2.blocksize,
                                  absmax=ref.state2.absmax.numpy(), code=ref.state2.code.numpy())
    return state


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize(("shape", "blocksize"), CASES)
def test_dequantization_equals_dequantize_4bit(shape, blocksize, nested):
    x = weights(shape, seed=3 * blocksize + shape[0])
    packed_ref, ref = bnb_quantize(x, blocksize, nested)
    expected = F.dequantize_4bit(packed_ref, ref, quant_type="nf4").numpy()
    got = dequantize_nf4(packed_ref.numpy().reshape(-1), as_minift_state(ref))
    assert got.shape == expected.shape and got.tobytes() == expected.tobytes()
    if nested:  # the decoded absmax too, against bitsandbytes' own two steps
        decoded = F.dequantize_blockwise(ref.absmax, ref.state2) + ref.offset
        assert block_absmax(as_minift_state(ref)).tobytes() == decoded.numpy().tobytes()


# ---- the three documented details ------------------------------------------------------------------
def test_an_all_zero_block_is_code_7_in_bitsandbytes_too():
    x = np.zeros((2, 64), dtype=np.float32)
    x[1] = np.linspace(-1, 1, 64)
    packed_ref, ref = bnb_quantize(x, 64, nested=False)
    assert np.all(packed_ref.numpy().reshape(2, 32)[0] == 0x77)
    assert quantize_nf4(x, 64, double_quant=False)[0].tobytes() == packed_ref.numpy().tobytes()


def test_ties_go_to_the_lower_code_in_bitsandbytes_too():
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    block = np.concatenate([[1.0, 0.0], midpoints, np.zeros(64 - 17)]).astype(np.float32)
    packed_ref, _ = bnb_quantize(block, 64, nested=False)
    codes = np.empty(64, np.uint8)
    codes[0::2], codes[1::2] = packed_ref.numpy().reshape(-1) >> 4, packed_ref.numpy().reshape(-1) & 15
    np.testing.assert_array_equal(codes[2:17], np.arange(15))
    assert pack_4bit(nf4_codes(block, 64)[0]).tobytes() == packed_ref.numpy().tobytes()


def test_bitsandbytes_scales_by_the_float32_reciprocal_not_by_division():
    rng = np.random.default_rng(0)
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    a = rng.uniform(0.5, 4, 4000).astype(np.float32)
    x = (a.astype(np.float64) * rng.choice(midpoints, a.size)).astype(np.float32)
    x = np.concatenate([np.nextafter(x, np.float32(-9)), x, np.nextafter(x, np.float32(9))])
    a = np.tile(a, 3)
    by_mul = np.searchsorted(midpoints, x * (np.float32(1) / a))
    differ = np.nonzero(by_mul != np.searchsorted(midpoints, x / a))[0]
    assert differ.size > 0
    blocks = np.zeros((differ.size, 32), dtype=np.float32)
    blocks[:, 0], blocks[:, 1] = a[differ], x[differ]
    packed_ref, _ = bnb_quantize(blocks, 32, nested=False)
    second = packed_ref.numpy().reshape(-1, 16)[:, 0] & 15  # the code of blocks[:, 1]
    np.testing.assert_array_equal(second, by_mul[differ])
