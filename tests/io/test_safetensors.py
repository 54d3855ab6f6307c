import json

import numpy as np
import pytest

from minift.io import SafetensorsError, load_file, save_file


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
