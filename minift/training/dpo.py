"""Direct Preference Optimization: learn from "this answer, not that one" without a reward model.

RLHF (lecture 002: humans rank outputs, the model learns to produce the higher-ranked ones)
classically runs in three stages: SFT, a reward model r(x, y) fitted to the rankings with the
Bradley-Terry model ``P(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l))``, then PPO against that
reward with a KL penalty that keeps the policy near the SFT model — four networks in memory
(policy, reference, reward, value). DPO (Rafailov et al., 2023) notices that the KL-constrained
optimum is ``pi(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta)``, so the reward *is* a log-ratio,
``r(x, y) = beta log(pi(y|x) / pi_ref(y|x))`` up to a term that cancels in Bradley-Terry. Putting
it in gives a plain classification loss on the preference pairs::

    h = beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))]
    L = -log sigmoid(h)

with ``log pi(y|x)`` summed over the response tokens only (the prompt and padding are masked,
as in SFT). No reward model, no value model, no sampling during training: a policy and a frozen
reference. At the start policy = reference, so h = 0 and L = ln 2 exactly.

IPO (Azar et al., 2023) replaces -log sigmoid, which keeps pushing h up even once the pair is
won (DPO's over-fitting to deterministic preferences), by a square that pulls the *per-token*
log-ratio margin toward ``1 / (2 beta)``: ``L = (h' - 1/(2 beta))^2``, where h' divides each
answer's log-ratio by its length (as TRL does; the reported rewards stay the summed ones).

The reference, without a second model in memory (``choose_reference``): with a fresh LoRA
adapter (B = 0, so the adapter changes nothing yet) pi_ref is the same network with the adapter
switched off (TRL's PEFT trick). That shortcut is wrong whenever the starting policy is *not*
the base — an adapter already trained by SFT, or a full fine-tune — because switching the adapter
off then jumps back past the SFT (trl#4723). Then minift computes the reference log-probabilities
of every pair once, from the starting weights, before the first update (and before a resume
loads a checkpoint), and they travel with the data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy

import minift.autograd.functional as F
from minift.autograd import no_grad
from minift.backend import to_numpy, xp
from minift.data.loader import DataLoader
from minift.data.preference import collate_pairs
from minift.peft import PeftModel
from minift.peft.lora import lora_layers
from minift.peft.peft_model import ModulesToSave
from minift.training.trainer import Trainer, TrainingError

LOSS_TYPES = ("sigmoid", "ipo")
REFERENCES = ("auto", "disabled_adapter", "precomputed")


def sequence_logprobs(model, batch):
    """log pi(y|x) per row of ``batch``: the log-probabilities of the response tokens (the
    counted labels), summed. A Tensor of shape (rows,), differentiable in the model."""
    return F.sum(model.label_logprobs(batch["input_ids"], xp.asarray(batch["labels"])), axis=-1)


def response_lengths(batch) -> numpy.ndarray:
    """Tokens scored per row (IPO divides the log-ratios by them)."""
    return (numpy.asarray(batch["labels"]) != F.IGNORE_INDEX).sum(axis=-1)


@dataclass(frozen=True)
class PreferenceLoss:
    """The loss of one batch of pairs from policy and reference log-probabilities.

    ``policy`` is a Tensor (2B,) of summed log-probabilities, ``reference`` an array (2B,) of the
    same, chosen rows first, ``lengths`` the tokens each row scored. Returns the mean loss (a
    Tensor) and the batch's metrics under TRL's names and definitions (always from the summed
    log-probabilities, for IPO too), so dashboards and habits carry over: ``rewards/chosen`` =
    beta (log pi - log pi_ref) of the chosen answers (the implicit reward), ``rewards/margins``
    chosen minus rejected, ``rewards/accuracies`` the share of pairs whose chosen reward is the
    higher (a tie, as at the start, is not a win).
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"

    def __post_init__(self):
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a positive number, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")

    def __call__(self, policy, reference, lengths) -> tuple:
        half = policy.shape[0] // 2
        reference = xp.asarray(reference, dtype=policy.dtype)
        ratios = policy - reference  # log pi / pi_ref per row
        if self.loss_type == "ipo":  # per token, so long answers do not dominate the square
            ratios = ratios / xp.asarray(numpy.maximum(lengths, 1), dtype=policy.dtype)
        chosen, rejected = ratios[:half], ratios[half:]
        if self.loss_type == "sigmoid":
            losses = -F.log_sigmoid((chosen - rejected) * self.beta)
        else:
            losses = F.pow(chosen - rejected - 1.0 / (2.0 * self.beta), 2.0)
        return F.mean(losses), self.metrics(to_numpy(policy.data), to_numpy(reference))

    def metrics(self, policy: numpy.ndarray, reference: numpy.ndarray) -> dict[str, float]:
        half = len(policy) // 2
        rewards = self.beta * (policy - reference)
        chosen, rejected = rewards[:half], rewards[half:]
        return {"rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean()),
                "rewards/margins": float((chosen - rejected).mean()),
                "rewards/accuracies": float((chosen > rejected).mean()),
                "logps/chosen": float(policy[:half].mean()), "logps/rejected": float(policy[half:].mean())}


# ---- the reference -------------------------------------------------------------------------


def adapter_is_identity(model) -> bool:
    """True when switching the active LoRA adapter off leaves the function unchanged: every B
    of the adapter is zero, no bias and no ``modules_to_save`` copy trains with it."""
    if not isinstance(model, PeftModel):
        return False
    name = model.active_adapter
    if model.peft_config[name].bias != "none":
        return False
    if any(isinstance(m, ModulesToSave) for _, m in model.model.named_modules()):
        return False
    return all(not xp.any(layer.lora_B[name].weight.data) for _, layer in lora_layers(model.model)
               if name in layer.lora_B)


def choose_reference(model) -> str:
    """``"disabled_adapter"`` when the policy starts as its base with a fresh adapter, otherwise
    ``"precomputed"``: the reference must be the *starting* policy, and only in the first case
    is that the network with its adapter off (the trap of trl#4723)."""
    return "disabled_adapter" if adapter_is_identity(model) else "precomputed"


def reference_logprobs_of(model, dataset, batch_size: int, pad_id: int) -> numpy.ndarray:
    """(N, 2) log pi_ref of every pair's chosen and rejected answer under ``model`` as it is now,
    without a graph (the precomputed reference)."""
    loader = DataLoader(dataset, batch_size, shuffle=False, pad_id=pad_id, collate_fn=collate_pairs)
    table = numpy.zeros((len(dataset), 2))
    was_training = model.training
    model.eval()
    with no_grad():
        for batch in loader:
            values = to_numpy(sequence_logprobs(model, batch).data)
            half = len(values) // 2
            table[batch["index"]] = numpy.stack([values[:half], values[half:]], axis=1)
    model.train(was_training)
    return table


class DPOTrainer(Trainer):
    """The Trainer's loop (schedule, clipping, checkpoints, resume, metrics, plots) with the
    preference loss. Loaders must batch ``PreferenceDataset``s with ``collate_pairs``.

    ``reference``: ``"auto"`` (``choose_reference``), ``"disabled_adapter"`` or ``"precomputed"``.
    It is decided, and a precomputed reference computed, here — before ``resume()`` can load
    trained weights into the model.
    """

    loss_label = "preference loss (per pair)"

    def __init__(self, model, config, train_loader, eval_loader=None, *, beta: float = 0.1,
                 loss_type: str = "sigmoid", reference: str = "auto"):
        self.eval_metrics: dict[str, float] = {}
        self.preference_loss = PreferenceLoss(beta, loss_type)
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
        self.reference = choose_reference(model) if reference == "auto" else reference
        if self.reference == "disabled_adapter" and not isinstance(model, PeftModel):
            raise TrainingError("reference='disabled_adapter' needs a LoRA model; use 'precomputed'")
        # The eval set's reference never changes: with a precomputed reference, or while the
        # adapter is still the identity (then the two kinds agree), score it once now instead of
        # at every evaluation. A table left by an earlier trainer must not leak into this run.
        same_now = self.reference == "precomputed" or adapter_is_identity(model)
        for loader, precompute in ((train_loader, self.reference == "precomputed"), (eval_loader, same_now)):
            if loader is not None:
                loader.dataset.reference_logprobs = reference_logprobs_of(
                    model, loader.dataset, loader.batch_size, loader.pad_id) if precompute else None
        super().__init__(model, config, train_loader, eval_loader, loss_fn=self.pair_loss)

    def reference_logprobs(self, model, batch) -> numpy.ndarray:
        """log pi_ref (2B,) of the batch: precomputed and carried by the batch, or the same
        network with its adapter off."""
        if "reference_logprobs" in batch:
            return batch["reference_logprobs"]
        if self.reference != "disabled_adapter":
            raise TrainingError("the batch carries no precomputed reference log-probabilities; batch a "
                                "PreferenceDataset with collate_pairs")
        with no_grad(), model.disable_adapter():
            return to_numpy(sequence_logprobs(model, batch).data)

    def pair_loss(self, model, batch):
        """(loss, metrics) of one batch of pairs: the Trainer's ``loss_fn``."""
        reference = self.reference_logprobs(model, batch)
        return self.preference_loss(sequence_logprobs(model, batch), reference, response_lengths(batch))

    def evaluate(self, loader=None) -> float:
        """Mean preference loss per pair over ``loader`` (default: the eval loader); its metrics,
        pair-weighted, are kept in ``self.eval_metrics`` with TRL's ``eval_`` prefix."""
        loader = loader or self.eval_loader
        if loader is None:
            raise ValueError("evaluate() needs an eval loader")
        was_training = self.model.training
        self.model.eval()
        total, sums, pairs = 0.0, {}, 0
        with no_grad():
            for batch in loader:
                loss, metrics = self.pair_loss(self.model, batch)
                n = len(batch["index"])
                total, pairs = total + loss.item() * n, pairs + n
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value * n
        self.model.train(was_training)
        self.eval_metrics = {f"eval_{key}": value / pairs for key, value in sums.items()}
        return total / pairs

    def eval_extras(self, eval_loss: float) -> dict:
        """An eval row reports the rewards (a perplexity of a preference loss means nothing)."""
        return self.eval_metrics

    def plot(self, path):
        """The loss and schedule (``curves.png``), and beside it ``rewards.png``: what a
        preference run is watched by (``plot_rewards``)."""
        written = super().plot(path)
        plot_rewards(self.history, self._eval_rows(), Path(path).with_name("rewards.png"),
                     title=f"{Path(path).parent.name}: DPO, beta {self.preference_loss.beta:g}")
        return written

    def _eval_rows(self) -> list[dict]:
        """The eval rows of ``metrics.jsonl`` (they hold the eval rewards), oldest first."""
        metrics = self.out_dir / "metrics.jsonl" if self.out_dir else None
        if metrics is None or not metrics.exists():
            return []
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        return [row for row in rows if "eval_rewards/margins" in row]


def plot_rewards(history, eval_rows: list[dict], path, title: str = "DPO") -> Path:
    """Two panels against step: the implicit rewards of chosen and rejected answers with their
    margin, and the share of pairs won. Collapse shows here first: both rewards diving while
    the margin still grows means the policy is lowering the likelihood of *every* answer,
    the chosen ones too (too small a beta, or too many steps)."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - no pyplot: keeps the caller's backend

    fig = Figure(figsize=(10, 3.6))
    ax_rewards, ax_accuracy = fig.subplots(1, 2)
    steps, metrics = history.steps, history.metrics
    for key, colour in (("chosen", "tab:green"), ("rejected", "tab:red"), ("margins", "tab:blue")):
        _plot_train(ax_rewards, steps, metrics.get(f"rewards/{key}", []), colour, f"train {key}")
        if eval_rows:
            ax_rewards.plot([r["step"] for r in eval_rows], [r[f"eval_rewards/{key}"] for r in eval_rows], "o--",
                            color=colour, label=f"eval {key}")
    ax_rewards.axhline(0, color="grey", linewidth=0.8)
    ax_rewards.set(xlabel="step", ylabel="beta * log(pi / pi_ref)", title="implicit rewards")
    ax_rewards.legend(fontsize=8)
    _plot_train(ax_accuracy, steps, metrics.get("rewards/accuracies", []), "tab:purple", "train")
    if eval_rows:
        ax_accuracy.plot([r["step"] for r in eval_rows], [r["eval_rewards/accuracies"] for r in eval_rows], "o--",
                         color="tab:purple", label="eval")
    ax_accuracy.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax_accuracy.set(xlabel="step", ylabel="share of pairs won", ylim=(-0.05, 1.05),
                    title="reward accuracy")
    ax_accuracy.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def _plot_train(ax, steps, values, colour, label) -> None:
    """One training metric: each batch's value, and past 50 steps a moving average over about
    a twentieth of the run on top (single batches of a few pairs are noisy)."""
    if len(values) <= 50:
        ax.plot(steps, values, color=colour, label=f"{label} (batch)")
        return
    window = len(values) // 20
    smooth = numpy.convolve(values, numpy.ones(window) / window, mode="valid")
    ax.plot(steps, values, color=colour, alpha=0.25)
    ax.plot(steps[window - 1:], smooth, color=colour, label=f"{label} (mean of {window} steps)")
