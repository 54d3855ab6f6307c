"""Sequence packing: several short examples in one row, none of them seeing another.

A padded batch (``minift/data/loader.py``) is as wide as its longest example, so a batch of short
chats is mostly padding: forward and backward spend their matmuls on tokens whose loss is thrown
away. Packing lays whole examples end to end in rows of at most ``max_len`` tokens instead, the
trick of the T5 and GPT pretraining pipelines, made exact for fine-tuning by three things each row carries:

- ``segment_ids``: 1, 2, ... for the examples of the row, 0 on padding. A token attends only to
  earlier tokens *of its own example*: the model computes each example's own causal block
  (``minift.autograd.attention.SegmentAttention``), which equals full attention under the
  block-diagonal mask ``segment_mask`` at the cost of the blocks alone.
- ``positions``: restart at 0 for every example, so RoPE rotates each one as if it were alone.
- ``labels``: each example keeps its own. Labels in minift are already shifted inside each example
  (``labels[t]`` is the example's own token ``t + 1``, see ``encode_example``), so the last token
  of an example predicts that example's closing token (a non-target, IGNORE_INDEX, for a chat),
  never the first token of the next one: the boundary needs no extra masking. Padding gets
  IGNORE_INDEX.

With the three, every example's logits are the ones it would get alone, and the mean loss over
the same counted tokens is the padded batch's (``tests/data/test_packing.py`` checks both).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy

from minift.data.loader import collate

#: What a packed batch adds to a padded one; the Trainer's loss hands them to the model as they are.
PACKED_KEYS = ("positions", "segment_ids")


def pack_examples(examples: Sequence[dict], max_len: int) -> list[dict[str, numpy.ndarray]]:
    """Pack ``{"input_ids", "labels"}`` examples into rows of at most ``max_len`` tokens.

    First-fit decreasing: examples are taken longest first, each into the first row with room
    for it, else into a new row. Why not in dataset order: in order, a long example that does
    not fit closes the row and leaves its tail empty; placing the long ones first and filling the
    gaps with short ones leaves at most ``11/9 OPT + 6/9`` rows (Dosa 2007), usually one or two
    rows more than the ideal. The order is lost, but nothing needs it: the DataLoader shuffles
    the packed rows each epoch. Ties keep dataset order, so the packing is deterministic.

    -> one dict per row with ``input_ids``, ``labels``, ``positions`` and ``segment_ids``, int64
    arrays of the row's length (padding is ``collate_packed``'s job).
    """
    if max_len < 1:
        raise ValueError(f"pack_examples: max_len must be >= 1, got {max_len}")
    lengths = [len(ex["input_ids"]) for ex in examples]
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(f"pack_examples: example {i} is {n} tokens long, more than a packed row of "
                             f"{max_len}; raise the row length (minift finetune --pack-len) or shorten it")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(examples)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(max_len)
        rows[row].append(i)
        room[row] -= lengths[i]
    return [_join([examples[i] for i in members]) for members in rows]


def _join(members: list[dict]) -> dict[str, numpy.ndarray]:
    """One packed row: the members end to end, positions restarting and segment k + 1 for member k."""
    def cat(key):
        return numpy.concatenate([numpy.asarray(ex[key], dtype=numpy.int64) for ex in members])

    return {"input_ids": cat("input_ids"), "labels": cat("labels"),
            "positions": numpy.concatenate([numpy.arange(len(ex["input_ids"])) for ex in members]),
            "segment_ids": numpy.concatenate([numpy.full(len(ex["input_ids"]), k + 1)
                                              for k, ex in enumerate(members)])}


def collate_packed(rows: Sequence[dict], pad_id: int) -> dict[str, numpy.ndarray]:
    """``collate`` for packed rows: the same right-padded ``input_ids``, ``labels`` and
    ``attention_mask``, plus ``positions`` (0 on padding) and ``segment_ids`` (0 on padding), (B, T) int64.
    A DataLoader takes it as ``collate_fn``."""
    batch = collate(rows, pad_id)
    for key in PACKED_KEYS:
        batch[key] = numpy.zeros(batch["input_ids"].shape, dtype=numpy.int64)
        for r, row in enumerate(rows):
            batch[key][r, :len(row[key])] = row[key]
    return batch


def padding_share(batches: Iterable[dict]) -> float:
    """Share of the cells of ``batches`` that are padding (``attention_mask`` False): the compute a
    padded batch spends on nothing. Works on plain and packed batches alike."""
    cells = real = 0
    for batch in batches:
        mask = numpy.asarray(batch["attention_mask"])
        cells, real = cells + mask.size, real + int(mask.sum())
    if cells == 0:
        raise ValueError("padding_share: no batch given")
    return 1.0 - real / cells
