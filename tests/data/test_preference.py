"""Preference records -> chosen and rejected sequences with labels on the answer only."""

import json

import numpy as np
import pytest

from minift.data import ByteTokenizer, DataError, bundled_path, to_messages
from minift.data.instructions import encode_example
from minift.data.preference import PreferenceDataset, collate_pairs, load_preferences

TOK = ByteTokenizer()
PAIR = {"prompt": "How long do I have?", "chosen": "30 days.", "rejected": "Forever, take your time."}


def answer_text(input_ids, labels):
    """The bytes the labels count, decoded: what DPO scores."""
    return TOK.decode([int(t) for t in labels if t != -100])


def test_labels_cover_the_answer_and_its_end_only_and_the_prompt_is_a_shared_prefix():
    pair = PreferenceDataset([PAIR], TOK, 256, system_prompt="Be brief.")[0]
    chosen, rejected = pair["chosen"], pair["rejected"]
    assert answer_text(**chosen) == "30 days.<|im_end|>"
    assert answer_text(**rejected) == "Forever, take your time.<|im_end|>"
    first_target = int(np.argmax(chosen["labels"] != -100))
    np.testing.assert_array_equal(chosen["input_ids"][:first_target + 1], rejected["input_ids"][:first_target + 1])
    # the chosen side is exactly SFT's encoding of the same conversation
    sft = encode_example(TOK, to_messages({"instruction": PAIR["prompt"], "output": PAIR["chosen"]}, "Be brief."), 256)
    np.testing.assert_array_equal(chosen["input_ids"], sft[0])
    np.testing.assert_array_equal(chosen["labels"], sft[1])


def test_an_assistant_turn_inside_the_prompt_is_not_scored():
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "Deadline?"}],
              "chosen": [{"role": "assistant", "content": "30 days."}], "rejected": "None."}
    pair = PreferenceDataset([record], TOK, 256)[0]
    assert answer_text(**pair["chosen"]) == "30 days.<|im_end|>"
    assert answer_text(**pair["rejected"]) == "None.<|im_end|>"


def test_a_batch_stacks_chosen_rows_above_rejected_rows_with_the_pair_index():
    data = PreferenceDataset([PAIR, {**PAIR, "rejected": "No idea."}], TOK, 256)
    batch = collate_pairs([data[1], data[0]], TOK.pad_id)
    assert batch["input_ids"].shape[0] == 4 and batch["index"].tolist() == [1, 0]
    assert answer_text(None, batch["labels"][0]) == "30 days.<|im_end|>"
    assert answer_text(None, batch["labels"][2]) == "No idea.<|im_end|>"
    assert answer_text(None, batch["labels"][3]) == "Forever, take your time.<|im_end|>"
    assert "reference_logprobs" not in batch
    data.reference_logprobs = np.array([[-1.0, -2.0], [-3.0, -4.0]])
    batch = collate_pairs([data[1], data[0]], TOK.pad_id)
    np.testing.assert_array_equal(batch["reference_logprobs"], [-3.0, -1.0, -4.0, -2.0])


@pytest.mark.parametrize(("record", "message"), [
    ({"chosen": "a", "rejected": "b"}, "exactly one of 'prompt' or 'messages'"),
    ({"prompt": "q", "messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
     "exactly one of"),
    ({"prompt": "q", "rejected": "b"}, "missing field 'chosen'"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' must be a string"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "the same text"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "must be the user's"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "one {\"role\": \"assistant\""),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}, "role 'robot'"),
])
def test_bad_records_name_the_line_and_the_problem(tmp_path, record, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(PAIR) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=f"{path.name}:3") as error:
        load_preferences(path)
    assert message in str(error.value)


def test_a_pair_longer_than_the_context_is_refused_naming_its_side():
    with pytest.raises(DataError, match=r"record 0 \(rejected\): .* max_len=80 .*; shorten it or raise max_len$"):
        PreferenceDataset([{**PAIR, "rejected": "x" * 200}], TOK, 80)  # refused by length, before tokenizing
    with pytest.raises(DataError, match=r"record 0 \(chosen\): .* tokens long but max_len is 40; shorten it or"):
        PreferenceDataset([PAIR], TOK, 40)  # the prompt alone does not fit: found once tokenized


def test_the_bundled_preference_sets_load():
    for name in ("insurer_preferences_train.jsonl", "insurer_preferences_eval.jsonl"):
        records = load_preferences(bundled_path(name))
        assert len(PreferenceDataset(records, TOK, 512)) == len(records) > 40


def test_an_answer_scored_alone_is_never_truncated():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(ValueError, match="must not be truncated"):
        encode_example(TOK, messages, 64, truncate=True, last_turn_only=True)
