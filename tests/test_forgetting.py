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


def test_saving_a_plot_keeps_the_callers_matplotlib_backend(tmp_path):
    """The PNG writers must not switch the process to Agg: in a notebook that silently ended inline plots."""
    import matplotlib
    import numpy as np

    from minift.data import DataLoader, TextDataset
    from minift.demo import plot_results, plot_spectra
    from minift.forgetting import plot_forgetting
    from minift.train import TrainConfig, Trainer

    before = matplotlib.get_backend()
    matplotlib.use("template")  # any backend other than Agg (a notebook has its inline one)
    try:
        row = {"method": "pretrained", "domain_loss": 3.0, "qa_accuracy": 0.5, "perplexity": 20.0}
        plot_forgetting([row, {**row, "method": "full"}], tmp_path / "forgetting.png")
        plot_results({"full": {"domain_loss": 2.0, "general_ppl": 9.0, "qa_accuracy": 0.4}}, tmp_path / "results.png")
        plot_spectra([{"singular_values": np.array([3.0, 2.0, 1.0])}], tmp_path / "spectra.png")
        text = TextDataset("minift keeps the backend. " * 8, TOK, 16)
        Trainer(tiny(), TrainConfig(max_steps=1, progress=False, plot=False),
                DataLoader(text, 2, pad_id=TOK.pad_id)).plot(tmp_path / "curves.png")
        assert matplotlib.get_backend() == "template"
        assert all((tmp_path / f"{name}.png").stat().st_size > 0 for name in ("forgetting", "results", "spectra",
                                                                              "curves"))
    finally:
        matplotlib.use(before)
