"""``minift demo --fast``: the whole pipeline runs and reports learning and forgetting per method."""

import json

from minift import load_pretrained
from minift.data import ByteTokenizer, bundled_path, load_jsonl
from minift.studies.demo import DemoSettings, _question, answer, run_demo
from minift.training.methods import METHODS


def test_the_fast_demo_runs_every_method_and_writes_its_report(tmp_path, capsys):
    results = run_demo(tmp_path, DemoSettings.fast(), progress=False)
    assert list(results) == ["pretrained", *METHODS]
    for name, row in results.items():
        assert row["domain_loss"] > 0 and row["general_ppl"] > 1 and 0 <= row["qa_accuracy"] <= 1, name
    assert results["pretrained"]["trainable_pct"] == 0
    assert results["full"]["trainable_pct"] == 100
    assert 0 < results["lora"]["trainable_pct"] < 10
    # eight steps are enough for the methods with many trained parameters to show learning
    for method in ("full", "freeze", "lora"):
        assert results[method]["domain_loss"] < results["pretrained"]["domain_loss"] - 0.01, method
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["lora"]["answers"] == results["lora"]["answers"]
    for picture in ("forgetting.png", "delta_spectrum.png", "pretrain/curves.png"):
        assert (tmp_path / picture).stat().st_size > 5000, picture
    out = capsys.readouterr().out
    assert "general ppl" in out and "ΔW" in out
    # every model ends in a folder that loads (`minift generate --model`) and answers as in the demo
    question = _question(load_jsonl(bundled_path("insurer_eval.jsonl"))[0])
    for name in results:
        model, tok = load_pretrained(tmp_path / name)
        assert isinstance(tok, ByteTokenizer)
        kind = json.loads((tmp_path / name / "config.json").read_text()).get("model_type")
        assert kind == (None if name in ("adapter", "prefix") else "llama"), name
        if name not in ("lora", "qlora"):  # merging rounds: a long greedy answer may then differ
            assert results[name]["answers"][0].startswith(answer(model, tok, question, 16)), name
