"""``export_model`` on a small random Llama with the byte tokenizer: Hugging Face and GGUF round
trips, merging a LoRA adapter (float base) and a QLoRA adapter (into the dequantized NF4 base),
and bad input failing before anything is written."""

import os

import numpy as np
import pytest

from minift import load_pretrained
from minift.data import ByteTokenizer
from minift.io import AdapterFormatError, load_file, save_file
from minift.io.peft_adapter import read_adapter_base
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.studies.qlora_merge import random_adapter
from minift.training import export
from minift.training.export import ExportError, export_model, model_logits
from minift.training.methods import MethodOptions, prepare_model
from minift.training.pretrained import save_pretrained

TEXT = "<|im_start|>user\nthe café 🤗<|im_end|>"
IDS = np.array([[1, 72, 101, 108, 108, 111, 33, 2], [40, 50, 60, 70, 80, 90, 100, 110]])


def tiny(dim=64, n_layers=2, seed=1):
    config = LlamaConfig(vocab_size=ByteTokenizer().vocab_size, dim=dim, n_layers=n_layers, n_heads=4,
                         n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    return LlamaForCausalLM(config, seed=seed)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_pretrained(tiny(), ByteTokenizer(), tmp_path_factory.mktemp("export") / "base")


def trained_adapter(base_folder, method, folder):
    """A LoRA / QLoRA adapter on ``base_folder`` with random B (as if trained), saved -> (folder,
    the unmerged model's logits on IDS: the model as it was trained)."""
    model, _ = load_pretrained(base_folder)
    peft_model, _ = prepare_model(model, method, MethodOptions(lora_targets=("q_proj", "v_proj", "down_proj")))
    random_adapter(peft_model, relative_size=0.05)
    peft_model.save_pretrained(folder)
    return folder, model_logits(peft_model, IDS)


def logits_of(path):
    return model_logits(load_pretrained(path)[0], IDS)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(("fmt", "out_name"), [("hf", "hf"), ("gguf", "model.gguf")])
def test_an_f32_export_loads_back_with_equal_logits(base, tmp_path, fmt, out_name):
    report = export_model(base, tmp_path / out_name, fmt)
    assert report.dtype == "f32" and report.drift is None
    assert sum(report.files.values()) > 64 * 64 * 4
    model, tokenizer = load_pretrained(report.path)
    assert tokenizer.encode(TEXT) == ByteTokenizer().encode(TEXT)
    np.testing.assert_allclose(model_logits(model, IDS), logits_of(base), atol=1e-5)


def test_an_f16_hf_export_is_close_and_half_the_size(base, tmp_path):
    f32 = export_model(base, tmp_path / "f32", "hf")
    f16 = export_model(base, tmp_path / "f16", "hf", dtype="f16")
    assert f16.files["model.safetensors"] < 0.55 * f32.files["model.safetensors"]
    np.testing.assert_allclose(logits_of(f16.path), logits_of(base), atol=5e-2)


def test_a_float_base_lora_adapter_merges_with_no_drift(base, tmp_path):
    adapter, as_trained = trained_adapter(base, "lora", tmp_path / "adapter")
    assert read_adapter_base(adapter) is None
    report = export_model(base, tmp_path / "merged", "hf", adapter=adapter)
    assert report.adapter_base.startswith("float base W")
    assert report.drift["max_abs"] < 1e-5 and report.drift["top1_agree"] == 1.0
    np.testing.assert_allclose(logits_of(report.path), as_trained, atol=1e-5)
    assert np.abs(logits_of(base) - as_trained).max() > 1e-2  # the adapter does change the model


def test_a_qlora_adapter_is_merged_into_the_dequantized_nf4_base(base, tmp_path):
    adapter, as_trained = trained_adapter(base, "qlora", tmp_path / "adapter")
    assert read_adapter_base(adapter) == {"quantization": "nf4", "blocksize": 64, "double_quant": True}
    report = export_model(base, tmp_path / "into_qw", "hf", adapter=adapter)
    assert report.adapter_base.startswith("dequantized NF4 base Q(W), block 64")
    assert report.drift["max_abs"] < 1e-5
    np.testing.assert_allclose(logits_of(report.path), as_trained, atol=1e-5)

    into_w = export_model(base, tmp_path / "into_w", "hf", adapter=adapter, adapter_base="float")
    assert "trained on NF4" in into_w.adapter_base
    assert into_w.drift["max_abs"] > 1e-3  # the base's NF4 rounding error comes back
    assert np.abs(logits_of(into_w.path) - as_trained).max() > 1e-3


def test_a_lora_run_folder_exports_as_its_base_with_the_adapter_merged(base, tmp_path):
    """``minift finetune --method qlora --out run`` leaves run/adapter naming its base; exporting
    ``run`` merges that adapter into that base (the dequantized NF4 one, as recorded)."""
    from minift.training.pretrained import base_model_reference  # noqa: PLC0415

    model, _ = load_pretrained(base)
    peft_model, _ = prepare_model(model, "qlora", MethodOptions())
    random_adapter(peft_model, relative_size=0.05)
    peft_model.peft_config["default"].base_model_name_or_path = base_model_reference(base)
    peft_model.save_pretrained(tmp_path / "run" / "adapter")
    report = export_model(tmp_path / "run", tmp_path / "merged", "hf")
    assert report.adapter_base.startswith("dequantized NF4 base Q(W)") and report.drift["max_abs"] < 1e-5
    np.testing.assert_allclose(logits_of(report.path), model_logits(peft_model, IDS), atol=1e-5)


def test_adapter_base_nf4_stands_in_for_a_missing_record(base, tmp_path, monkeypatch):
    adapter, as_trained = trained_adapter(base, "qlora", tmp_path / "adapter")
    monkeypatch.setattr(export, "read_adapter_base", lambda folder: None)  # as if saved by PEFT
    guessed_float = export_model(base, tmp_path / "float", "hf", adapter=adapter)
    assert np.abs(logits_of(guessed_float.path) - as_trained).max() > 1e-3
    told_nf4 = export_model(base, tmp_path / "nf4", "hf", adapter=adapter, adapter_base="nf4")
    assert "as asked" in told_nf4.adapter_base
    np.testing.assert_allclose(logits_of(told_nf4.path), as_trained, atol=1e-5)


def test_a_malformed_base_record_is_a_clear_error(base, tmp_path):
    adapter, _ = trained_adapter(base, "lora", tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"minift.base": '{"quantization": "int3"}'})
    with pytest.raises(AdapterFormatError, match="metadata minift.base is .*int3.* expected"):
        export_model(base, tmp_path / "out", "hf", adapter=adapter)
    assert leftovers(tmp_path) == ["adapter"]


@pytest.mark.parametrize(("other", "message"), [
    (tiny(dim=32), r"model.layers.0.mlp.down_proj is \(32, 96\) \(out, in\) in the model but the adapter's "
                   r"B A is \(64, 96\)"),
    (tiny(n_layers=1), "changes model.layers.1.mlp.down_proj, which that model does not have"),
])
def test_an_adapter_on_the_wrong_base_is_refused_before_writing(base, tmp_path, other, message):
    adapter, _ = trained_adapter(base, "lora", tmp_path / "adapter")
    wrong = save_pretrained(other, ByteTokenizer(), tmp_path / "wrong")
    with pytest.raises(ExportError, match=f"does not fit {wrong}: .*{message}.*trained on another base"):
        export_model(wrong, tmp_path / "out" / "merged", "gguf", adapter=adapter)
    assert leftovers(tmp_path) == ["adapter", "wrong"]


@pytest.mark.parametrize(("fmt", "dtype", "message"), [
    ("hf", "q8_0", "dtype 'q8_0' cannot be written as hf: choose one of f32, f16, bf16"),
    ("gguf", "bf16", "dtype 'bf16' cannot be written as gguf"),
    ("onnx", None, "unknown format 'onnx'"),
])
def test_an_unknown_format_or_dtype_is_refused(base, tmp_path, fmt, dtype, message):
    with pytest.raises(ExportError, match=message):
        export_model(base, tmp_path / "out", fmt, dtype=dtype)
    assert leftovers(tmp_path) == []


def test_an_unknown_adapter_base_is_refused(base, tmp_path):
    with pytest.raises(ExportError, match="adapter base 'int8'"):
        export_model(base, tmp_path / "out", "hf", adapter=tmp_path, adapter_base="int8")


def test_export_never_overwrites(base, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"keep me")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("keep me")
    for out, fmt in [("model.gguf", "gguf"), ("folder", "hf"), ("folder", "gguf")]:
        with pytest.raises(ExportError, match="already exists"):
            export_model(base, tmp_path / out, fmt)
    assert (tmp_path / "model.gguf").read_bytes() == b"keep me"
    assert leftovers(tmp_path / "folder") == ["notes.txt"]


def test_an_empty_folder_may_receive_an_hf_export(base, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "config.json" in export_model(base, tmp_path / "empty", "hf").files


def test_an_unwritable_place_is_refused(base, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ExportError, match="is not a writable folder"):
        export_model(base, tmp_path / "a_file" / "model.gguf", "gguf")
    assert leftovers(tmp_path) == ["a_file"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes in read-only folders")
def test_a_read_only_folder_is_refused(base, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ExportError, match="is not a writable folder"):
        export_model(base, locked / "hf", "hf")


def test_a_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model"):
        export_model(tmp_path / "nothing", tmp_path / "out", "hf")
    assert leftovers(tmp_path) == []


def test_a_writer_that_fails_half_way_leaves_nothing(base, tmp_path, monkeypatch):
    def half_then_fail(model, tokenizer, folder, **kwargs):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_hf_folder", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_model(base, tmp_path / "hf", "hf")
    assert leftovers(tmp_path) == []
