"""The real SmolLM2-135M-Instruct in minift: its tokenizer and template, a known answer through
the command line, and a fine-tuned copy that is saved and used again (needs the fetched GGUF)."""

import json
from pathlib import Path

import pytest

from minift import cli
from minift.cli import main

QUESTION = "What is the capital of France?"


def test_tokenizer_gives_the_reference_ids(smollm2):
    _, tok = smollm2
    # ids from SmolLM2's own tokenizer (checked against transformers in tests/interop)
    assert tok.encode(QUESTION) == [1780, 314, 260, 3575, 282, 4649, 47]
    assert tok.encode("<|im_start|>user\n") == [1, 4093, 198]
    assert (tok.vocab_size, tok.eos_id, tok.tokens[tok.eos_id]) == (49152, 2, "<|im_end|>")


def test_chat_template_adds_smollm2_default_system_prompt(smollm2):
    _, tok = smollm2
    assert tok.default_system_prompt == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


def test_generate_chat_answers_paris(smollm2_gguf, capsys):
    assert main(["generate", "--model", "smollm2", "--chat", "--max-new-tokens", "20", QUESTION]) == 0
    assert "Paris" in capsys.readouterr().out


def test_chat_loop_answers_keeps_history_and_forgets_on_reset(smollm2_gguf, capsys, monkeypatch):
    lines = iter([QUESTION, "And of Italy?", "/reset", "Hi", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    prompts, reply = [], cli._reply

    def recording(model, tok, text, *args, **kwargs):
        prompts.append(text)
        return reply(model, tok, text, *args, **kwargs)

    monkeypatch.setattr(cli, "_reply", recording)
    assert main(["chat", "--model", str(smollm2_gguf), "--max-new-tokens", "20"]) == 0
    replies = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model> ")]
    assert len(replies) == 3 and "Paris" in replies[0]
    assert QUESTION in prompts[1] and "Paris" in prompts[1]  # the second turn sees the first
    assert QUESTION not in prompts[2] and prompts[2].count("<|im_start|>user") == 1  # after /reset


@pytest.mark.slow
def test_a_lora_run_of_the_real_model_is_its_adapter_and_loads_on_its_base(smollm2_gguf, tmp_path, capsys):
    """A LoRA run keeps only the adapter (no 540 MB merged copy), naming the GGUF it was trained
    on; ``--model run`` puts the adapter back on that base, tokenizer included."""
    out = tmp_path / "lora"
    assert main(["finetune", "--model", str(smollm2_gguf), "--method", "lora", "--steps", "1", "--batch-size", "2",
                 "--lr", "1e-4", "--out", str(out), "--save-every", "0"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(smollm2_gguf).resolve())
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--chat", "--max-new-tokens", "20", QUESTION]) == 0
    assert "Paris" in capsys.readouterr().out
