"""The ``minift`` command end to end on tiny settings: train -> finetune (each method) -> generate/eval."""

import json

import pytest

from minift.cli import main
from minift.training.methods import METHODS

TEXT = "Claims are filed online or by phone. The deductible is paid first. " * 60
RECORDS = [
    {"instruction": "How do I file a claim?", "input": "", "output": "Online or by phone."},
    {"instruction": "What is paid first?", "input": "", "output": "The deductible."},
    {"messages": [{"role": "user", "content": "Hours?"}, {"role": "assistant", "content": "9 to 5."}]},
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(TEXT)
    (root / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    code = main(["train", "--data", str(root / "corpus.txt"), "--out", str(root / "tiny"), "--steps", "2",
                 "--batch-size", "2", "--block-size", "32"])
    assert code == 0
    return root


@pytest.mark.parametrize("method", METHODS)
def test_finetune_then_generate_and_eval_with_every_method(pretrained, method, capsys):
    out = pretrained / method
    assert main(["finetune", "--model", str(pretrained / "tiny"), "--data", str(pretrained / "qa.jsonl"),
                 "--method", method, "--out", str(out), "--steps", "2", "--batch-size", "2"]) == 0
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    if method == "lora":
        assert (out / "adapter" / "adapter_config.json").exists()
    assert main(["generate", "--model", str(out), "--chat", "--max-new-tokens", "5", "Hours?"]) == 0
    assert main(["eval", "--model", str(out), "--data", str(pretrained / "qa.jsonl")]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_resume_continues_from_the_checkpoint(pretrained, capsys):
    args = ["finetune", "--model", str(pretrained / "tiny"), "--data", str(pretrained / "qa.jsonl"),
            "--out", str(pretrained / "resumed"), "--batch-size", "2", "--save-every", "1"]
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "3", "--resume"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out


def test_malformed_jsonl_is_reported_with_file_and_line(pretrained, capsys):
    bad = pretrained / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    code = main(["finetune", "--model", str(pretrained / "tiny"), "--data", str(bad), "--out",
                 str(pretrained / "never"), "--steps", "1"])
    assert code == 1
    assert f"{bad}:2" in capsys.readouterr().err


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nothing"), "hi"]) == 1
    assert "not a minift model folder" in capsys.readouterr().err


def test_threads_flag_limits_blas_threads_during_the_command(monkeypatch):
    from threadpoolctl import threadpool_info

    from minift import cli

    seen = []
    monkeypatch.setattr(cli, "cmd_demo", lambda args: seen.append({i["num_threads"] for i in threadpool_info()}))
    assert cli.main(["demo"]) == 0  # the demo's default: one BLAS thread
    assert cli.main(["--threads", "2", "demo"]) == 0
    assert seen == [{1}, {2}]
