"""``--packing`` on ``minift finetune`` (issue 19): a first step over the same examples has the padded
run's loss, the padding saved is printed, and prefix tuning is refused."""

import json

from minift.cli import main

TEXT = "Claims are filed online or by phone. The deductible is paid first. " * 60
RECORDS = [
    {"instruction": "How do I file a claim?", "input": "", "output": "Online or by phone."},
    {"instruction": "What is paid first?", "input": "", "output": "The deductible."},
    {"messages": [{"role": "user", "content": "Hours?"}, {"role": "assistant", "content": "9 to 5."}]},
]


def first_loss(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return next(row["loss"] for row in rows if "loss" in row)


def test_finetune_with_packing_starts_from_the_padded_runs_loss_and_refuses_prefix(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(TEXT)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert main(["train", "--data", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "tiny"), "--steps", "1",
                 "--batch-size", "2", "--block-size", "32"]) == 0
    common = ["--threads", "1", "finetune", "--model", str(tmp_path / "tiny"), "--data", str(tmp_path / "qa.jsonl"),
              "--steps", "1", "--batch-size", "3", "--method", "lora"]
    assert main([*common, "--out", str(tmp_path / "padded")]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "packed"), "--packing", "--pack-len", "384"]) == 0
    out = capsys.readouterr().out
    assert "packing: 3 examples in 1 rows of at most 384 tokens" in out and "0.0% packed" in out
    # one batch holds all three examples either way: the same tokens, the same loss (float32)
    assert abs(first_loss(tmp_path / "packed") - first_loss(tmp_path / "padded")) < 1e-5
    assert main([*common[:-1], "prefix", "--out", str(tmp_path / "prefix"), "--packing"]) == 1
    assert "prefix tuning cannot train on packed rows" in capsys.readouterr().err
    # the bundled set's byte-level chats are longer than 256 tokens: by default a row fits the longest
    bundled = [arg for arg in common if arg not in ("--data", str(tmp_path / "qa.jsonl"))]
    assert main([*bundled, "--out", str(tmp_path / "bundled"), "--packing"]) == 0
    assert "packing: 356 examples in 232 rows of at most 301 tokens" in capsys.readouterr().out
