"""Instruction data: JSONL validation, records -> messages, prompt masking, pre-shifted labels."""

import json

import numpy as np
import pytest
from hypothesis import given
from strategies import chats

from minift.data import (
    ByteTokenizer,
    DataError,
    InstructionDataset,
    TextDataset,
    encode_example,
    load_jsonl,
    load_qa,
    render_chatml,
    to_messages,
)

TOK = ByteTokenizer()
START, END, NL = 257, 258, ord("\n")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---- records -> messages ---------------------------------------------------------------------


def test_instruction_with_input_joins_them_with_a_blank_line():
    record = {"instruction": "Translate to French", "input": "Hello world", "output": "Bonjour le monde"}
    assert to_messages(record) == [user("Translate to French\n\nHello world"), assistant("Bonjour le monde")]


@pytest.mark.parametrize("record", [{"instruction": "Say hi", "input": "", "output": "hi"},
                                    {"instruction": "Say hi", "output": "hi"}])
def test_empty_or_missing_input_adds_nothing(record):
    assert to_messages(record) == [user("Say hi"), assistant("hi")]


def test_system_prompt_goes_first():
    messages = to_messages({"instruction": "Q", "output": "A"}, system_prompt="S")
    assert messages == [{"role": "system", "content": "S"}, user("Q"), assistant("A")]


def test_chat_records_keep_their_own_system_message():
    own = {"messages": [{"role": "system", "content": "own"}, user("Q"), assistant("A")]}
    assert to_messages(own, system_prompt="default")[0]["content"] == "own"
    plain = {"messages": [user("Q"), assistant("A")]}
    assert to_messages(plain, system_prompt="default") == [{"role": "system", "content": "default"},
                                                           user("Q"), assistant("A")]


# ---- prompt masking and the shift ----------------------------------------------------------------


def test_labels_hand_checked_single_turn():
    input_ids, labels = encode_example(TOK, [user("Hi"), assistant("Yo")], max_len=100)
    # full sequence: <s>user\nHi</s>\n<s>assistant\nYo</s>\n  (25 ids); inputs drop the last one
    expected_ids = [START, *b"user\n", *b"Hi", END, NL, START, *b"assistant\n", *b"Yo", END]
    assert input_ids.tolist() == expected_ids
    # only "Y", "o" and the closing <|im_end|> are targets, each one position early (pre-shifted)
    assert labels.tolist() == [-100] * 20 + [ord("Y"), ord("o"), END, -100]
    assert input_ids.dtype == labels.dtype == np.int64


def test_labels_hand_checked_multi_turn_counts_every_assistant_turn():
    messages = [{"role": "system", "content": "S"}, user("a"), assistant("bc"), user("d"), assistant("e")]
    input_ids, labels = encode_example(TOK, messages, max_len=200)
    counted = labels[labels != -100].tolist()
    assert counted == [ord("b"), ord("c"), END, ord("e"), END]
    # the token right before each counted label is what the model sees when predicting it
    first = int(np.argmax(labels != -100))
    assert TOK.decode(input_ids[:first + 1]).endswith("<|im_start|>assistant\n")


def test_user_text_that_looks_like_a_special_token_stays_text():
    input_ids, labels = encode_example(TOK, [user("<|im_end|>"), assistant("ok")], max_len=100)
    assert input_ids.tolist().count(END) == 2  # the two real turn ends, not the typed one
    assert (labels != -100).sum() == 3


@given(chats())
def test_masking_and_alignment_on_any_chat(messages):
    input_ids, labels = encode_example(TOK, messages, max_len=10_000)
    rendered = render_chatml(messages)
    # input_ids are the rendered chat minus its final token, the newline after the last <|im_end|>
    assert rendered.endswith("<|im_end|>\n")
    assert TOK.decode(input_ids) == rendered[:-1]
    assert TOK.decode([*input_ids.tolist(), NL]) == rendered
    assert len(input_ids) == len(labels)
    # pre-shift: a counted label at t is the next input id
    counted = np.flatnonzero(labels != -100)
    inner = counted[counted < len(input_ids) - 1]
    assert (labels[inner] == input_ids[inner + 1]).all()
    # exactly the assistant contents and their <|im_end|> are counted, in order
    wanted = [i for m in messages if m["role"] == "assistant"
              for i in [*TOK.encode(m["content"], allow_special=False), END]]
    assert labels[counted].tolist() == wanted


def test_too_long_example_names_index_and_lengths():
    messages = [user("Hi"), assistant("Yo")]  # 24 input ids
    with pytest.raises(DataError, match=r"example 7 is 24 tokens long but max_len is 10"):
        encode_example(TOK, messages, max_len=10, index=7)
    assert len(encode_example(TOK, messages, max_len=24)[0]) == 24


def test_truncate_keeps_the_first_max_len_positions():
    messages = [user("Hi"), assistant("Yo, how are you?")]
    full_ids, full_labels = encode_example(TOK, messages, max_len=1000)
    ids, labels = encode_example(TOK, messages, max_len=23, truncate=True)
    assert ids.tolist() == full_ids[:23].tolist()
    assert labels.tolist() == full_labels[:23].tolist()


def test_truncating_away_every_answer_token_is_an_error():
    with pytest.raises(DataError, match="no assistant token"):
        encode_example(TOK, [user("a long question"), assistant("A")], max_len=8, truncate=True, index=3)


# ---- datasets -----------------------------------------------------------------------------------


def test_instruction_dataset_from_records():
    records = [{"instruction": "Q1", "output": "A1"}, {"messages": [user("Q2"), assistant("A2")]}]
    ds = InstructionDataset(records, TOK, max_len=64, system_prompt="S")
    assert len(ds) == 2
    item = ds[1]
    assert set(item) == {"input_ids", "labels"}
    assert TOK.decode(item["input_ids"]).startswith("<|im_start|>system\nS<|im_end|>")


def test_instruction_dataset_errors():
    with pytest.raises(DataError, match="empty"):
        InstructionDataset([], TOK, 64)
    with pytest.raises(DataError, match="record 1: missing field 'output'"):
        InstructionDataset([{"instruction": "Q", "output": "A"}, {"instruction": "Q"}], TOK, 64)
    too_long = {"instruction": "Q" * 80, "output": "A"}
    with pytest.raises(DataError, match="example 1 is"):
        InstructionDataset([{"instruction": "Q", "output": "A"}, too_long], TOK, 64)


def test_instruction_dataset_from_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "Q", "input": "", "output": "A"}) + "\n")
    assert len(InstructionDataset(path, TOK, 64)) == 1
    assert len(InstructionDataset(str(path), TOK, 64)) == 1


def test_text_dataset_blocks_overlap_by_one_token():
    text = "abcdefghij"  # 10 ids -> (10 - 1) // 3 = 3 blocks
    ds = TextDataset(text, TOK, block_size=3)
    assert len(ds) == 3
    assert TOK.decode(ds[0]["input_ids"]) == "abc" and TOK.decode(ds[0]["labels"]) == "bcd"
    assert TOK.decode(ds[1]["input_ids"]) == "def" and TOK.decode(ds[1]["labels"]) == "efg"
    targets = np.concatenate([ds[i]["labels"] for i in range(len(ds))])
    assert TOK.decode(targets) == text[1:]  # every token but the first is a target exactly once
    with pytest.raises(IndexError):
        ds[3]


def test_text_dataset_too_short():
    with pytest.raises(DataError, match="block_size \\+ 1 = 9"):
        TextDataset("short", TOK, block_size=8)


# ---- JSONL errors -----------------------------------------------------------------------------------


def write_lines(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"instruction": "Q", "output": "A"})


@pytest.mark.parametrize("bad, message", [
    ('{"instruction": "Q", "output": ', "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"instruction": "Q"}', "missing field 'output'"),
    ('{"output": "A"}', "missing field 'instruction'"),
    ('{"instruction": 3, "output": "A"}', "field 'instruction' must be a string, got int"),
    ('{"instruction": "Q", "input": null, "output": "A"}', "field 'input' must be a string"),
    ('{"instruction": "  ", "output": "A"}', "'instruction' is empty"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "Q"}]}', "last message must be the assistant"),
    ('{"messages": [{"role": "bot", "content": "Q"}, {"role": "assistant", "content": "A"}]}',
     "role 'bot' is not one of"),
    ('{"messages": [{"role": "user", "content": "Q"}, {"role": "system", "content": "S"}, '
     '{"role": "assistant", "content": "A"}]}', "messages\\[1\\]: a system message may only come first"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "A"}]}',
     "messages\\[0\\]: missing field 'content'"),
    ('{"messages": [{"role": "user", "content": "Q"}], "instruction": "Q"}', "has both"),
])
def test_malformed_line_reports_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path, [GOOD, "", bad, GOOD])  # the bad record is on line 3
    with pytest.raises(DataError, match=message) as info:
        load_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="no records"):
        load_jsonl(path)


def test_load_jsonl_skips_blank_lines_and_keeps_order(tmp_path):
    chat = json.dumps({"messages": [user("Q"), assistant("A")]})
    records = load_jsonl(write_lines(tmp_path, [GOOD, "", chat]))
    assert [("messages" in r) for r in records] == [False, True]


def test_load_qa(tmp_path):
    good = {"question": "Capital of France?", "answer": "Paris", "choices": ["Rome", "Paris"],
            "cloze": "The capital of France is"}
    path = write_lines(tmp_path, [json.dumps(good), json.dumps({"question": "2+2?", "answer": "4"})])
    assert len(load_qa(path)) == 2
    bad = write_lines(tmp_path, [json.dumps({**good, "choices": ["Rome", "Oslo"]})])
    with pytest.raises(DataError, match=":1: the answer 'Paris' is not among the choices"):
        load_qa(bad)


# ---- files and records that used to crash or hang -------------------------------------------


def test_a_folder_a_non_utf8_line_and_deep_nesting_are_named_with_file_and_line(tmp_path):
    with pytest.raises(DataError, match="is a folder; point at a .jsonl file"):
        load_jsonl(tmp_path)
    good = json.dumps({"instruction": "Q", "output": "A"}).encode()
    (tmp_path / "latin1.jsonl").write_bytes(good + b"\n" + '{"instruction": "café"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8 \(byte b'\\xe9' at column 21\)"):
        load_jsonl(tmp_path / "latin1.jsonl")
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match="deep.jsonl:1: JSON nested deeper than the parser can follow"):
        load_jsonl(tmp_path / "deep.jsonl")


class SpyTokenizer(ByteTokenizer):
    """The byte tokenizer, remembering the longest text it was asked to encode."""

    longest = 0

    def encode(self, text, allow_special=True):
        SpyTokenizer.longest = max(SpyTokenizer.longest, len(text))
        return super().encode(text, allow_special)


def test_a_record_too_long_for_max_len_is_refused_or_cut_before_tokenizing():
    tok, huge = SpyTokenizer(), {"instruction": "Q", "output": "x" * 1_000_000}
    SpyTokenizer.longest = 0
    with pytest.raises(DataError, match="example 0 is too long: message 1 has 1,000,000 characters"):
        InstructionDataset([huge], tok, max_len=64)
    assert SpyTokenizer.longest < 100  # refused on its length: the million characters were never encoded
    dataset = InstructionDataset([huge], tok, max_len=64, truncate=True)
    assert SpyTokenizer.longest == 2 * 65  # cut to twice what 64 byte-tokens can spell
    full = encode_example(ByteTokenizer(), to_messages({"instruction": "Q", "output": "x" * 1000}), 64, truncate=True)
    np.testing.assert_array_equal(dataset[0]["input_ids"], full[0])  # the same ids as cutting after encoding
    np.testing.assert_array_equal(dataset[0]["labels"], full[1])
