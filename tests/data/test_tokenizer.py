"""ByteTokenizer: bytes + four special tokens, exact round trips, and the ChatML template."""

import numpy as np
import pytest
from hypothesis import given
from strategies import text_with_specials, unicode_text

from minift.data import ByteTokenizer, Tokenizer, render_chatml

TOK = ByteTokenizer()
START, END = 257, 258


def test_vocabulary_layout():
    expected = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258, "<|pad|>": 259}
    assert TOK.special_tokens == expected
    assert TOK.vocab_size == 260
    assert TOK.eos_id == TOK.special_tokens["<|im_end|>"]
    assert TOK.pad_id == TOK.special_tokens["<|pad|>"]
    assert isinstance(TOK, Tokenizer)


def test_ascii_is_one_id_per_byte():
    assert TOK.encode("Hi!") == [72, 105, 33]


@pytest.mark.parametrize("text", ["", "héllo wörld", "日本語のテキスト", "🙂 and 👩\u200d👩\u200d👧",
                                  "a\t\tb    c\n\n\n d\r\n", "\x00\x7f"])
def test_round_trip_examples(text):
    ids = TOK.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert TOK.decode(ids) == text


def test_special_strings_become_single_ids():
    assert TOK.encode("<|im_start|>x<|im_end|>") == [START, ord("x"), END]
    assert TOK.encode("a<|endoftext|><|pad|>") == [ord("a"), 256, 259]


def test_allow_special_false_keeps_special_strings_as_bytes():
    text = "<|im_start|>x<|im_end|>"
    ids = TOK.encode(text, allow_special=False)
    assert ids == list(text.encode())
    assert max(ids) < 256
    assert TOK.decode(ids) == text


def test_near_misses_are_not_special():
    assert TOK.encode("<|im_start|") == list(b"<|im_start|")
    assert TOK.encode("<|IM_END|>") == list(b"<|IM_END|>")


def test_decode_skip_special():
    ids = [START, *b"user\nhi", END, 259, 259]
    assert TOK.decode(ids) == "<|im_start|>user\nhi<|im_end|><|pad|><|pad|>"
    assert TOK.decode(ids, skip_special=True) == "user\nhi"


def test_decode_accepts_numpy_arrays():
    assert TOK.decode(np.array([104, 105, END], dtype=np.int64)) == "hi<|im_end|>"


def test_invalid_utf8_decodes_to_replacement_characters():
    assert TOK.decode([0xFF, ord("h")]) == "\ufffdh"
    half_emoji = list("🙂".encode())[:3]
    assert TOK.decode(half_emoji) == "\ufffd"
    # a special token in the middle of a multi-byte character ends the broken run
    assert TOK.decode([*"é".encode()[:1], END, *"é".encode()]) == "\ufffd<|im_end|>é"


@pytest.mark.parametrize("bad", [260, -1, 10_000])
def test_decode_rejects_ids_outside_the_vocabulary(bad):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TOK.decode([65, bad])


@given(unicode_text)
def test_round_trip_any_text_without_specials(text):
    ids = TOK.encode(text, allow_special=False)
    assert ids == list(text.encode("utf-8"))
    assert TOK.decode(ids) == text


@given(text_with_specials())
def test_round_trip_any_text_with_specials(text):
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert TOK.decode(TOK.encode(text, allow_special=False)) == text
    n_special = sum(text.count(s) for s in TOK.special_tokens)
    assert sum(i >= 256 for i in ids) == n_special


def test_chat_template_exact_string():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n"
                "<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello!<|im_end|>\n")
    assert render_chatml(messages) == expected
    assert TOK.apply_chat_template(messages) == expected


def test_chat_template_generation_prompt_opens_an_assistant_turn():
    text = TOK.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert TOK.encode(text)[-11:] == [START, *b"assistant\n"]
