import json
import os
import stat

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minift.io import SafetensorsError, load_file, save_file
from minift.io.safetensors import to_bfloat16_bits


def test_round_trip_keeps_dtypes_shapes_values_and_metadata(tmp_path):
    tensors = {
        "w": np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32),
        "h": np.arange(4, dtype=np.float16),
        "ids": np.array([[1, 2], [3, 4]], dtype=np.int64),
        "scalar_like": np.array([7.5]),
    }
    save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    loaded, meta = load_file(tmp_path / "a.safetensors", with_metadata=True)
    assert meta == {"format": "pt"}
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name], value)


def test_header_is_8_byte_aligned_json(tmp_path):
    save_file({"x": np.ones(3, np.float32)}, tmp_path / "a.safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    assert json.loads(raw[8:8 + n])["x"] == {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}


def test_bf16_is_widened_to_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2")
    header = json.dumps({"b": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    (tmp_path / "b.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bf16.tobytes())
    assert np.array_equal(load_file(tmp_path / "b.safetensors")["b"], values)


@pytest.mark.parametrize("cut", [4, 20, -3])
def test_truncated_file_is_a_clear_error(tmp_path, cut):
    save_file({"x": np.ones((4, 4), np.float32)}, tmp_path / "a.safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:cut])
    with pytest.raises(SafetensorsError, match="truncated|too short|JSON"):
        load_file(tmp_path / "t.safetensors")


def test_failed_write_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"x": np.ones(2, np.float32)}, path)
    with pytest.raises(SafetensorsError):
        save_file({"x": np.ones(2, np.float32), "bad": np.array(["text"])}, path)
    assert np.array_equal(load_file(path)["x"], np.ones(2, np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def widened(bits: int) -> float:
    """The value of bfloat16 ``bits``: they are the top half of a float32."""
    return float(np.uint32(bits << 16).view(np.float32))


def nearest_bfloat16_bits(x: float) -> int:
    """The plain definition: of the two bfloat16 values around x (its float32 bits cut to the top
    16, and the next one away from zero), the nearer; on a tie, the one with an even last bit."""
    low = int(np.float32(x).view(np.uint32)) >> 16
    below, above = abs(x - widened(low)), abs(widened(low + 1) - x)
    if below != above:
        return low if below < above else low + 1
    return low if low % 2 == 0 else low + 1


#: float32 values near a halfway point between two bfloat16s (low half 0x7FFF, 0x8000, 0x8001),
#: where rounding to nearest-even and rounding halves up differ; random floats rarely land there.
near_ties = st.builds(lambda sign, top, low: float(np.uint32(sign << 31 | top << 16 | low).view(np.float32)),
                      st.integers(0, 1), st.integers(0, 0x7EFF), st.sampled_from([0x7FFF, 0x8000, 0x8001]))


@settings(max_examples=500, deadline=None)
@given(st.floats(min_value=-2.0**127, max_value=2.0**127, width=32) | near_ties)  # below the overflow to inf
def test_bfloat16_rounding_is_the_nearest_value_ties_to_even(x):
    """``to_bfloat16_bits`` (a bit trick: add 0x7FFF plus the lowest kept bit, cut) equals the
    nearest bfloat16, found by comparing the two candidates in float64."""
    assert int(to_bfloat16_bits(np.array([x], np.float32))[0]) == nearest_bfloat16_bits(x)


# ---- malformed headers and values: refused before any tensor is read -------------------------


def raw_file(path, header, data=b""):
    """A safetensors file with exactly this header (a dict, or raw JSON bytes) and data."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


F32_PAIR = np.arange(8, dtype=np.float32).tobytes()  # 32 bytes: room for two (4,) tensors


@pytest.mark.parametrize(("header", "message"), [
    ({"x": {"shape": [4], "data_offsets": [0, 16]}}, r"tensor 'x': header entry .* needs 'dtype'"),
    ({"x": ["F32", [4], [0, 16]]}, r"tensor 'x': header entry .* needs 'dtype'"),
    ({"x": {"dtype": "F8", "shape": [4], "data_offsets": [0, 16]}}, "unsupported dtype 'F8'"),
    ({"x": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, "shape .* not a list of non-negative"),
    ({"x": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, "shape .* not a list of non-negative"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}, r"data_offsets \[0\] is not \[begin, end\]"),
    ({"x": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 16]}}, "needs 4000000000000000000 bytes"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]}}, "ends at byte 48 of a 32-byte"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "y": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, "tensors 'x' and 'y' overlap"),
    ({"__metadata__": ["format"]}, "__metadata__ is a JSON list"),
    (b"[" * 100_000 + b"]" * 100_000, "nests JSON .* deeper"),
    (b'{"x\xff": 1}', "not UTF-8"),
])
def test_a_malformed_header_is_named_with_file_and_tensor(tmp_path, header, message):
    path = raw_file(tmp_path / "bad.safetensors", header, F32_PAIR)
    with pytest.raises(SafetensorsError, match=message) as error:
        load_file(path)
    assert str(path) in str(error.value)


def test_an_overlong_header_length_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes((2**63).to_bytes(8, "little") + b"{}")
    with pytest.raises(SafetensorsError, match="header length 9223372036854775808 runs past"):
        load_file(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_unless_allowed(tmp_path, bad):
    weights = np.ones((2, 3), np.float32)
    weights[1, 2] = bad
    save_file({"ok": np.ones(2, np.float32), "w": weights}, tmp_path / "a.safetensors")
    with pytest.raises(SafetensorsError, match=r"a.safetensors: tensor 'w' holds 1 NaN or infinite values"):
        load_file(tmp_path / "a.safetensors")
    loaded = load_file(tmp_path / "a.safetensors", allow_nonfinite=True)
    np.testing.assert_array_equal(loaded["w"], weights)


def test_a_folder_in_place_of_the_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="is a folder, but a safetensors file is a file"):
        load_file(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_saved_file_gets_the_permissions_of_any_new_file_not_mkstemps_private_ones(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_file({"w": np.ones(3, np.float32)}, tmp_path / "m.safetensors")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o666 & ~umask
    plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == plain
