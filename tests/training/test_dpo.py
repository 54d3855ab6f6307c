"""DPO: the loss and its gradient, the reference without a second model, and the trap of trl#4723."""

import json
import math

import numpy as np
import pytest

from minift.autograd import Tensor
from minift.backend import asarray, to_numpy
from minift.data import ByteTokenizer, DataLoader
from minift.data.preference import PreferenceDataset, collate_pairs
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.peft import LoraConfig, get_peft_model
from minift.training import TrainConfig, TrainingError
from minift.training.dpo import DPOTrainer, PreferenceLoss, choose_reference, response_lengths, sequence_logprobs

TOK = ByteTokenizer()
TINY = dict(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=96)
PAIRS = [
    {"prompt": "Deadline?", "chosen": "30 days.", "rejected": "No rush."},
    {"prompt": "Phone?", "chosen": "555-0142.", "rejected": "Look it up."},
    {"prompt": "Pets?", "chosen": "Yes, cats and dogs.", "rejected": "Only fish."},
    {"prompt": "Refund?", "chosen": "Within 14 days.", "rejected": "Never."},
]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def tiny_model(seed=0, dtype=np.float32):
    return LlamaForCausalLM(LlamaConfig(**TINY), seed=seed).to(dtype)


def loader(pairs=PAIRS, batch_size=2, shuffle=True):
    return DataLoader(PreferenceDataset(pairs, TOK, TINY["max_seq_len"]), batch_size, shuffle=shuffle,
                      pad_id=TOK.pad_id, collate_fn=collate_pairs)


def config(**kw):
    return TrainConfig(**{"max_steps": 4, "lr": 1e-2, "warmup_ratio": 0.0, "progress": False, "plot": False, **kw})


def lora_model(seed=0, dtype=np.float32):
    return get_peft_model(tiny_model(seed, dtype), LORA)


def trained_lora_model(seed=0):
    """A LoRA model whose adapter already moved away from identity (as after SFT)."""
    model = lora_model(seed)
    rng = np.random.default_rng(7)
    for name, p in model.named_parameters(trainable_only=True):
        if ".lora_B." in name:
            p.data = asarray(rng.normal(0, 0.3, p.shape), dtype=p.dtype)
    return model


# ---- the loss ------------------------------------------------------------------------------


def test_the_loss_and_metrics_follow_the_formulas_on_hand_numbers():
    policy = Tensor(np.array([-3.0, -5.0, -4.0, -4.5]))  # chosen rows, then rejected rows
    reference = np.array([-3.5, -5.0, -3.0, -5.0])
    lengths = np.array([2, 4, 5, 1])
    beta = 0.5
    chosen, rejected = np.array([0.5, 0.0]), np.array([-1.0, 0.5])  # log pi - log pi_ref
    h = beta * (chosen - rejected)
    loss, metrics = PreferenceLoss(beta)(policy, reference, lengths)
    np.testing.assert_allclose(loss.item(), np.mean(np.log1p(np.exp(-h))), rtol=1e-12)
    assert metrics["rewards/chosen"] == pytest.approx(beta * chosen.mean())
    assert metrics["rewards/rejected"] == pytest.approx(beta * rejected.mean())
    assert metrics["rewards/margins"] == pytest.approx(np.mean(h))
    assert metrics["rewards/accuracies"] == 0.5 and metrics["logps/chosen"] == -4.0
    ipo, ipo_metrics = PreferenceLoss(beta, "ipo")(policy, reference, lengths)
    per_token = chosen / lengths[:2] - rejected / lengths[2:]
    np.testing.assert_allclose(ipo.item(), np.mean((per_token - 1 / (2 * beta)) ** 2), rtol=1e-12)
    assert ipo_metrics == metrics  # the rewards are the summed ones whatever the loss (as TRL logs them)


@pytest.mark.parametrize("bad", [dict(beta=0.0), dict(beta=float("nan")), dict(loss_type="hinge-ish")])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        PreferenceLoss(**bad)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_the_gradient_through_the_model_matches_finite_differences_in_float64(loss_type):
    model = lora_model(dtype=np.float64)
    rng = np.random.default_rng(3)
    for p in model.parameters(trainable_only=True):
        p.data = asarray(rng.normal(0, 0.2, p.shape), dtype=np.float64)  # off identity: a real margin
    batch = next(iter(loader(shuffle=False)))
    reference = rng.normal(-60, 1, 4)
    loss_of = PreferenceLoss(0.3, loss_type)

    def loss():
        return loss_of(sequence_logprobs(model, batch), reference, response_lengths(batch))[0]

    loss().backward()
    for name, p in model.named_parameters(trainable_only=True):
        flat, grad = p.data.reshape(-1), to_numpy(p.grad).reshape(-1)
        i = int(np.argmax(np.abs(grad)))
        old = flat[i]
        flat[i] = old + 1e-6
        up = loss().item()
        flat[i] = old - 1e-6
        down = loss().item()
        flat[i] = old
        np.testing.assert_allclose(grad[i], (up - down) / 2e-6, rtol=1e-5, atol=1e-9, err_msg=name)


def test_sequence_logprobs_sum_the_answer_tokens_only():
    model = tiny_model()
    batch = next(iter(loader(shuffle=False)))
    logits = to_numpy(model(batch["input_ids"]).data)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    labels = batch["labels"]
    picked = np.take_along_axis(log_p, np.maximum(labels, 0)[..., None], -1)[..., 0]
    expected = np.where(labels != -100, picked, 0).sum(-1)
    np.testing.assert_allclose(to_numpy(sequence_logprobs(model, batch).data), expected, rtol=1e-5)
    np.testing.assert_array_equal(response_lengths(batch), (labels != -100).sum(-1))


# ---- the reference -------------------------------------------------------------------------


def first_row(trainer, tmp_path):
    trainer.train()
    return json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])


def test_a_fresh_adapter_starts_at_ln2_with_zero_rewards_using_the_disabled_adapter(tmp_path):
    model = lora_model()
    assert choose_reference(model) == "disabled_adapter"
    trainer = DPOTrainer(model, config(max_steps=1, out_dir=str(tmp_path)), loader())
    row = first_row(trainer, tmp_path)
    assert row["step"] == 1 and row["loss"] == pytest.approx(math.log(2), abs=1e-7)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert row[key] == 0.0, key  # policy == reference bit for bit: B = 0 adds exact zeros
    assert row["rewards/accuracies"] == 0.0  # a tie is not a win


def test_the_trap_a_trained_adapter_needs_a_snapshot_not_the_disabled_adapter(tmp_path):
    """Starting from an adapter trained by SFT, switching it off is *not* the starting policy:
    with that shortcut the first loss is already far from ln 2 (the run would be pulled back
    past the SFT). minift notices and precomputes the reference from the starting weights."""
    model = trained_lora_model()
    assert choose_reference(model) == "precomputed"
    auto = DPOTrainer(model, config(max_steps=1, out_dir=str(tmp_path / "auto")), loader())
    assert auto.reference == "precomputed"
    row = first_row(auto, tmp_path / "auto")
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(row["rewards/margins"]) < 1e-5

    shortcut = DPOTrainer(trained_lora_model(), config(max_steps=1, out_dir=str(tmp_path / "shortcut")), loader(),
                          reference="disabled_adapter")
    wrong = first_row(shortcut, tmp_path / "shortcut")
    assert abs(wrong["loss"] - math.log(2)) > 1e-2 and abs(wrong["rewards/margins"]) > 1e-2


def test_full_fine_tuning_uses_a_precomputed_reference_and_starts_at_ln2(tmp_path):
    model = tiny_model()
    trainer = DPOTrainer(model, config(max_steps=1, out_dir=str(tmp_path)), loader())
    assert trainer.reference == "precomputed"
    assert first_row(trainer, tmp_path)["loss"] == pytest.approx(math.log(2), abs=1e-5)
    with pytest.raises(TrainingError, match="needs a LoRA model"):
        DPOTrainer(tiny_model(), config(), loader(), reference="disabled_adapter")


def test_a_resumed_run_keeps_the_starting_reference_and_repeats_the_losses(tmp_path):
    """The precomputed reference is taken before ``resume`` loads trained weights: a resumed
    run must compare against the *start*, or it would restart from ln 2 at the checkpoint."""
    straight = DPOTrainer(trained_lora_model(), config(max_steps=6), loader()).train().losses
    first = DPOTrainer(trained_lora_model(), config(max_steps=6, out_dir=str(tmp_path)), loader())
    first.train(until=3)
    second = DPOTrainer(trained_lora_model(), config(max_steps=6, out_dir=str(tmp_path)), loader())
    assert second.resume() and second.step == 3
    np.testing.assert_allclose(second.train().losses, straight, rtol=1e-5)


# ---- it learns -----------------------------------------------------------------------------


def test_training_wins_the_pairs_and_the_margin_grows_while_eval_reports_trl_names(tmp_path):
    trainer = DPOTrainer(lora_model(), config(max_steps=30, lr=2e-2, eval_every=10, plot=True, out_dir=str(tmp_path)),
                         loader(), loader(shuffle=False), beta=0.5)
    history = trainer.train()
    margins = history.metrics["rewards/margins"]
    assert history.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert history.losses[-1] < 0.5 * math.log(2)
    assert margins[-1] > 1.0 > margins[0]
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["eval_rewards/accuracies"] == 1.0 and last["eval_rewards/margins"] > 1.0
    assert "eval_ppl" not in last
    assert (tmp_path / "rewards.png").stat().st_size > 10_000 and (tmp_path / "curves.png").exists()
