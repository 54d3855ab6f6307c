"""Checkpoints survive a kill at any instant (issue 20).

A kill is simulated by counting the file-system operations a save performs (``os.mkdir``,
``os.open``, ``os.fsync``, ``os.rename``, ``os.replace``, ``os.unlink``, ``os.rmdir``, and the
Trainer's appends to ``metrics.jsonl``) and, for every k, letting the first k happen and then
raising ``Killed`` from every later one: cleanup handlers cannot reach the disk either, as after
a real SIGKILL. Then a fresh process (a new Trainer) must resume at the last committed step and
go on to the very losses of a run that was never killed.
"""

import contextlib
import json
import os
import shutil

import numpy as np
import pytest
from test_trainer import TEXT, TINY, TOK, config

from minift.data import DataLoader, TextDataset
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.training import Trainer
from minift.training import trainer as trainer_module
from minift.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

FILE_OPS = ("mkdir", "open", "fsync", "rename", "replace", "unlink", "rmdir")
SMALLER = dict(TINY, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)  # a run per kill point


def tiny_model():
    return LlamaForCausalLM(LlamaConfig(**SMALLER), seed=0)


def loader():
    return DataLoader(TextDataset(TEXT, TOK, 16), 2, seed=0, pad_id=TOK.pad_id)


class Killed(BaseException):
    """The process died here (a BaseException, so no ``except Exception`` can swallow it)."""


class KillSwitch:
    """Records every file operation; once ``kill_after`` of them have run, every later one raises."""

    def __init__(self, kill_after=None):
        self.kill_after, self.ops = kill_after, []

    def wrap(self, name, real):
        def operation(*args, **kwargs):
            if self.kill_after is not None and len(self.ops) >= self.kill_after:
                raise Killed(f"killed before {name}{args[:1]}")
            self.ops.append((name, str(args[0]) if args else ""))
            return real(*args, **kwargs)

        return operation

    @contextlib.contextmanager
    def armed(self, monkeypatch):
        with monkeypatch.context() as patch:
            for name in FILE_OPS:
                patch.setattr(os, name, self.wrap(name, getattr(os, name)))
            patch.setattr(trainer_module, "open", self.wrap("append", open), raising=False)
            yield self


def arrays(value):
    return {"w": np.full((3, 4), value, np.float32)}


def save(out, step, value):
    return save_checkpoint(out, step, arrays(value), {"state": {}, "param_groups": []}, {"value": value})


def leftovers(out):
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("step", [1, 2], ids=["re-save of the latest step", "save of a new step"])
def test_a_kill_at_any_operation_of_a_save_leaves_latest_on_a_whole_checkpoint(tmp_path, monkeypatch, step):
    with KillSwitch().armed(monkeypatch) as recorder:
        save(tmp_path / "recorded", 1, 1.0)
        recorder.ops.clear()
        save(tmp_path / "recorded", step, 2.0)
    n = len(recorder.ops)
    outcomes = []
    for k in range(n):
        out = tmp_path / f"kill-{k}"
        save(out, 1, 1.0)
        with pytest.raises(Killed), KillSwitch(kill_after=k).armed(monkeypatch):
            save(out, step, 2.0)
        trainable, _, state = load_checkpoint(latest_checkpoint(out))
        assert (state["step"], state["value"]) in [(1, 1.0), (step, 2.0)], k
        np.testing.assert_array_equal(trainable["w"], arrays(state["value"])["w"])
        outcomes.append(state["value"])
        save(out, 3, 3.0)  # the next save clears what the kill left behind
        assert leftovers(out) == [], k
    assert n >= 15 and outcomes[0] == 1.0 and outcomes[-1] == 2.0, (n, recorder.ops)


def test_the_leftovers_of_killed_saves_go_at_the_next_resume(tmp_path):
    Trainer(tiny_model(), config(out_dir=str(tmp_path)), loader()).train(until=2)
    (tmp_path / ".tmp-step-000004").mkdir()  # a save killed before its rename
    (tmp_path / ".tmp-step-000004" / ".trainable.safetensors.k3j4.tmp").write_bytes(b"half")
    (tmp_path / ".tmp-removed-step-000001").mkdir()  # a deletion killed half-way
    (tmp_path / ".step-000004.abc123").mkdir()  # the temp folder of minift before these names
    (tmp_path / ".latest.x1y2.tmp").write_bytes(b"step-")
    trainer = Trainer(tiny_model(), config(out_dir=str(tmp_path)), loader())
    assert trainer.resume() and trainer.step == 2
    assert leftovers(tmp_path) == []


def run_to_the_end(out, **kw):
    """A fresh process: resume (if there is anything to resume) and train to the end."""
    trainer = Trainer(tiny_model(), config(out_dir=str(out), **kw), loader())
    start = trainer.step if trainer.resume() else 0
    return start, trainer.train()


def test_a_run_killed_at_any_file_operation_resumes_at_its_last_checkpoint_with_the_same_losses(
        tmp_path, monkeypatch):
    """Every kill point of a whole run (the first save, a save with an older checkpoint to
    prune, the final one, every metrics row): the run resumes at the newest committed
    checkpoint, never earlier, and ends with the losses — and the metrics.jsonl — of a run
    never killed. fsync only matters for power loss, which no test here can cause (a killed
    process loses nothing it handed to write()), so it is skipped to keep the test quick."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    settings = dict(max_steps=4, save_every=2)
    straight = Trainer(tiny_model(), config(**settings), loader()).train().losses
    with KillSwitch().armed(monkeypatch) as recorder:
        Trainer(tiny_model(), config(out_dir=str(tmp_path / "recorded"), **settings), loader()).train()
    commits = [i for i, (name, path) in enumerate(recorder.ops) if name == "replace" and path.endswith(".tmp")
               and os.path.basename(path).startswith(".latest.")]
    assert len(commits) == 2  # steps 2 and 4
    resumed_at = []
    for k in range(len(recorder.ops)):
        out = tmp_path / f"kill-{k}"
        with pytest.raises(Killed), KillSwitch(kill_after=k).armed(monkeypatch):
            Trainer(tiny_model(), config(out_dir=str(out), **settings), loader()).train()
        start, history = run_to_the_end(out, **settings)
        committed = sum(i < k for i in commits)  # the commit op is the k-th or earlier: it happened
        assert start == 2 * committed, (k, recorder.ops[k])
        assert history.losses == straight, k
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4], k
        assert (out / "latest").read_text() == "step-000004", k
        # killed while the final check pruned step 2: the resumed, finished run draws no batch to
        # vouch for step 4, so step 2 may stay
        names, expected = {p.name for p in out.iterdir()}, {"latest", "metrics.jsonl", "step-000004"}
        assert names == expected or (start == 4 and names == expected | {"step-000002"}), (k, names)
        resumed_at.append(start)
    print(f"{len(recorder.ops)} kill points, all survived; resumed at step 0/2/4: "
          f"{[resumed_at.count(s) for s in (0, 2, 4)]}")
    assert set(resumed_at) == {0, 2, 4}


def test_a_resume_killed_at_any_file_operation_can_be_resumed_again(tmp_path, monkeypatch):
    """Resuming cleans up (leftover temp folders, metrics rows past the checkpoint): a kill
    during that must leave something the next resume still reads right."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    settings = dict(max_steps=4, save_every=2)
    straight = Trainer(tiny_model(), config(**settings), loader()).train().losses
    setup = tmp_path / "setup"
    Trainer(tiny_model(), config(out_dir=str(setup), **settings), loader()).train(until=2)
    with open(setup / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 9.0}\n{"step": 4, "lo')  # logged after the checkpoint, then a torn row
    (setup / ".tmp-step-000004").mkdir()
    (setup / ".tmp-step-000004" / "trainable.safetensors").write_bytes(b"half")
    recorded = shutil.copytree(setup, tmp_path / "recorded")
    with KillSwitch().armed(monkeypatch) as recorder:
        Trainer(tiny_model(), config(out_dir=str(recorded), **settings), loader()).resume()
    for k in range(len(recorder.ops)):
        out = shutil.copytree(setup, tmp_path / f"kill-{k}")
        with pytest.raises(Killed), KillSwitch(kill_after=k).armed(monkeypatch):
            Trainer(tiny_model(), config(out_dir=str(out), **settings), loader()).resume()
        start, history = run_to_the_end(out, **settings)
        assert start == 2 and history.losses == straight, k
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["loss"] == straight[2], k
        assert leftovers(out) == [], k
    print(f"{len(recorder.ops)} kill points of a resume, all survived")
    assert len(recorder.ops) >= 6, recorder.ops
