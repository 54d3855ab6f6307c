"""Byte-level BPE on a hand-made vocabulary: byte spelling, pre-tokenization, merge order,
special tokens, decoding, and SmolLM2's chat template rendered without Jinja."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minift.data import Tokenizer
from minift.data.bpe import (
    BYTE_TO_CHAR,
    SYSTEM_DEFAULT_CHATML,
    BPETokenizer,
    bytes_to_unicode,
    default_system_prompt,
    merge_pieces,
    pretokenize,
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l"), ("e", "ll"), ("ell", "o"), ("h", "ello"), ("1", "2")]


def make_tokenizer(template=None, drop=()):
    """Specials first (ids 0-2, as in SmolLM2), then the 256 bytes, then one token per merge."""
    tokens = SPECIAL + [c for b, c in BYTE_TO_CHAR.items() if b not in drop] + [a + b for a, b in MERGES]
    return BPETokenizer(tokens, MERGES, SPECIAL, eos_id=2, chat_template=template)


def spell(ids, tok):
    return [tok.tokens[i] for i in ids]


def test_the_byte_alphabet_is_256_distinct_printable_characters():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


@pytest.mark.parametrize(("text", "words"), [
    ("Hello world!", ["Hello", " world", "!"]),
    ("I'm here", ["I", "'m", " here"]),
    ("a   b", ["a", "  ", " b"]),  # a space run gives its last space to the next word
    ("year 2024.", ["year", " ", "2", "0", "2", "4", "."]),  # digits one by one (SmolLM2)
    ("x  12", ["x", "  ", "1", "2"]),
    ("tab\tend\n\n", ["tab", "\t", "end", "\n\n"]),
])
def test_smollm_pretokenizer_splits_words_and_isolates_digits(text, words):
    assert pretokenize(text, "smollm") == words


def test_gpt2_pretokenizer_keeps_digit_runs_with_their_space():
    assert pretokenize("year 2024.", "gpt2") == ["year", " 2024", "."]
    assert pretokenize("x  12", "gpt2") == ["x", " ", " 12"]


def test_merges_apply_best_rank_first():
    tok = make_tokenizer()
    assert spell(tok.encode(" the"), tok) == ["Ġthe"]  # Ġ t (rank 0), h e (1), then Ġt he (2)
    assert spell(tok.encode("yello"), tok) == ["y", "ello"]  # l l, then e ll, then ell o
    assert spell(tok.encode("hello"), tok) == ["he", "ll", "o"]  # h e (rank 1) takes the e first
    assert spell(tok.encode("12"), tok) == ["1", "2"]  # digits never merge: they are separate words


def test_special_tokens_are_matched_only_when_allowed():
    tok = make_tokenizer()
    ids = tok.encode("<|im_start|>hello<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and spell(ids[1:-1], tok) == ["he", "ll", "o"]
    plain = tok.encode("<|im_end|>", allow_special=False)
    assert 2 not in plain and tok.decode(plain) == "<|im_end|>"


def test_decode_inverts_encode_for_any_text_and_can_skip_specials():
    tok = make_tokenizer()
    text = "Héllo wörld 🤗 — 日本語\n\t  12 <|im_end|>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text), skip_special=True) == text.replace("<|im_end|>", "")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_a_byte_without_a_token_is_dropped_like_tokenizers_does():
    tok = make_tokenizer(drop={0x04})
    assert spell(tok.encode("a\x04b"), tok) == ["a", "b"]


def test_half_a_character_decodes_to_the_replacement_character():
    tok = make_tokenizer()
    first_byte = tok.encode("é")[0]
    assert tok.decode([first_byte]) == "\ufffd"


SMOLLM2_TEMPLATE = SYSTEM_DEFAULT_CHATML.replace("@SYSTEM@", "You are a helpful AI assistant named SmolLM, "
                                                             "trained by Hugging Face")


def test_smollm2_template_adds_its_system_prompt_only_when_none_is_given():
    tok = make_tokenizer(SMOLLM2_TEMPLATE)
    user = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(user, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    own = [{"role": "system", "content": "Be brief."}, *user]
    assert tok.apply_chat_template(own) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert tok.apply_chat_template([], add_generation_prompt=True) == "<|im_start|>assistant\n"


def test_no_template_is_plain_chatml_and_an_unknown_template_is_refused_at_chat_time():
    assert default_system_prompt(None) is None
    assert make_tokenizer().apply_chat_template([{"role": "user", "content": "Hi"}]) == \
        "<|im_start|>user\nHi<|im_end|>\n"
    llama3 = make_tokenizer("{{ bos_token }}{% for m in messages %}<|start_header_id|>{% endfor %}")
    assert llama3.encode("hello") == make_tokenizer().encode("hello")  # plain use still works
    with pytest.raises(ValueError, match="unsupported chat template"):
        llama3.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_bpe_tokenizer_satisfies_the_tokenizer_protocol():
    tok = make_tokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (3 + 256 + len(MERGES), 2, 2)
    assert tok.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}


# ---- the merge loop: same output as the textbook loop, linear work ---------------------------


def textbook_merges(parts, ranks):
    """The quadratic reference: rescan every adjacent pair after each merge, join the best
    (the leftmost among equals); the loop minift ran before ``merge_pieces``."""
    parts = list(parts)
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:])))
        if rank == len(ranks):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@st.composite
def merge_tables(draw):
    """A merge list over the letters a, b, c: each merge joins two tokens that exist already
    (no pair twice, as in a real tokenizer)."""
    tokens, merges = ["a", "b", "c"], []
    for _ in range(draw(st.integers(0, 25))):
        pair = (draw(st.sampled_from(tokens)), draw(st.sampled_from(tokens)))
        if pair not in merges:
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
    return merges


@settings(max_examples=300, deadline=None, derandomize=True)
@given(merge_tables(), st.text(alphabet="abc", max_size=60))
def test_merge_pieces_gives_the_textbook_loops_pieces(merges, word):
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    assert merge_pieces(list(word), ranks) == textbook_merges(list(word), ranks)


class CountingRanks(dict):
    """A rank table that counts how often it is consulted."""

    lookups = 0

    def get(self, key, default=None):
        CountingRanks.lookups += 1
        return super().get(key, default)

    def __getitem__(self, key):
        CountingRanks.lookups += 1
        return super().__getitem__(key)

    def __contains__(self, key):
        CountingRanks.lookups += 1
        return super().__contains__(key)


def test_a_long_word_costs_work_linear_in_its_length():
    tok = make_tokenizer()
    tok.ranks = CountingRanks(tok.ranks)
    CountingRanks.lookups = 0
    tok.encode("hello" * 2000)  # one 10,000-letter word: the textbook loop consults ranks ~10^7 times
    assert 0 < CountingRanks.lookups < 10 * 10_000


def test_max_token_bytes_bounds_how_many_bytes_one_token_spells():
    tok = make_tokenizer()
    assert tok.max_token_bytes == len("hello")  # the longest merge; the specials do not count
    text = "hello the 12 Ġhello"
    assert len(tok.encode(text, allow_special=False)) >= len(text.encode()) / tok.max_token_bytes
