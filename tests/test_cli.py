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
    merged = ["--save-merged"] if method in ("lora", "qlora") else []
    assert main(["finetune", "--model", str(pretrained / "tiny"), "--data", str(pretrained / "qa.jsonl"),
                 "--method", method, "--out", str(out), "--steps", "2", "--batch-size", "2", *merged]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").exists()
    # a plain Llama leaves as a Hugging Face folder; methods that added modules keep minift's format
    assert config.get("model_type") == (None if method in ("adapter", "prefix") else "llama")
    if merged:
        adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str((pretrained / "tiny").resolve())
    assert main(["generate", "--model", str(out), "--chat", "--max-new-tokens", "5", "Hours?"]) == 0
    assert main(["eval", "--model", str(out), "--data", str(pretrained / "qa.jsonl")]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_a_lora_run_saves_the_adapter_alone_unless_asked_for_the_merged_model(pretrained):
    out = pretrained / "lora_only"
    assert main(["finetune", "--model", str(pretrained / "tiny"), "--data", str(pretrained / "qa.jsonl"),
                 "--method", "lora", "--out", str(out), "--steps", "1", "--batch-size", "2"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()


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


def test_export_merges_a_qlora_adapter_and_writes_both_formats(pretrained, tmp_path, capsys):
    run = tmp_path / "qlora"
    assert main(["finetune", "--model", str(pretrained / "tiny"), "--data", str(pretrained / "qa.jsonl"),
                 "--method", "qlora", "--out", str(run), "--steps", "1", "--batch-size", "2"]) == 0
    export = ["export", "--model", str(pretrained / "tiny"), "--adapter", str(run / "adapter")]
    assert main([*export, "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "into the dequantized NF4 base Q(W), block 64" in out and "merged model" in out
    assert "model.safetensors" in out and "total" in out
    assert main([*export, "--format", "gguf", "--dtype", "q8_0", "--out", str(tmp_path / "model.gguf")]) == 0
    assert "(GGUF file, q8_0)" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "hf"), "--max-new-tokens", "3", "Hours?"]) == 0
    assert main(["generate", "--model", str(tmp_path / "model.gguf"), "--max-new-tokens", "3", "Hours?"]) == 0


def test_export_reports_bad_input_without_writing(pretrained, tmp_path, capsys):
    base = ["export", "--model", str(pretrained / "tiny"), "--out", str(tmp_path / "out")]
    assert main([*base, "--format", "gguf", "--dtype", "bf16"]) == 1
    assert "dtype 'bf16' cannot be written as gguf" in capsys.readouterr().err
    assert main([*base, "--format", "hf", "--adapter", str(tmp_path / "no_adapter")]) == 1
    assert "no_adapter: no such folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
