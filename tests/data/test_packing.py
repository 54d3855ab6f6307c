"""Sequence packing (issue 19): rows of whole examples, positions restarting, segments numbered,
each example's labels kept as they are, padding counted."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minift.data import IGNORE_INDEX, DataLoader, collate, collate_packed, pack_examples, padding_share


def example(n, start=0):
    """n tokens start, start+1, ...; labels are the ids shifted by one, the last one ignored."""
    ids = np.arange(start, start + n)
    return {"input_ids": ids, "labels": np.append(ids[1:], IGNORE_INDEX)}


def test_first_fit_decreasing_places_the_long_examples_first_and_fills_the_gaps():
    examples = [example(n, 100 * i) for i, n in enumerate([3, 7, 5, 2, 4])]
    rows = pack_examples(examples, max_len=9)
    # longest first: 7 -> row 0, 5 -> row 1, 4 -> row 1, 3 -> row 2, 2 -> row 0
    assert [len(r["input_ids"]) for r in rows] == [9, 9, 3]
    assert rows[0]["input_ids"].tolist() == [*range(100, 107), 300, 301]
    assert rows[0]["segment_ids"].tolist() == [1] * 7 + [2] * 2
    assert rows[0]["positions"].tolist() == [*range(7), 0, 1]
    assert rows[1]["positions"].tolist() == [*range(5), *range(4)]


def test_each_example_keeps_its_own_labels_so_no_boundary_label_names_the_next_example():
    examples = [example(4, 0), example(3, 50)]
    row = pack_examples(examples, max_len=8)[0]
    assert row["labels"].tolist() == [1, 2, 3, IGNORE_INDEX, 51, 52, IGNORE_INDEX]
    # the last token of example 1 (id 3) does not predict the first of example 2 (id 50)
    assert row["labels"][3] != row["input_ids"][4]


def test_collate_packed_pads_with_ignored_labels_position_zero_and_segment_zero():
    rows = pack_examples([example(5), example(2, 10)], max_len=5)
    batch = collate_packed(rows, pad_id=99)
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3, 4], [10, 11, 99, 99, 99]]
    assert batch["labels"][1].tolist() == [11, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["positions"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 0, 0]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[True] * 5, [True, True, False, False, False]]
    assert all(batch[k].dtype == np.int64 for k in ("input_ids", "labels", "positions", "segment_ids"))


def test_padding_share_counts_the_cells_of_padding():
    plain = [collate([example(4), example(1)], pad_id=0)]  # 8 cells, 5 real
    assert padding_share(plain) == pytest.approx(3 / 8, abs=0)
    packed = [collate_packed(pack_examples([example(4), example(1)], max_len=5), pad_id=0)]
    assert padding_share(packed) == 0.0
    with pytest.raises(ValueError, match="no batch"):
        padding_share([])


def test_an_example_longer_than_a_row_is_refused_by_index_with_the_remedy():
    with pytest.raises(ValueError, match=r"example 1 is 6 tokens long.*--pack-len"):
        pack_examples([example(2), example(6)], max_len=5)


def test_packed_rows_go_through_the_data_loader():
    rows = pack_examples([example(n) for n in (3, 4, 5, 6)], max_len=8)
    batches = list(DataLoader(rows, batch_size=2, seed=0, pad_id=0, collate_fn=collate_packed))
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == 18


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=30), st.integers(12, 40))
def test_packing_keeps_every_token_once_within_rows_and_restarts_positions(lengths, max_len):
    examples = [example(n, 1000 * i) for i, n in enumerate(lengths)]
    rows = pack_examples(examples, max_len)
    assert all(len(r["input_ids"]) <= max_len for r in rows)
    seen = []
    for row in rows:
        for segment in range(1, row["segment_ids"].max() + 1):
            where = row["segment_ids"] == segment
            ids = row["input_ids"][where]
            assert row["positions"][where].tolist() == list(range(len(ids)))  # restart at 0
            original = examples[ids[0] // 1000]
            assert ids.tolist() == original["input_ids"].tolist()
            assert row["labels"][where].tolist() == original["labels"].tolist()
            seen.append(ids[0] // 1000)
    assert sorted(seen) == list(range(len(examples)))
    # first fit: no example of a later row would have fitted in the room an earlier row left
    room = [max_len - len(r["input_ids"]) for r in rows]
    for r, row in enumerate(rows):
        smallest = min(np.bincount(row["segment_ids"])[1:])
        assert all(free < smallest for free in room[:r])
