"""The training loop: forward, loss, backward, clip, AdamW step, schedule — and the care around it.

One optimizer *step* (lecture 002's loop) is::

    for each of grad_accum_steps micro-batches:
        loss = cross_entropy(model(input_ids), labels) / grad_accum_steps
        loss.backward()                   # gradients add up in .grad

(``model.loss`` computes that cross-entropy with the head fused in, so the (B, T, V) logits are
never whole: ``F.linear_cross_entropy``.)
    clip_grad_norm_(params, max_grad_norm)
    optimizer.step(); scheduler.step(); optimizer.zero_grad()

The Trainer never knows which fine-tuning method is in use: full, frozen layers, LoRA and
QLoRA differ only in which parameters have ``requires_grad`` (docs/design.md, "the flow of data").

Around the loop: evaluation every N steps, a progress bar, ``metrics.jsonl``, loss and
learning-rate plots, checkpoints that survive a kill at any instant, exact resume (a run stopped
and resumed produces the same losses as one run straight through), Ctrl-C that saves before
stopping, and a NaN/inf loss that stops the run before it can touch the weights and never leaves
``latest`` on weights known to give one.
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
from minift.data.packing import PACKED_KEYS
from minift.io import atomic_write_bytes
from minift.optim import AdamW, AdamW8bit, clip_grad_norm_, get_scheduler, weight_decay_groups
from minift.training.checkpoint import (
    CheckpointError,
    checkpoint_folders,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_orphans,
    save_checkpoint,
    set_latest,
)


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


#: ``TrainConfig.optimizer`` -> the class the Trainer builds; both take AdamW's hyper-parameters.
OPTIMIZERS = {"adamw": AdamW, "adamw8bit": AdamW8bit}


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
    keep_last: int = 1  # good checkpoints kept, plus the newest until a finite loss vouches for it
    optimizer: str = "adamw"  # or "adamw8bit": the moments in 8 bits (OPTIMIZERS, docs/training.md)

    def __post_init__(self):
        if self.max_steps <= 0 or self.grad_accum_steps <= 0:
            raise ValueError("max_steps and grad_accum_steps must be positive")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer is {self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {self.keep_last}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        self.betas = tuple(self.betas)


def causal_lm_loss(model, batch):
    """Mean next-token cross-entropy over the counted (label != F.IGNORE_INDEX) positions.

    ``labels`` are pre-shifted by the data pipeline: ``labels[b, t]`` is the token that should
    follow ``input_ids[b, t]``, with prompt and padding positions set to ``IGNORE_INDEX``.
    A packed batch (``minift/data/packing.py``) also brings ``positions`` and ``segment_ids``,
    which the model needs to keep its examples apart. ``model.loss`` runs the head in vocabulary
    chunks fused with the loss (``F.linear_cross_entropy``): the same number without the logits.
    """
    packed = {key: batch[key] for key in PACKED_KEYS if key in batch}
    return model.loss(batch["input_ids"], batch["labels"], **packed)


def evaluate_loss(model, loader, loss_fn=causal_lm_loss) -> float:
    """Mean loss per counted token over every batch of ``loader``, without building a graph."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with no_grad():
        for batch in loader:
            n = int((xp.asarray(batch["labels"]) != F.IGNORE_INDEX).sum())
            total += _loss_and_extras(loss_fn(model, batch))[0].item() * n
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
    metrics: dict = field(default_factory=dict)  # name -> one value per step (a loss_fn's extras)


class Trainer:
    """Runs ``config.max_steps`` optimizer steps of ``model`` on batches from ``train_loader``."""

    loss_label = "loss (nats/token)"  # the y axis of curves.png

    def __init__(self, model, config: TrainConfig, train_loader, eval_loader=None, loss_fn=causal_lm_loss):
        self.model, self.config, self.loss_fn = model, config, loss_fn
        self.train_loader, self.eval_loader = train_loader, eval_loader
        keep_freed_memory()  # each step reuses the last step's activation memory (minift/allocator.py)
        named = list(model.named_parameters(trainable_only=True))
        if not named:
            raise TrainingError("the model has no trainable parameter: everything is frozen")
        self.params = [p for _, p in named]
        optimizer = OPTIMIZERS[config.optimizer]
        self.optimizer = optimizer(weight_decay_groups(named, config.weight_decay), lr=config.lr,
                                   betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(config.schedule, self.optimizer, num_warmup_steps=config.warmup_steps,
                                       num_training_steps=config.max_steps, warmup_ratio=config.warmup_ratio)
        self.step = 0
        self.history = History()
        self._batches = None
        self._last_batch = None
        self._stop_requested = False
        self.step_metrics: dict[str, float] = {}
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self._good: list[Path] = []  # checkpoints whose weights gave a finite loss, oldest first
        self._unconfirmed: Path | None = None  # the newest checkpoint, until then

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
        """One optimizer step over ``grad_accum_steps`` micro-batches -> (loss, grad norm).

        ``loss_fn`` returns the loss, or (loss, {name: value}) to report more per batch (DPO's
        rewards); those are averaged over the micro-batches into ``self.step_metrics``."""
        model, cfg = self.model, self.config
        model.train()
        total, self.step_metrics = 0.0, {}
        for _ in range(cfg.grad_accum_steps):
            self._last_batch = self.next_batch()
            loss, extras = _loss_and_extras(self.loss_fn(model, self._last_batch))
            for name, extra in extras.items():
                self.step_metrics[name] = self.step_metrics.get(name, 0.0) + extra / cfg.grad_accum_steps
            value = loss.item()
            if not math.isfinite(value):
                raise self._nonfinite(f"loss became {value} at step {self.step + 1}; stopping before "
                                      f"the weights are updated")
            (loss / cfg.grad_accum_steps).backward()
            total += value / cfg.grad_accum_steps
        norm = clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm else math.inf)
        if not math.isfinite(norm):
            raise self._nonfinite(f"gradient norm became {norm} at step {self.step + 1}; stopping "
                                  f"before the weights are updated")
        self._confirm_checkpoint()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        self.step += 1
        return total, norm

    def _nonfinite(self, problem: str) -> TrainingError:
        """The error that stops the run; the checkpoint of the weights that gave it is deleted first.

        The non-finite value came from the current weights. If the newest checkpoint is still
        unconfirmed, it holds exactly those weights (a finished step would have confirmed it),
        so it is poisoned: ``latest`` goes back to the newest good checkpoint (or away, if there
        is none), then the poisoned folder is deleted — in that order, so that ``latest`` never
        names a missing folder.
        """
        poisoned, good = self._unconfirmed, (self._good[-1] if self._good else None)
        said = []
        if poisoned is not None:
            set_latest(self.out_dir, good)
            prune_checkpoints(self.out_dir, keep=self._good)
            self._unconfirmed = None
            said.append(f"{poisoned} held the weights that gave it and was deleted")
        if good is not None:
            said.append(f"the last good checkpoint ({good}) is intact and --resume continues from it")
        else:
            said.append("no checkpoint gave a finite loss: --resume starts over" if poisoned is not None
                        else "no checkpoint was written")
        return TrainingError(f"{problem} ({'; '.join(said)}). Try a lower learning rate "
                             f"(--resume --lr) or check the data.")

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
            if self.step == cfg.max_steps and self._unconfirmed is not None and self._last_batch is not None:
                self._confirm_final_weights()
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
        for name, value in self.step_metrics.items():
            h.metrics.setdefault(name, []).append(value)
        self._log({"step": self.step, "loss": loss, **self.step_metrics, "lr": lr, "grad_norm": norm,
                   "elapsed_s": round(elapsed, 3)})

    def _record_eval(self, eval_loss):
        self.history.eval_steps.append(self.step)
        self.history.eval_losses.append(eval_loss)
        self._log({"step": self.step, "eval_loss": eval_loss, **self.eval_extras(eval_loss)})

    def eval_extras(self, eval_loss: float) -> dict:
        """What an eval row reports beside the loss: perplexity, for a next-token loss."""
        return {"eval_ppl": math.exp(min(eval_loss, 50))}

    def _log(self, row: dict):
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    # ---- checkpoints ------------------------------------------------------------------
    # A checkpoint is *good* once a loss computed on its weights came out finite. Saving step N
    # cannot know that: the loss on N's weights is the one step N+1 computes. So the newest
    # checkpoint stays unconfirmed, and the good ones behind it are kept, until that loss and
    # gradient norm are finite (``_confirm_checkpoint``); if they are not, it is deleted
    # (``_nonfinite``). lr 1e5 shows why: its weights are finite (1e10 and up) and the very next
    # forward is NaN, so "finite weights" alone would keep a checkpoint that can only fail.
    def save(self) -> Path:
        """Checkpoint the trainable weights, optimizer, schedule, data position and history.

        A second save at the same step (the end of a run right after a periodic save, or of a
        resumed run that had finished) writes nothing: nothing has changed since the first."""
        if self.out_dir is None:
            raise ValueError("save() needs config.out_dir")
        newest = self._unconfirmed or (self._good[-1] if self._good else None)
        if newest is not None and checkpoint_step(newest) == self.step:
            return newest
        trainable = {name: p.data for name, p in self.model.named_parameters(trainable_only=True)}
        loop_state = {
            "scheduler": self.scheduler.state_dict(),
            "loader": self.train_loader.state_dict(),
            "history": asdict(self.history),
            "config": asdict(self.config),
        }
        self._unconfirmed = save_checkpoint(self.out_dir, self.step, trainable, self.optimizer.state_dict(),
                                            loop_state)
        return self._unconfirmed

    def _confirm_checkpoint(self):
        """The loss and gradient of the current weights were finite: their checkpoint is good.
        Only now may the good checkpoints beyond ``keep_last`` go."""
        if self._unconfirmed is None:
            return
        self._good = [*self._good, self._unconfirmed][-self.config.keep_last:]
        self._unconfirmed = None
        prune_checkpoints(self.out_dir, keep=self._good)

    def _confirm_final_weights(self):
        """A finished run's last checkpoint has no next step to vouch for it: the loss on the
        last step's batch does (not a new batch: that would move a loader the caller may share).
        A resumed run that had already finished has no batch, and leaves it unconfirmed."""
        value = evaluate_loss(self.model, [self._last_batch], self.loss_fn)
        if not math.isfinite(value):
            raise self._nonfinite(f"the loss on the final weights (step {self.step}) is {value}")
        self._confirm_checkpoint()

    def resume(self) -> bool:
        """Load the latest checkpoint of ``out_dir`` if there is one; True if resumed.

        No checkpoint ever committed: False, the run starts at step 0. A checkpoint that is
        there but cannot be read is a TrainingError naming it, never a silent fresh start.
        Leftovers of a killed save are deleted, and ``metrics.jsonl`` loses the rows logged
        after the checkpoint (the resumed run logs them again). A ``config.lr`` other than the
        checkpoint's becomes the peak of the rest of the schedule, and a line says so.
        """
        if self.out_dir is None:
            return False
        remove_orphans(self.out_dir)
        try:
            folder = latest_checkpoint(self.out_dir)
            if folder is None:
                self._drop_metrics_after(0)  # the rows of a run killed before its first checkpoint
                return False
            trainable, optimizer_state, state = load_checkpoint(folder)
        except CheckpointError as err:
            raise TrainingError(str(err)) from err
        missing = {"step", "scheduler", "loader", "history"} - set(state)
        if missing:
            raise TrainingError(f"{folder / 'state.json'} lacks {sorted(missing)}: not a checkpoint of this "
                                f"Trainer; write the name of an older step-* folder in {self.out_dir / 'latest'}, "
                                f"or delete it to start over")
        saved_optimizer = state.get("config", {}).get("optimizer", "adamw")
        if saved_optimizer != self.config.optimizer:
            raise TrainingError(f"checkpoint {folder} was trained with optimizer {saved_optimizer!r}, this run "
                                f"uses {self.config.optimizer!r}: resume with --optim {saved_optimizer}, or start "
                                f"over with --overwrite")
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
        # the checkpoint's own weights are vouched for by the next step; each older one was by
        # the steps that led to the newer ones
        self._unconfirmed = folder
        self._good = [f for f in checkpoint_folders(self.out_dir) if checkpoint_step(f) < self.step]
        self._drop_metrics_after(self.step)
        saved_lr = self.scheduler.base_lrs[0]
        if saved_lr != self.config.lr:
            self._continue_schedule_with_peak(self.config.lr)
            print(f"resumed at step {self.step} with lr {self.config.lr:g} (checkpoint had {saved_lr:g})")
        return True

    def _continue_schedule_with_peak(self, lr: float):
        """Every lr is peak x lambda(t) (minift/optim/schedules.py): set the new peak, then redo
        step t so that the lr of the next update is the new peak x lambda(t)."""
        for group in self.optimizer.param_groups:
            group["initial_lr"] = lr
        self.scheduler.base_lrs = [lr] * len(self.scheduler.base_lrs)
        self.scheduler.last_epoch -= 1
        self.scheduler.step()

    def _drop_metrics_after(self, step: int):
        """A run killed between two checkpoints logged rows past the one it resumes from, and
        would log them again: drop them (and a row the kill tore), atomically, so that
        ``metrics.jsonl`` reads as one run."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        rows = path.read_text().splitlines()
        kept = [row for row in rows if _logged_by(row, step)]
        if kept != rows:
            atomic_write_bytes(path, [f"{row}\n".encode() for row in kept])

    # ---- pictures ---------------------------------------------------------------------
    def plot(self, path) -> Path:
        """Loss (train and eval on one axis) and learning rate against step, saved as a PNG.

        Titled with the run's name (the last two parts of its folder, e.g. "demo/lora"), so a
        picture kept or shared still says what it shows. A train loss far below the eval loss
        is overfitting; an eval loss that rises while the train loss falls, memorizing."""
        from matplotlib.figure import Figure  # noqa: PLC0415 - no pyplot: keeps the caller's backend

        h, cfg = self.history, self.config
        folder = (self.out_dir or Path(path).parent).resolve()
        run = "/".join(folder.parts[-2:])
        fig = Figure(figsize=(10, 3.8))
        ax_loss, ax_lr = fig.subplots(1, 2)
        ax_loss.plot(h.steps, h.losses, label="train (each step's batch)", linewidth=1)
        if h.eval_steps:
            ax_loss.plot(h.eval_steps, h.eval_losses, "o-", label="eval (held-out data)")
        note = "" if h.eval_steps else " — no eval data"
        ax_loss.set(xlabel="step", ylabel=self.loss_label, title=f"loss{note}")
        ax_loss.legend()
        ax_lr.plot(h.steps, h.lrs, color="tab:orange")
        ax_lr.set(xlabel="step", ylabel="learning rate", title=f"{cfg.schedule} schedule, peak {cfg.lr:g}")
        fig.suptitle(f"run '{run}': {h.steps[-1] if h.steps else 0} of {cfg.max_steps} steps")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return Path(path)


def _logged_by(row: str, step: int) -> bool:
    """Whether a ``metrics.jsonl`` row was logged at or before ``step`` (a torn row was not)."""
    try:
        return json.loads(row)["step"] <= step
    except (ValueError, KeyError, TypeError):
        return False


def _loss_and_extras(result) -> tuple:
    """A loss function's result as (loss Tensor, extra metrics dict)."""
    return result if isinstance(result, tuple) else (result, {})


def perplexity(loss: float) -> float:
    """exp(mean next-token loss): the number of equally likely choices the model hesitates among."""
    return float(numpy.exp(min(loss, 50.0)))
