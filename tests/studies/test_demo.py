"""``minift demo --fast``: the whole pipeline runs and reports learning and forgetting per method;
Ctrl-C stops it, and ``--resume`` continues it stage by stage to the same numbers."""

import contextlib
import io
import json
import os
import signal

import pytest
from threadpoolctl import threadpool_limits

from minift import load_pretrained
from minift.data import ByteTokenizer, bundled_path, load_jsonl
from minift.studies.demo import DemoSettings, _question, answer, run_demo
from minift.training import Trainer, TrainingInterrupted
from minift.training.methods import METHODS


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """As ``minift demo`` runs (minift.cli.DEFAULT_THREADS): a second thread only busy-waits on
    the tiny model's matrices, and slows every step when the machine is shared."""
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One uninterrupted fast demo: (its folder, its results, what it printed)."""
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = run_demo(out, DemoSettings.fast(), progress=False)
    return out, results, printed.getvalue()


def test_the_fast_demo_runs_every_method_and_writes_its_report(demo_run):
    tmp_path, results, out = demo_run
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
    for picture in ("forgetting.png", "delta_spectrum.png", "pretrain/curves.png", "lora/curves.png"):
        assert (tmp_path / picture).stat().st_size > 5000, picture
    assert "general ppl" in out and "ΔW" in out
    # it ends by saying what the numbers mean, what to run for fluent answers, and where the models are
    assert "word salad" in out and "minift finetune --model smollm2" in out
    for name in results:
        assert f"{name:>10}  {tmp_path / name}" in out, name
    # every model ends in a folder that loads (`minift generate --model`) and answers as in the demo
    question = _question(load_jsonl(bundled_path("insurer_eval.jsonl"))[0])
    for name in results:
        model, tok = load_pretrained(tmp_path / name)
        assert isinstance(tok, ByteTokenizer)
        kind = json.loads((tmp_path / name / "config.json").read_text()).get("model_type")
        assert kind == (None if name in ("adapter", "prefix") else "llama"), name
        if name not in ("lora", "qlora"):  # merging rounds: a long greedy answer may then differ
            assert results[name]["answers"][0].startswith(answer(model, tok, question, 16)), name


def test_every_curve_has_an_eval_line(demo_run):
    """The pretraining evaluates on held-out general text, each fine-tuning on held-out insurer questions."""
    tmp_path, _, _ = demo_run
    for run in ("pretrain", *METHODS):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        eval_steps = [r["step"] for r in rows if "eval_loss" in r]
        assert eval_steps == ([10, 20] if run == "pretrain" else [4, 8]), run


def interrupt_at(monkeypatch, run: str, step: int) -> list:
    """Send SIGINT (Ctrl-C) during step ``step`` of the Trainer writing to ``<out>/<run>``;
    returns the log of (run, step) of every training step taken."""
    steps_taken = []
    train_step = Trainer.train_step

    def step_and_maybe_interrupt(self):
        result = train_step(self)
        steps_taken.append((self.out_dir.name, self.step))
        if (self.out_dir.name, self.step) == (run, step):
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_and_maybe_interrupt)
    return steps_taken


def test_ctrl_c_stops_the_demo_and_resume_finishes_it_with_the_same_numbers(demo_run, tmp_path, monkeypatch):
    _, straight, _ = demo_run
    settings = DemoSettings.fast()
    steps = interrupt_at(monkeypatch, "pretrain", 12)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 12"):
        run_demo(tmp_path, settings, progress=False)
    assert not (tmp_path / "pretrained").exists()  # no half-trained model left as if it were the result
    assert not (tmp_path / "full").exists()  # and nothing went on to fine-tune it
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        run_demo(tmp_path, settings, progress=False)  # a new run does not silently replace this one

    steps = interrupt_at(monkeypatch, "lora", 5)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 5"):
        run_demo(tmp_path, settings, progress=False, resume=True)
    assert steps[0] == ("pretrain", 13)  # pretraining went on from its checkpoint
    finished = sorted(p.stem for p in (tmp_path / "stages").glob("*.json"))
    assert finished == sorted(["pretrained", "full", "freeze", "last"])

    steps = interrupt_at(monkeypatch, "none", 0)
    resumed = run_demo(tmp_path, settings, progress=False, resume=True)
    lora_steps = [s for run, s in steps if run == "lora"]
    assert lora_steps == [6, 7, 8]  # the interrupted stage continued from its checkpoint ...
    assert {run for run, _ in steps} == {"lora", "qlora", "adapter", "prefix"}  # ... and no finished one was redone
    assert resumed["pretrained"]["domain_loss"] == straight["pretrained"]["domain_loss"]
    assert resumed == straight


def test_resume_refuses_a_run_made_with_other_settings_and_overwrite_starts_again(tmp_path, monkeypatch):
    (tmp_path / "demo_settings.json").write_text(json.dumps({"pretrain_steps": 300}))
    with pytest.raises(ValueError, match="other settings"):
        run_demo(tmp_path, DemoSettings.fast(), progress=False, resume=True)
    with pytest.raises(ValueError, match="give one of them"):
        run_demo(tmp_path, DemoSettings.fast(), progress=False, resume=True, overwrite=True)
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "pretrained.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    steps = interrupt_at(monkeypatch, "pretrain", 1)
    with pytest.raises(TrainingInterrupted):
        run_demo(tmp_path, DemoSettings.fast(), progress=False, overwrite=True)
    assert steps == [("pretrain", 1)]  # started again: the old stage record was deleted, not trusted
    assert not (tmp_path / "stages").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the demo's own files are deleted
