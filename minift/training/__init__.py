"""Training: the loop, checkpoints that survive a kill, the fine-tuning methods, evaluation.

Reading order: ``trainer.py`` (the loop: loss, backward, clip, step, schedule, metrics),
``checkpoint.py`` (atomic saves and exact resume), ``methods.py`` (each method only decides what
is trainable), ``evaluation.py`` (question-answering accuracy), ``pretrained.py`` (one call from
a name or a path to a model, and back to a folder; it rebuilds a method's added modules, which is
why it lives here and not in ``minift.io``).
"""

from minift.training.methods import METHODS, MethodOptions, prepare_model
from minift.training.pretrained import load_pretrained, save_pretrained
from minift.training.trainer import (
    TrainConfig,
    Trainer,
    TrainingError,
    TrainingInterrupted,
    causal_lm_loss,
    evaluate_loss,
    perplexity,
)

__all__ = ["METHODS", "MethodOptions", "TrainConfig", "Trainer", "TrainingError",
           "TrainingInterrupted", "causal_lm_loss",
           "evaluate_loss", "load_pretrained", "perplexity", "prepare_model", "save_pretrained"]
