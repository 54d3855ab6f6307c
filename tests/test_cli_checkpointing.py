"""``--gradient-checkpointing`` on ``minift finetune`` and ``minift dpo`` (issue 19): the same run,
step for step, as without it."""

import json

from minift.autograd.checkpointing import Checkpoint
from minift.cli import main

TEXT = "Claims are filed online or by phone. The deductible is paid first. " * 60
RECORDS = [
    {"instruction": "How do I file a claim?", "input": "", "output": "Online or by phone."},
    {"instruction": "What is paid first?", "input": "", "output": "The deductible."},
]


def losses(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def test_finetune_and_dpo_with_gradient_checkpointing_repeat_the_plain_run(tmp_path, monkeypatch):
    recomputed = []
    backward = Checkpoint.backward
    monkeypatch.setattr(Checkpoint, "backward", staticmethod(lambda ctx, g: recomputed.append(1) or backward(ctx, g)))
    (tmp_path / "corpus.txt").write_text(TEXT)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert main(["train", "--data", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "tiny"), "--steps", "1",
                 "--batch-size", "2", "--block-size", "32"]) == 0
    runs = {}
    for flags in ([], ["--gradient-checkpointing"]):
        out = tmp_path / f"lora{len(flags)}"
        assert main(["--threads", "1", "finetune", "--model", str(tmp_path / "tiny"), "--data",
                     str(tmp_path / "qa.jsonl"), "--method", "lora", "--out", str(out), "--steps", "3",
                     "--batch-size", "2", *flags]) == 0
        runs[len(flags)] = losses(out)
        assert bool(recomputed) == bool(flags)
    # a step's loss depends on every earlier step's gradients: equal losses, equal gradients
    assert len(runs[0]) == 3 and runs[1] == runs[0]
    finetuned = len(recomputed)
    assert main(["--threads", "1", "dpo", "--model", str(tmp_path / "tiny"), "--out", str(tmp_path / "dpo"),
                 "--steps", "1", "--eval-every", "0", "--batch-size", "2", "--gradient-checkpointing"]) == 0
    assert len(losses(tmp_path / "dpo")) == 1 and len(recomputed) > finetuned
