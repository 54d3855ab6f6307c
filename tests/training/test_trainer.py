"""The Trainer: learning, freezing, accumulation, exact resume, NaN handling, outputs (issue 3)."""

import json
import math
import os
import signal

import numpy as np
import pytest

import minift.autograd.functional as F
from minift.backend import to_numpy
from minift.data import ByteTokenizer, DataLoader, TextDataset
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.nn import freeze_layers
from minift.training import TrainConfig, Trainer, TrainingError, TrainingInterrupted, causal_lm_loss

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40
        + "A stitch in time saves nine. Many hands make light work. " * 30)
TOK = ByteTokenizer()
TINY = dict(vocab_size=TOK.vocab_size, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


def tiny_model(seed=0):
    return LlamaForCausalLM(LlamaConfig(**TINY), seed=seed)


def loader(batch_size=4, seed=0):
    return DataLoader(TextDataset(TEXT, TOK, 32), batch_size, seed=seed, pad_id=TOK.pad_id)


def config(**kw):
    base = dict(max_steps=10, lr=3e-3, warmup_ratio=0.1, progress=False, plot=False)
    return TrainConfig(**{**base, **kw})


def snapshot(model):
    return {n: to_numpy(p.data).copy() for n, p in model.named_parameters()}


def test_a_tiny_model_overfits_one_batch_to_near_zero_loss():
    model = tiny_model()
    batch = next(iter(loader(batch_size=2)))

    class OneBatch:
        def __iter__(self):
            yield batch

        def state_dict(self):
            return {}

    history = Trainer(model, config(max_steps=150, lr=1e-2, schedule="constant", warmup_ratio=0.0,
                                    weight_decay=0.0), OneBatch()).train()
    assert history.losses[0] > 4.0
    assert history.losses[-1] < 0.05


def test_full_fine_tuning_changes_every_parameter_and_freezing_changes_none_of_the_frozen():
    full = tiny_model()
    before = snapshot(full)
    Trainer(full, config(max_steps=3), loader()).train()
    after = snapshot(full)
    assert all(not np.array_equal(before[n], after[n]) for n in before)

    partly = tiny_model()
    frozen = set(freeze_layers(partly, 2))
    before = snapshot(partly)
    trainer = Trainer(partly, config(max_steps=3), loader())
    trainer.train()
    after = snapshot(partly)
    for n in before:
        assert np.array_equal(before[n], after[n]) == (n in frozen), n
    assert len(trainer.optimizer.state) == len([p for p in partly.parameters() if p.requires_grad])


def test_gradient_accumulation_equals_one_big_batch():
    big = next(iter(loader(batch_size=4, seed=1)))
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    one, two = tiny_model(), tiny_model()
    F.cross_entropy(one(big["input_ids"]), big["labels"]).backward()
    for half in halves:
        (causal_lm_loss(two, half) / 2).backward()
    for (name, a), (_, b) in zip(one.named_parameters(), two.named_parameters()):
        np.testing.assert_allclose(b.grad, a.grad, rtol=1e-4, atol=1e-7, err_msg=name)


def test_a_stopped_and_resumed_run_gives_the_same_losses_as_one_run(tmp_path):
    straight = Trainer(tiny_model(), config(max_steps=8), loader()).train().losses

    first = Trainer(tiny_model(), config(max_steps=8, out_dir=str(tmp_path)), loader())
    first.train(until=5)  # saves a checkpoint at step 5 on the way out

    resumed = Trainer(tiny_model(seed=123), config(max_steps=8, out_dir=str(tmp_path)), loader())
    assert resumed.resume()
    assert resumed.step == 5
    losses = resumed.train().losses
    assert losses[5:] == straight[5:]


def test_outputs_metrics_checkpoint_and_plot(tmp_path):
    trainer = Trainer(tiny_model(), config(max_steps=4, out_dir=str(tmp_path), plot=True, eval_every=2),
                      loader(), eval_loader=loader())
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    losses = [r for r in rows if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in losses)
    # transformers' warmup starts at lr = 0: the very first update is a zero step
    assert losses[0]["lr"] == 0 and all(r["lr"] > 0 for r in losses[1:])
    assert (tmp_path / "curves.png").stat().st_size > 5000
    assert (tmp_path / "latest").read_text() == "step-000004"
    assert sorted(p.name for p in (tmp_path / "step-000004").iterdir()) == [
        "optimizer.safetensors", "state.json", "trainable.safetensors"]


def test_a_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    model = tiny_model()
    trainer = Trainer(model, config(max_steps=6, out_dir=str(tmp_path), save_every=2), loader())
    calls = {"n": 0}

    def poisoned_after_three_steps(m, batch):
        calls["n"] += 1
        loss = causal_lm_loss(m, batch)
        return loss * float("nan") if calls["n"] > 3 else loss

    trainer.loss_fn = poisoned_after_three_steps
    with pytest.raises(TrainingError, match=r"loss became nan at step 4.*step-000002.*intact"):
        trainer.train()
    saved = (tmp_path / "step-000002" / "trainable.safetensors").read_bytes()
    before_nan = snapshot(model)
    from minift.io import load_file

    checkpoint = load_file(tmp_path / "step-000002" / "trainable.safetensors")
    assert set(checkpoint) == set(before_nan) and len(saved) > 0
    assert all(np.isfinite(v).all() for v in before_nan.values())


def test_everything_frozen_is_a_clear_error():
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(TrainingError, match="no trainable parameter"):
        Trainer(model, config(), loader())


def test_bad_train_config_values_are_rejected():
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)


def test_ctrl_c_finishes_the_step_saves_and_raises_so_no_caller_mistakes_it_for_a_finished_run(tmp_path):
    model = tiny_model()

    def loss_then_ctrl_c(model, batch):
        if trainer.step == 2:  # Ctrl-C arrives during the third step's forward
            os.kill(os.getpid(), signal.SIGINT)
        return causal_lm_loss(model, batch)

    trainer = Trainer(model, config(max_steps=6, out_dir=str(tmp_path)), loader(), loss_fn=loss_then_ctrl_c)
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.train()
    assert stopped.value.step == 3 and trainer.step == 3  # the step in flight was finished, not torn
    resumed = Trainer(tiny_model(seed=1), config(max_steps=6, out_dir=str(tmp_path)), loader())
    assert resumed.resume() and resumed.step == 3


def test_the_cli_exits_130_and_prints_the_command_that_resumes(tmp_path, monkeypatch, capsys):
    from minift import cli

    def interrupted(args):
        raise TrainingInterrupted(7, tmp_path)

    monkeypatch.setattr(cli, "cmd_train", interrupted)
    argv = ["train", "--data", "my corpus.txt", "--out", str(tmp_path)]
    assert cli.main(argv) == cli.EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err
    assert "interrupted at step 7" in err
    assert f"minift train --data 'my corpus.txt' --out {tmp_path} --resume" in err


# ---- issue 20: checkpoints that survive a kill, an honest NaN stop and resume ---------------
# (the kill-injection tests are in test_checkpoint.py)


@pytest.mark.parametrize("damage", ["latest names a missing folder", "truncated weights", "state.json torn"])
def test_resuming_from_a_checkpoint_that_cannot_be_read_is_an_error_naming_it(tmp_path, damage):
    Trainer(tiny_model(), config(max_steps=4, out_dir=str(tmp_path)), loader()).train(until=2)
    folder = tmp_path / "step-000002"
    if damage == "latest names a missing folder":
        folder.rename(tmp_path / "elsewhere")
    elif damage == "truncated weights":
        weights = folder / "trainable.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (folder / "state.json").write_text('{"step": 2, "sched')
    resumed = Trainer(tiny_model(), config(max_steps=4, out_dir=str(tmp_path)), loader())
    with pytest.raises(TrainingError, match=r"step-000002.*(write the name of|write in it the name of).*start over"):
        resumed.resume()
    assert resumed.step == 0


def test_a_resumed_run_logs_each_step_once_in_metrics_jsonl(tmp_path):
    class Killed(BaseException):
        pass

    def killed_at_step_6(model, batch):
        if killed.step == 5:
            raise Killed
        return causal_lm_loss(model, batch)

    killed = Trainer(tiny_model(), config(max_steps=8, save_every=2, eval_every=2, out_dir=str(tmp_path)),
                     loader(), eval_loader=loader(), loss_fn=killed_at_step_6)
    with pytest.raises(Killed):
        killed.train()  # rows for steps 1-5 are logged, the checkpoint is step 4's
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # and a row torn by the kill
    resumed = Trainer(tiny_model(), config(max_steps=8, save_every=2, eval_every=2, out_dir=str(tmp_path)),
                      loader(), eval_loader=loader())
    assert resumed.resume() and resumed.step == 4
    resumed.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 6, 8]
    assert [r["loss"] for r in rows if "loss" in r] == resumed.history.losses


def test_resuming_with_another_lr_continues_the_schedule_at_that_peak_and_says_so(tmp_path, capsys):
    doubled = Trainer(tiny_model(), config(max_steps=8, lr=6e-3), loader()).train().lrs
    Trainer(tiny_model(), config(max_steps=8, lr=3e-3, out_dir=str(tmp_path)), loader()).train(until=5)
    resumed = Trainer(tiny_model(), config(max_steps=8, lr=6e-3, out_dir=str(tmp_path)), loader())
    assert resumed.resume()
    assert "resumed at step 5 with lr 0.006 (checkpoint had 0.003)" in capsys.readouterr().out
    lrs = resumed.train().lrs
    assert lrs[5:] == doubled[5:] and lrs[5] > 0
    assert resumed.save() == tmp_path / "step-000008"
    assert json.loads((tmp_path / "step-000008" / "state.json").read_text())["scheduler"]["base_lrs"] == [6e-3] * 2


def test_resuming_with_the_same_lr_says_nothing_about_it(tmp_path, capsys):
    Trainer(tiny_model(), config(max_steps=4, out_dir=str(tmp_path)), loader()).train(until=2)
    assert Trainer(tiny_model(), config(max_steps=4, out_dir=str(tmp_path)), loader()).resume()
    assert "lr" not in capsys.readouterr().out


def test_a_checkpoint_is_good_only_if_a_loss_on_its_own_weights_was_finite(tmp_path):
    """lr 1e5: step 5's weights are finite (~1e10) and step 6's forward on them is NaN. The
    NaN stop must neither call step-000005 good nor leave ``latest`` on it."""
    settings = dict(max_steps=10, lr=1e5, save_every=1, out_dir=str(tmp_path))
    with np.errstate(over="ignore", invalid="ignore"):
        with pytest.raises(TrainingError, match=r"loss became nan at step 6.*step-000005 held the weights that "
                                                r"gave it and was deleted.*last good checkpoint \(.*step-000004\) "
                                                r"is intact"):
            Trainer(tiny_model(), config(**settings), loader()).train()
        assert (tmp_path / "latest").read_text() == "step-000004"
        assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000004"]
        resumed = Trainer(tiny_model(), config(**{**settings, "lr": 1e-3}), loader())
        assert resumed.resume() and resumed.step == 4
        assert max(float(np.abs(to_numpy(p.data)).max()) for p in resumed.params) > 1e9  # finite, yet...
        assert math.isfinite(resumed.train_step()[0])  # ...the loss on them is finite: truly good


def test_a_nan_on_the_only_checkpoint_says_that_none_is_good_and_resume_starts_over(tmp_path):
    settings = dict(max_steps=10, lr=1e5, save_every=5, out_dir=str(tmp_path))
    expected = r"step-000005 held the weights.*no checkpoint gave a finite loss: --resume starts over"
    with np.errstate(over="ignore", invalid="ignore"), pytest.raises(TrainingError, match=expected):
        Trainer(tiny_model(), config(**settings), loader()).train()
    assert not (tmp_path / "latest").exists() and not list(tmp_path.glob("step-*"))
    assert not Trainer(tiny_model(), config(**settings), loader()).resume()


def test_the_final_checkpoint_is_checked_too_and_then_alone_kept(tmp_path):
    Trainer(tiny_model(), config(max_steps=4, save_every=2, out_dir=str(tmp_path)), loader()).train()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000004"]

    poisoned = tmp_path / "poisoned"
    trainer = Trainer(tiny_model(), config(max_steps=4, save_every=2, out_dir=str(poisoned)), loader())
    trainer.train(until=3)
    trainer.loss_fn = lambda model, batch: causal_lm_loss(model, batch) * (math.nan if trainer.step == 4 else 1)
    with pytest.raises(TrainingError, match=r"the loss on the final weights \(step 4\) is nan.*step-000004 held"
                                            r".*deleted.*last good checkpoint \(.*step-000003\) is intact"):
        trainer.train()
    assert (poisoned / "latest").read_text() == "step-000003"
