"""The training loop: forward, loss, backward, clip, AdamW step, schedule — and the care around it.

One optimizer *step* (lecture 002's loop) is::

    for each of grad_accum_steps micro-batches:
        loss = cross_entropy(model(input_ids), labels) / grad_accum_steps
        loss.backward()                   # gradients add up in .grad
    clip_grad_norm_(params, max_grad_norm)
    optimizer.step(); scheduler.step(); optimizer.zero_grad()

The Trainer never knows which fine-tuning method is in use: full, frozen layers, LoRA and
QLoRA differ only in which parameters have ``requires_grad`` (docs/design.md, "the flow of data").

Around the loop: evaluation every N steps, a progress bar, ``metrics.jsonl``, loss and
learning-rate plots, atomic checkpoints, exact resume (a run stopped and resumed produces the
same losses as one run straight through), Ctrl-C that saves before stopping, and a NaN/inf
loss that stops the run before it can touch the weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy
from tqdm.auto import tqdm

import minift.autograd.functional as F
from minift.allocator import keep_freed_memory
from minift.autograd import no_grad
from minift.backend import xp
from minift.optim import AdamW, clip_grad_norm_, get_scheduler, weight_decay_groups
from minift.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, nothing to train...); the message says why."""


class TrainingInterrupted(Exception):
    """Ctrl-C stopped the run at a step boundary, after its checkpoint was written.

    Raised by ``Trainer.train`` so that no caller mistakes a stopped run for a finished one and
    goes on (saving a half-trained model, or starting the next stage of a study on it). The
    command line turns it into exit status 130 and the command that resumes.
    """

    def __init__(self, step: int, out_dir: Path | None):
        self.step, self.out_dir = step, out_dir
        kept = f"checkpoint saved in {out_dir}" if out_dir else "no out_dir: nothing was saved"
        super().__init__(f"interrupted at step {step}; {kept}")


@dataclass
class TrainConfig:
    """Hyper-parameters of a run. Lecture 000's typical values: AdamW, lr 1e-5..5e-5 for full
    fine-tuning of a large model (LoRA tolerates ~1e-4..1e-3), warmup 5-10%, weight decay 0.01,
    linear or cosine decay."""

    max_steps: int = 100
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float | None = 0.05
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    eval_every: int = 0
    save_every: int = 0
    out_dir: str | None = None
    seed: int = 0
    progress: bool = True
    plot: bool = True
    keep_last: int = 1

    def __post_init__(self):
        if self.max_steps <= 0 or self.grad_accum_steps <= 0:
            raise ValueError("max_steps and grad_accum_steps must be positive")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        self.betas = tuple(self.betas)


def causal_lm_loss(model, batch):
    """Mean next-token cross-entropy over the counted (label != F.IGNORE_INDEX) positions.

    ``labels`` are pre-shifted by the data pipeline: ``labels[b, t]`` is the token that should
    follow ``input_ids[b, t]``, with prompt and padding positions set to ``IGNORE_INDEX``.
    """
    return F.cross_entropy(model(batch["input_ids"]), batch["labels"])


def evaluate_loss(model, loader, loss_fn=causal_lm_loss) -> float:
    """Mean loss per counted token over every batch of ``loader``, without building a graph."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with no_grad():
        for batch in loader:
            n = int((xp.asarray(batch["labels"]) != F.IGNORE_INDEX).sum())
            total += loss_fn(model, batch).item() * n
            count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluate_loss: the loader has no counted token")
    return total / count


@dataclass
class History:
    """Everything the loop measured; written to ``metrics.jsonl`` and plotted."""

    steps: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    eval_steps: list = field(default_factory=list)
    eval_losses: list = field(default_factory=list)


class Trainer:
    """Runs ``config.max_steps`` optimizer steps of ``model`` on batches from ``train_loader``."""

    def __init__(self, model, config: TrainConfig, train_loader, eval_loader=None, loss_fn=causal_lm_loss):
        self.model, self.config, self.loss_fn = model, config, loss_fn
        self.train_loader, self.eval_loader = train_loader, eval_loader
        keep_freed_memory()  # each step reuses the last step's activation memory (minift/allocator.py)
        named = list(model.named_parameters(trainable_only=True))
        if not named:
            raise TrainingError("the model has no trainable parameter: everything is frozen")
        self.params = [p for _, p in named]
        self.optimizer = AdamW(weight_decay_groups(named, config.weight_decay), lr=config.lr,
                               betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(config.schedule, self.optimizer, num_warmup_steps=config.warmup_steps,
                                       num_training_steps=config.max_steps, warmup_ratio=config.warmup_ratio)
        self.step = 0
        self.history = History()
        self._batches = None
        self._stop_requested = False
        self.out_dir = Path(config.out_dir) if config.out_dir else None

    # ---- one step ---------------------------------------------------------------------
    def next_batch(self):
        """The next batch, starting a new epoch (reshuffled) when one runs out."""
        while True:
            if self._batches is None:
                self._batches = iter(self.train_loader)
            batch = next(self._batches, None)
            if batch is not None:
                return batch
            self._batches = None

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches -> (loss, grad norm)."""
        model, cfg = self.model, self.config
        model.train()
        total = 0.0
        for _ in range(cfg.grad_accum_steps):
            loss = self.loss_fn(model, self.next_batch())
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingError(self._nonfinite_message(value))
            (loss / cfg.grad_accum_steps).backward()
            total += value / cfg.grad_accum_steps
        norm = clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm else math.inf)
        if not math.isfinite(norm):
            raise TrainingError(self._nonfinite_message(norm, what="gradient norm"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        self.step += 1
        return total, norm

    def _nonfinite_message(self, value, what="loss") -> str:
        where = latest_checkpoint(self.out_dir) if self.out_dir else None
        kept = f"the last good checkpoint ({where}) is intact" if where else "no checkpoint was written"
        return (f"{what} became {value} at step {self.step + 1}; stopping before the weights are "
                f"updated ({kept}). Try a lower learning rate or check the data.")

    # ---- evaluation -------------------------------------------------------------------
    def evaluate(self, loader=None) -> float:
        """Token-weighted mean loss over ``loader`` (default: the eval loader)."""
        loader = loader or self.eval_loader
        if loader is None:
            raise ValueError("evaluate() needs an eval loader")
        return evaluate_loss(self.model, loader, self.loss_fn)

    # ---- the loop ---------------------------------------------------------------------
    def train(self, until: int | None = None) -> History:
        """Run (or resume) to ``max_steps`` — or only up to step ``until``, to look at the model
        half-way and go on later. Returns the history. Ctrl-C finishes the current step, saves,
        and raises ``TrainingInterrupted``."""
        cfg = self.config
        last = cfg.max_steps if until is None else min(until, cfg.max_steps)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not cfg.progress, desc="train", unit="step")
        start = time.perf_counter()
        with self._stop_on_interrupt():
            while self.step < last and not self._stop_requested:
                lr = self.optimizer.param_groups[0]["lr"]
                loss, norm = self.train_step()
                self._record(loss, lr, norm, time.perf_counter() - start)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if self.eval_loader is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    self._record_eval(self.evaluate())
                if self.out_dir and cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
        bar.close()
        if self.out_dir:
            self.save()
            if cfg.plot:
                self.plot(self.out_dir / "curves.png")
        if self._stop_requested:
            raise TrainingInterrupted(self.step, self.out_dir)
        return self.history

    @contextlib.contextmanager
    def _stop_on_interrupt(self):
        """Ctrl-C asks the loop to stop at the next step boundary, where the weights are whole."""
        def request_stop(signum, frame):
            self._stop_requested = True

        try:
            previous = signal.signal(signal.SIGINT, request_stop)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            previous = None
        try:
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _record(self, loss, lr, norm, elapsed):
        h = self.history
        h.steps.append(self.step)
        h.losses.append(loss)
        h.lrs.append(lr)
        h.grad_norms.append(norm)
        self._log({"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm, "elapsed_s": round(elapsed, 3)})

    def _record_eval(self, eval_loss):
        self.history.eval_steps.append(self.step)
        self.history.eval_losses.append(eval_loss)
        self._log({"step": self.step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))})

    def _log(self, row: dict):
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    # ---- checkpoints ------------------------------------------------------------------
    def save(self) -> Path:
        """Checkpoint the trainable weights, optimizer, schedule, data position and history."""
        if self.out_dir is None:
            raise ValueError("save() needs config.out_dir")
        trainable = {name: p.data for name, p in self.model.named_parameters(trainable_only=True)}
        loop_state = {
            "scheduler": self.scheduler.state_dict(),
            "loader": self.train_loader.state_dict(),
            "history": asdict(self.history),
            "config": asdict(self.config),
        }
        return save_checkpoint(self.out_dir, self.step, trainable, self.optimizer.state_dict(),
                               loop_state, keep_last=self.config.keep_last)

    def resume(self) -> bool:
        """Load the latest checkpoint of ``out_dir`` if there is one; True if resumed."""
        folder = latest_checkpoint(self.out_dir) if self.out_dir else None
        if folder is None:
            return False
        trainable, optimizer_state, state = load_checkpoint(folder)
        self.model.load_state_dict(trainable, strict=False)
        own = {n for n, _ in self.model.named_parameters(trainable_only=True)}
        if set(trainable) != own:
            raise TrainingError(f"checkpoint {folder} trains different parameters than this model "
                                f"({len(trainable)} saved vs {len(own)} trainable)")
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["loader"])
        self._batches = None
        self.history = History(**state["history"])
        self.step = state["step"]
        return True

    # ---- pictures ---------------------------------------------------------------------
    def plot(self, path) -> Path:
        """Loss (train and eval) and learning rate against step, saved as a PNG."""
        from matplotlib.figure import Figure  # noqa: PLC0415 - no pyplot: keeps the caller's backend

        h = self.history
        fig = Figure(figsize=(10, 3.6))
        ax_loss, ax_lr = fig.subplots(1, 2)
        ax_loss.plot(h.steps, h.losses, label="train")
        if h.eval_steps:
            ax_loss.plot(h.eval_steps, h.eval_losses, "o-", label="eval")
        ax_loss.set(xlabel="step", ylabel="loss", title="loss")
        ax_loss.legend()
        ax_lr.plot(h.steps, h.lrs, color="tab:orange")
        ax_lr.set(xlabel="step", ylabel="learning rate", title=f"{self.config.schedule} schedule")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return Path(path)


def perplexity(loss: float) -> float:
    """exp(mean next-token loss): the number of equally likely choices the model hesitates among."""
    return float(numpy.exp(min(loss, 50.0)))
