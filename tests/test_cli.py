"""The ``minift`` command end to end on tiny settings: train -> finetune (each method) -> generate/eval."""

import errno
import json
import math
from pathlib import Path

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


def test_every_flag_of_every_command_is_described_with_its_default_and_examples_below():
    import argparse

    from minift.cli import build_parser
    from minift.studies.demo import DemoSettings

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"minift {name} {action.option_strings or action.dest}: no help"
        text = command.format_help()
        assert "examples:\n  minift " + name in text, name
        for action in command._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)
    top = " ".join(parser.format_help().split())
    assert f"each of {len(DemoSettings().methods)} methods" in top
    assert all(method in top for method in DemoSettings().methods)


def test_resume_command_drops_overwrite():
    from minift.cli import resume_command

    again = resume_command(["demo", "--overwrite", "--out", "runs/my demo"])
    assert again == "minift demo --out 'runs/my demo' --resume"
    assert resume_command(["finetune", "--resume", "--out", "x"]) == "minift finetune --resume --out x"


def test_a_second_demo_into_the_same_folder_is_refused_and_names_resume(tmp_path, monkeypatch, capsys):
    from minift import cli

    (tmp_path / "demo_settings.json").write_text("{}")
    assert cli.main(["demo", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "already holds a demo run" in err and "--resume" in err and "--overwrite" in err


def test_generate_streams_the_reply_and_marks_one_cut_by_the_token_limit(pretrained, capsys):
    from minift import load_pretrained
    from minift.models.generate import generate

    model, tok = load_pretrained(pretrained / "tiny")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hours?"}], add_generation_prompt=True)
    expected = tok.decode(generate(model, [tok.encode(prompt)], 6, eos_id=tok.eos_id)[0], skip_special=True)
    assert tok.eos_id not in generate(model, [tok.encode(prompt)], 6)[0]  # so the limit, not eos, ends the reply
    assert main(["generate", "--model", str(pretrained / "tiny"), "--chat", "--max-new-tokens", "6", "Hours?"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + " [max tokens]\n"
    assert f"loading {pretrained / 'tiny'} ... loaded in " in err  # a status line while the model loads
    # plain continuation: no marker, the limit is the only way it ends
    assert main(["generate", "--model", str(pretrained / "tiny"), "--max-new-tokens", "4", "Claims"]) == 0
    assert "[max tokens]" not in capsys.readouterr().out


def test_chat_streams_replies_and_survives_ctrl_c_reset_and_ctrl_d(pretrained, monkeypatch, capsys):
    from minift import cli

    lines = iter(["Hours?", "What is paid first?", "/reset", "Hours?"])

    def typed(prompt):
        print(prompt, end="")
        line = next(lines, None)
        if line is None:
            raise EOFError  # Ctrl-D
        return line

    real_stream, replies = cli.stream, []

    def ctrl_c_in_the_second_reply(*args, **kwargs):
        replies.append(1)
        for i, token in enumerate(real_stream(*args, **kwargs)):
            if len(replies) == 2 and i == 3:
                raise KeyboardInterrupt
            yield token

    monkeypatch.setattr("builtins.input", typed)
    monkeypatch.setattr(cli, "stream", ctrl_c_in_the_second_reply)
    assert cli.main(["chat", "--model", str(pretrained / "tiny"), "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    turns = out.split("you> ")
    assert turns[1].startswith("model> ") and turns[1].endswith(" [max tokens]\n")
    assert turns[2].startswith("model> ") and turns[2].endswith(" [stopped]\n")  # the reply stopped ...
    assert turns[3] == "history cleared: the next message starts a new conversation\n"  # ... the chat did not
    assert turns[4].startswith("model> ") and turns[4].endswith(" [max tokens]\n")
    assert turns[5] == "\n"  # Ctrl-D: the shell's prompt starts on a new line
    assert turns[1] == turns[4]  # after /reset, the same question gets the same (greedy) answer


def test_a_backend_that_cannot_run_is_one_line_without_traceback(tmp_path):
    import importlib.util
    import os
    import subprocess
    import sys

    from minift.backend import cupy_available

    if cupy_available():
        pytest.skip("CuPy runs here: MINIFT_BACKEND=cupy is no error on this machine")
    env = {**os.environ, "MINIFT_BACKEND": "cupy"}
    run = subprocess.run([sys.executable, "-m", "minift", "--help"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, check=False)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert run.stderr.startswith("minift: backend 'cupy' needs")
    if importlib.util.find_spec("cupy") is None:
        assert "pip install 'minift[gpu]'" in run.stderr and "unset MINIFT_BACKEND" in run.stderr


def first_metrics_row(folder):
    return json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])


def test_dpo_on_the_bundled_pairs_then_dpo_after_that_lora_run(pretrained, capsys):
    out = pretrained / "dpo"
    code = main(["--threads", "1", "dpo", "--model", str(pretrained / "tiny"), "--out", str(out), "--steps", "2",
                 "--eval-every", "2", "--batch-size", "2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "adapter switched off" in printed and "held-out pairs: loss" in printed
    row = first_metrics_row(out)
    assert row["step"] == 1 and abs(row["loss"] - math.log(2)) < 1e-6 and row["rewards/margins"] == 0.0
    assert (out / "rewards.png").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    base = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base) == (pretrained / "tiny").resolve()

    # DPO after a LoRA run: its trained adapter is the starting policy, so the reference is precomputed
    pairs = pretrained / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["instruction"], "chosen": r["output"], "rejected": "No idea."})
                             + "\n" for r in RECORDS[:2]))
    again = pretrained / "dpo-again"
    assert main(["--threads", "1", "dpo", "--model", str(out), "--data", str(pairs), "--out", str(again),
                 "--steps", "1", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "training the adapter of" in printed and "computed once before step 1" in printed
    assert abs(first_metrics_row(again)["loss"] - math.log(2)) < 1e-5
    base = json.loads((again / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base) == (pretrained / "tiny").resolve()  # the real base, not the run folder


def test_dpo_reports_a_bad_pair_with_file_and_line(pretrained, tmp_path, capsys):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    assert main(["dpo", "--model", str(pretrained / "tiny"), "--data", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert f"{bad}:2: missing field 'rejected'" in capsys.readouterr().err


def test_a_full_disk_is_one_clear_line_naming_the_file(monkeypatch, capsys):
    from minift import cli

    def disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/model.safetensors")

    monkeypatch.setattr(cli, "cmd_train", disk_full)
    assert cli.main(["train", "--data", "c.txt", "--out", "runs/x"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device while writing runs/x/model.safetensors; free some disk space" in err
    assert "Traceback" not in err


def test_a_second_run_into_the_same_out_is_refused_and_overwrite_replaces_it(pretrained, tmp_path, capsys):
    run = ["--threads", "1", "finetune", "--model", str(pretrained / "tiny"), "--data", str(pretrained / "qa.jsonl"),
           "--out", str(tmp_path / "ft"), "--batch-size", "2"]
    assert main([*run, "--steps", "3"]) == 0
    assert main([*run, "--steps", "2"]) == 1
    assert "already holds a training run" in capsys.readouterr().err and (tmp_path / "ft" / "step-000003").is_dir()
    assert main([*run, "--steps", "2", "--overwrite", "--resume"]) == 1
    assert main([*run, "--steps", "2", "--overwrite"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # the old run's rows are gone, not mixed in
    assert not (tmp_path / "ft" / "step-000003").exists()
