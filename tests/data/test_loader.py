"""collate (right padding) and DataLoader (seeded order per epoch, exact mid-epoch resume)."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minift.data import DataLoader, collate

PAD = 99


class Numbered:
    """Example i is ``[i, i, ...]`` of length 1 + i % 3, so a batch tells which examples it holds."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = np.full(1 + i % 3, i, dtype=np.int64)
        return {"input_ids": ids, "labels": ids + 1000}


def first_column(batches):
    return [b["input_ids"][:, 0].tolist() for b in batches]


def test_collate_pads_on_the_right():
    examples = [{"input_ids": np.array([1, 2, 3]), "labels": np.array([2, 3, -100])},
                {"input_ids": np.array([7]), "labels": np.array([8])}]
    batch = collate(examples, pad_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [7, PAD, PAD]]
    assert batch["labels"].tolist() == [[2, 3, -100], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == np.int64
    assert batch["attention_mask"].dtype == bool


def test_collate_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        collate([], PAD)
    with pytest.raises(ValueError, match="as many labels"):
        collate([{"input_ids": np.array([1, 2]), "labels": np.array([1])}], PAD)


@pytest.mark.parametrize("n, batch_size, drop_last, expected", [(10, 3, False, 4), (10, 3, True, 3),
                                                                  (9, 3, False, 3), (2, 5, False, 1)])
def test_len_is_batches_per_epoch(n, batch_size, drop_last, expected):
    loader = DataLoader(Numbered(n), batch_size, drop_last=drop_last, pad_id=PAD)
    assert len(loader) == expected
    assert len(list(loader)) == expected


def test_drop_last_with_too_few_examples_is_an_error():
    with pytest.raises(ValueError, match="no batch"):
        DataLoader(Numbered(2), 5, drop_last=True, pad_id=PAD)


def test_epoch_order_is_the_documented_permutation():
    loader = DataLoader(Numbered(10), 3, seed=5, pad_id=PAD)
    for epoch in range(3):
        seen = sum(first_column(loader), [])
        assert seen == np.random.default_rng(5 + epoch).permutation(10).tolist()


def test_each_epoch_visits_every_example_once_and_reshuffles():
    loader = DataLoader(Numbered(12), 4, seed=0, pad_id=PAD)
    epoch0, epoch1 = sum(first_column(loader), []), sum(first_column(loader), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1


def test_same_seed_same_batches_other_seed_other_batches():
    def batches(seed):
        return first_column(DataLoader(Numbered(20), 4, seed=seed, pad_id=PAD))

    assert batches(3) == batches(3)
    assert batches(3) != batches(4)


def test_no_shuffle_keeps_dataset_order():
    loader = DataLoader(Numbered(5), 2, shuffle=False, pad_id=PAD)
    assert first_column(loader) == [[0, 1], [2, 3], [4]]


def test_cursor_moves_to_the_next_epoch_after_the_last_batch():
    loader = DataLoader(Numbered(5), 2, pad_id=PAD)
    it = iter(loader)
    next(it)
    assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["batch_index"] == 1
    list(it)
    assert (loader.state_dict()["epoch"], loader.state_dict()["batch_index"]) == (1, 0)


def endless(loader):
    """Batches forever, starting a new ``for`` loop whenever one ends (what the Trainer does)."""
    while True:
        yield from loader


def resume_matches(n, batch_size, seed, stop):
    """Stop after ``stop`` batches, restore a fresh loader from the JSON'd state: same batches follow."""
    original = DataLoader(Numbered(n), batch_size, seed=seed, pad_id=PAD)
    stream = endless(original)
    for _ in range(stop):
        next(stream)
    state = json.loads(json.dumps(original.state_dict()))
    resumed = DataLoader(Numbered(n), batch_size, seed=seed, pad_id=PAD)
    resumed.load_state_dict(state)
    k = 2 * len(original) + 1  # the rest of this epoch and all of the next ones
    stream_resumed = endless(resumed)
    return [next(stream) for _ in range(k)], [next(stream_resumed) for _ in range(k)]


def test_state_dict_resume_mid_epoch_gives_identical_remaining_batches():
    before, after = resume_matches(n=11, batch_size=3, seed=7, stop=2)
    assert len(before) == len(after) == 9
    for a, b in zip(before, after, strict=True):
        for key in ("input_ids", "labels", "attention_mask"):
            np.testing.assert_array_equal(a[key], b[key])


@given(st.integers(1, 30), st.integers(1, 7), st.integers(0, 1000), st.integers(0, 12))
def test_resume_property(n, batch_size, seed, stop):
    before, after = resume_matches(n, batch_size, seed, stop)
    assert first_column(before) == first_column(after)


def test_load_state_dict_refuses_a_different_setup():
    state = DataLoader(Numbered(10), 3, seed=1, pad_id=PAD).state_dict()
    with pytest.raises(ValueError, match="batch_size: saved 3, now 4"):
        DataLoader(Numbered(10), 4, seed=1, pad_id=PAD).load_state_dict(state)
    with pytest.raises(ValueError, match="num_examples: saved 10, now 12"):
        DataLoader(Numbered(12), 3, seed=1, pad_id=PAD).load_state_dict(state)
