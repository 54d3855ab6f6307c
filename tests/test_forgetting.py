"""The forgetting measurement end to end on a tiny byte-level model (the real run is minutes long)."""

import json

from minift.cli import main
from minift.data import ByteTokenizer
from minift.forgetting import ForgettingSettings, format_table, run_forgetting
from minift.models import LlamaConfig, LlamaForCausalLM

TOK = ByteTokenizer()


def tiny():
    return LlamaForCausalLM(LlamaConfig(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                        ffn_dim=48, max_seq_len=384), seed=0)


def test_rows_table_json_and_plot(tmp_path):
    model = tiny()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    settings = ForgettingSettings(methods=("full", "lora"), steps=2, batch_size=2, qa_questions=3, ppl_blocks=2,
                                  progress=False)
    rows = run_forgetting(model, TOK, settings, tmp_path)
    assert [r["method"] for r in rows] == ["pretrained", "full", "lora"]
    assert rows[1]["trainable_pct"] == 100 and 0 < rows[2]["trainable_pct"] < 50
    assert all(0 <= r["qa_accuracy"] <= 1 and r["perplexity"] > 1 for r in rows)
    assert rows[1]["domain_loss"] != rows[0]["domain_loss"]  # training did something
    assert all((model.state_dict()[k] == v).all() for k, v in before.items())  # the base is untouched
    saved = json.loads((tmp_path / "forgetting.json").read_text())
    assert saved["rows"] == rows and (tmp_path / "forgetting.png").stat().st_size > 0
    table = format_table(rows)
    assert "(+0.00)" in table.splitlines()[1] and len(table.splitlines()) == 4


def test_cli_rejects_unknown_methods(capsys):
    assert main(["forgetting", "--methods", "full,magic", "--model", "nowhere"]) == 1
    assert "unknown method(s) magic" in capsys.readouterr().err



def test_every_method_has_a_default_learning_rate():
    from minift.forgetting import LEARNING_RATES
    from minift.methods import METHODS

    assert set(LEARNING_RATES) == set(METHODS)
