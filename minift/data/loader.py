"""Batches: pad examples to one rectangle, and walk a dataset in a reproducible, resumable order.

The training loop of lecture 002 ("the model sees your examples, predicts, compares, adjusts,
repeats") consumes batches, not single examples: a (B, T) block of ids is one matmul-friendly
forward pass. Examples have different lengths, so ``collate`` pads the short ones on the right.
Right padding with a causal model is harmless: a real token only attends to earlier positions,
and pads come after every real token of their row. Pads get label IGNORE_INDEX (-100), so they add no loss.
Padding still costs compute; ``packing.py`` packs short examples into shared rows instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy

from minift.data.instructions import IGNORE_INDEX


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, numpy.ndarray]:
    """Stack ``{"input_ids", "labels"}`` examples into right-padded (B, T) arrays.

    -> ``input_ids`` (B, T) int64 padded with ``pad_id``, ``labels`` (B, T) int64 padded with IGNORE_INDEX (-100),
    ``attention_mask`` (B, T) bool, True on real tokens. T is the longest example of the batch.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    lengths = [len(ex["input_ids"]) for ex in examples]
    if any(len(ex["labels"]) != n for ex, n in zip(examples, lengths, strict=True)):
        raise ValueError("every example needs as many labels as input_ids")
    batch, width = len(examples), max(lengths)
    input_ids = numpy.full((batch, width), pad_id, dtype=numpy.int64)
    labels = numpy.full((batch, width), IGNORE_INDEX, dtype=numpy.int64)
    mask = numpy.zeros((batch, width), dtype=bool)
    for row, (ex, n) in enumerate(zip(examples, lengths, strict=True)):
        input_ids[row, :n] = ex["input_ids"]
        labels[row, :n] = ex["labels"]
        mask[row, :n] = True
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


class DataLoader:
    """Batches of ``dataset``, one epoch per ``for`` loop, in an order that can be replayed.

    Epoch ``e`` visits the examples in the order ``numpy.random.default_rng(seed + e).permutation(n)``
    (or ``0..n-1`` without ``shuffle``): a pure function of (seed, epoch), so every epoch is
    reshuffled, two runs with the same seed see the same batches, and a run resumed from a
    checkpoint sees exactly the batches it would have seen had it never stopped.

    The loader is a cursor: it remembers (epoch, next batch). A ``for`` loop starts at the cursor
    and each batch handed out moves it; after the last batch of an epoch it moves to the start
    of the next epoch. ``state_dict()``/``load_state_dict()`` save and restore the cursor.
    Consume one iterator at a time.
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, *, pad_id: int, collate_fn=collate) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.pad_id = dataset, batch_size, pad_id
        self.collate_fn = collate_fn  # (examples, pad_id) -> batch; preference pairs bring their own
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.batch_index = 0, 0
        if len(self) == 0:
            raise ValueError(f"{len(dataset)} examples make no batch of {batch_size} with drop_last=True")

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch_order(self, epoch: int) -> numpy.ndarray:
        """Indices of the examples in the order epoch ``epoch`` visits them."""
        n = len(self.dataset)
        return numpy.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle else numpy.arange(n)

    def __iter__(self) -> Iterator[dict[str, numpy.ndarray]]:
        order = self.epoch_order(self.epoch)
        for b in range(self.batch_index, len(self)):
            indices = order[b * self.batch_size:(b + 1) * self.batch_size]
            batch = self.collate_fn([self.dataset[int(i)] for i in indices], self.pad_id)
            if b + 1 < len(self):
                self.batch_index = b + 1
            else:
                self.epoch, self.batch_index = self.epoch + 1, 0
            yield batch

    def state_dict(self) -> dict:
        """The cursor, plus what it means (JSON-friendly: the trainer stores it in state.json)."""
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed,
                "shuffle": self.shuffle, "batch_size": self.batch_size,
                "num_examples": len(self.dataset), "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Restore the cursor; refuses a state saved with another dataset size or batching."""
        mine = self.state_dict()
        changed = [k for k in ("seed", "shuffle", "batch_size", "num_examples", "drop_last")
                   if state[k] != mine[k]]
        if changed:
            diffs = ", ".join(f"{k}: saved {state[k]!r}, now {mine[k]!r}" for k in changed)
            raise ValueError(f"loader state does not match this loader ({diffs}); the saved position "
                             f"would point at different batches")
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])
