"""``--base-dtype`` on ``minift finetune`` and ``minift dpo`` (issue 19): the frozen base trains in
16 bits, every saved file is float32 and loads back, and a run with nothing frozen is refused."""

import json
import struct

from minift.cli import main
from minift.training.pretrained import load_pretrained

TEXT = "Claims are filed online or by phone. The deductible is paid first. " * 60
RECORDS = [
    {"instruction": "How do I file a claim?", "input": "", "output": "Online or by phone."},
    {"instruction": "What is paid first?", "input": "", "output": "The deductible."},
]


def stored_dtypes(path) -> set[str]:
    """The dtypes in a safetensors header (8-byte length, then JSON), read without minift."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    return {info["dtype"] for name, info in header.items() if name != "__metadata__"}


def test_finetune_and_dpo_on_a_16_bit_base_save_float32_and_full_is_refused(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(TEXT)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert main(["train", "--data", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "tiny"), "--steps", "1",
                 "--batch-size", "2", "--block-size", "32"]) == 0
    common = ["--model", str(tmp_path / "tiny"), "--steps", "2", "--batch-size", "2"]
    out = tmp_path / "lora"
    assert main(["--threads", "1", "finetune", *common, "--data", str(tmp_path / "qa.jsonl"), "--method", "lora",
                 "--out", str(out), "--base-dtype", "bf16", "--save-merged"]) == 0
    printed = capsys.readouterr().out
    assert "frozen base: 29 weights (the Linear ones and the embedding) stored in bf16" in printed  # 4 x 7 + 1
    assert stored_dtypes(out / "adapter" / "adapter_model.safetensors") == {"F32"}
    assert stored_dtypes(out / "model.safetensors") == {"F32"}
    merged, _ = load_pretrained(str(out))
    assert {p.dtype.name for p in merged.parameters()} == {"float32"}

    dpo = tmp_path / "dpo"
    assert main(["--threads", "1", "dpo", *common, "--out", str(dpo), "--eval-every", "0", "--base-dtype", "f16"]) == 0
    assert "stored in f16" in capsys.readouterr().out
    assert stored_dtypes(dpo / "adapter" / "adapter_model.safetensors") == {"F32"}

    assert main(["--threads", "1", "finetune", *common, "--method", "full", "--out", str(tmp_path / "full"),
                 "--base-dtype", "bf16"]) == 1
    assert "no frozen Linear weight to store in bf16" in capsys.readouterr().err
