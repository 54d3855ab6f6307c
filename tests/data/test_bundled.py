"""The bundled data: present, parseable, the documented sizes, reproducible, and self-consistent."""

import json
import re
import sys
from pathlib import Path

import pytest

from minift.data import (
    ByteTokenizer,
    InstructionDataset,
    TextDataset,
    bundled_path,
    load_jsonl,
    load_qa,
    to_messages,
)
from minift.studies.demo import SYSTEM_PROMPT, tiny_config

sys.path.insert(0, str(Path(__file__).parents[2] / "tools" / "bundled_data"))  # the generators are tools
import gen_preferences as gp  # noqa: E402
import make_bundled as mb  # noqa: E402
from gen_insurer import all_facts  # noqa: E402

NAMES = ["general_corpus.txt", "general_heldout.txt", "insurer_train.jsonl", "insurer_eval.jsonl",
         "general_qa.jsonl", "insurer_preferences_train.jsonl", "insurer_preferences_eval.jsonl", "README.md"]
PAIR_SPLITS = ["insurer_preferences_train.jsonl", "insurer_preferences_eval.jsonl"]


def read(name):
    return bundled_path(name).read_text(encoding="utf-8")


def sentences(text):
    """Split after . ! ? (optionally followed by a closing quote) before a new sentence's first char."""
    return {s.strip() for s in re.split(r'(?:(?<=[.!?])|(?<=[.!?]"))\s+(?=["A-Z0-9])', text) if s.strip()}


def exchanges(record):
    """(user text, assistant reply) of each exchange of a record (a two-question chat has two)."""
    messages = [m for m in to_messages(record) if m["role"] != "system"]
    return [(q["content"], a["content"]) for q, a in zip(messages[::2], messages[1::2], strict=True)]


@pytest.mark.parametrize("name", NAMES)
def test_file_exists_and_is_ascii(name):
    assert bundled_path(name).is_file()
    assert read(name).isascii()


def test_unknown_name_lists_the_bundled_files():
    with pytest.raises(FileNotFoundError, match="insurer_train.jsonl"):
        bundled_path("nope.txt")


def test_generator_reproduces_the_committed_files():
    assert mb.build_all() == {name: read(name) for name in NAMES}


def test_readme_table_matches_the_files():
    readme = read("README.md")
    for name in NAMES[:-1]:
        row = re.search(rf"\| `{re.escape(name)}` \| ([\d,]+) bytes \| ([\d,]+) ", readme)
        assert row, f"{name} missing from README.md"
        assert int(row[1].replace(",", "")) == bundled_path(name).stat().st_size
        text = read(name)
        count = text.count("\n\n") + 1 if name.endswith(".txt") else len(text.splitlines())
        assert int(row[2].replace(",", "")) == count
    assert "MIT" in readme


def test_documented_sizes():
    assert 150_000 <= bundled_path("general_corpus.txt").stat().st_size <= 300_000
    assert 15_000 <= bundled_path("general_heldout.txt").stat().st_size <= 25_000
    assert 300 <= len(load_jsonl(bundled_path("insurer_train.jsonl"))) <= 400
    assert 40 <= len(load_jsonl(bundled_path("insurer_eval.jsonl"))) <= 60
    assert 60 <= len(load_qa(bundled_path("general_qa.jsonl"))) <= 100


def test_heldout_shares_no_sentence_with_the_corpus():
    corpus, heldout = sentences(read("general_corpus.txt")), sentences(read("general_heldout.txt"))
    assert len(heldout) > 100
    assert not corpus & heldout


def test_text_files_make_training_blocks():
    tok = ByteTokenizer()
    assert len(TextDataset(read("general_corpus.txt"), tok, 128)) > 1000
    assert len(TextDataset(read("general_heldout.txt"), tok, 128)) > 100


def test_every_qa_answer_is_stated_in_the_corpus():
    corpus = read("general_corpus.txt")
    for record in load_qa(bundled_path("general_qa.jsonl")):
        assert corpus.count(f"{record['cloze']} {record['answer']}") >= mb.FACT_SWEEPS, record
        assert len(record["choices"]) == len(set(record["choices"])) == 4
        assert len(record["answer"].split()) <= 2


def test_insurer_train_mixes_shapes_including_multi_turn_chats():
    train = load_jsonl(bundled_path("insurer_train.jsonl"))
    chats = [r for r in train if "messages" in r]
    assert any(r.get("input") for r in train) and any(r.get("input") == "" for r in train)
    assert 10 <= len(chats) < len(train) / 2
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in chats)


def test_insurer_facts_are_consistent_and_eval_is_held_out():
    train = load_jsonl(bundled_path("insurer_train.jsonl"))
    evals = load_jsonl(bundled_path("insurer_eval.jsonl"))
    answer_of = {}
    for record in train:
        for question, answer in exchanges(record):
            answer_of.setdefault(question, set()).add(answer)
    assert all(len(answers) == 1 for answers in answer_of.values())
    trained_answers = set().union(*answer_of.values())
    for record in evals:
        [(question, answer)] = exchanges(record)
        assert answer in trained_answers  # a trained fact...
        assert not any(question in q for q in answer_of)  # ...asked in new words
        assert len(answer) <= 200


def test_insurer_examples_fit_the_demo_model_with_its_system_prompt():
    tok = ByteTokenizer()
    max_len = tiny_config(tok.vocab_size).max_seq_len
    for name in ("insurer_train.jsonl", "insurer_eval.jsonl"):
        dataset = InstructionDataset(bundled_path(name), tok, max_len, system_prompt=SYSTEM_PROMPT)
        assert len(dataset) == len(load_jsonl(bundled_path(name)))


# ---- preference pairs (DPO) ----------------------------------------------------------------


def pairs(name):
    return [json.loads(line) for line in read(name).splitlines()]


def question_of(pair):
    return gp.text_of(pair["prompt"])


def prompt_and_rejected(pair):
    return question_of(pair), gp.text_of(pair["rejected"])


@pytest.mark.parametrize("name", PAIR_SPLITS)
def test_preference_pairs_have_trls_standard_or_conversational_shape(name):
    records = pairs(name)
    conversational = [r for r in records if isinstance(r["prompt"], list)]
    for record in records:
        assert set(record) == {"prompt", "chosen", "rejected"}, record
        if isinstance(record["prompt"], str):
            assert isinstance(record["chosen"], str) and isinstance(record["rejected"], str), record
    for record in conversational:
        roles = [m["role"] for m in record["prompt"]]
        assert roles in (["user"], ["system", "user"]), record
        for key in ("chosen", "rejected"):
            [message] = record[key]
            assert set(message) == {"role", "content"} and message["role"] == "assistant", record
            assert isinstance(message["content"], str)
    assert 0.05 * len(records) <= len(conversational) <= 0.3 * len(records)


@pytest.mark.parametrize("name", PAIR_SPLITS)
def test_chosen_is_the_facts_answer_and_rejected_is_no_facts_answer(name):
    answer_of = {q: answer for answer, questions in all_facts().values() for q in questions}
    for record in pairs(name):
        chosen, rejected = gp.text_of(record["chosen"]), gp.text_of(record["rejected"])
        assert chosen == answer_of[question_of(record)], record
        assert rejected != chosen
        assert rejected not in answer_of.values(), record  # a wrong answer, not another fact's right one


def test_preference_splits_cover_every_wording_once_and_hold_out_the_eval_questions():
    train, evals = pairs(PAIR_SPLITS[0]), pairs(PAIR_SPLITS[1])
    facts = all_facts().values()
    assert sorted(map(question_of, train)) == sorted(q for _, questions in facts for q in questions[:-1])
    assert [question_of(r) for r in evals] == [questions[-1] for _, questions in facts]
    assert {question_of(r) for r in evals} == {r["instruction"] for r in load_jsonl(bundled_path("insurer_eval.jsonl"))}
    train_prompts = [question_of(r) for r in train]
    assert not any(question in prompt for question in map(question_of, evals) for prompt in train_prompts)
    assert not set(map(prompt_and_rejected, evals)) & set(map(prompt_and_rejected, train))
    assert any(isinstance(r["prompt"], list) and r["prompt"][0]["role"] == "system" for r in train)


@pytest.mark.parametrize("name", PAIR_SPLITS)
def test_rejected_answers_are_about_as_long_as_chosen_ones(name):
    """Within 20 % pair by pair and 10 % on average: DPO must not be able to win by length alone."""
    records = pairs(name)
    for record in records:
        ratio = len(gp.text_of(record["rejected"])) / len(gp.text_of(record["chosen"]))
        assert 0.8 <= ratio <= 1.2, record
    chosen, rejected = gp.mean_lengths(records)
    assert 0.9 <= rejected / chosen <= 1.1
    assert f"{name.split('_')[-1].removesuffix('.jsonl')} {chosen:.1f} vs {rejected:.1f}" in read("README.md")


def test_every_fact_has_one_rejected_answer_of_each_kind_and_train_uses_all_kinds_evenly():
    assert gp.REJECTED.keys() == all_facts().keys()
    assert all(len(texts) == len(gp.KINDS) for texts in gp.REJECTED.values())
    texts = [text for texts in gp.REJECTED.values() for text in texts]
    assert len(set(texts)) == len(texts) and all(t.isascii() for t in texts)  # so a text names its kind
    train, evals = pairs(PAIR_SPLITS[0]), pairs(PAIR_SPLITS[1])
    assert min(gp.kind_counts(train).values()) >= len(train) / 4
    assert all(gp.kind_counts(evals).values())
