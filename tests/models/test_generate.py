"""Streaming generation: the same tokens as ``generate``, shown as they come, never half a character."""

import numpy as np
import pytest

from minift.data import ByteTokenizer
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.models.generate import TextStream, generate, stream

TOK = ByteTokenizer()


def tiny():
    return LlamaForCausalLM(LlamaConfig(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                        ffn_dim=48, max_seq_len=64), seed=3)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_k": 20, "seed": 5},
                                      {"temperature": 1.2, "top_p": 0.8, "seed": 1}])
def test_streamed_tokens_join_to_the_generated_ones(sampling):
    model = tiny()
    prompt = [TOK.encode("Claims are filed")]
    whole = generate(model, prompt, 12, **sampling)
    streamed = list(stream(model, prompt, 12, **sampling))
    assert all(t.shape == (1,) for t in streamed)
    np.testing.assert_array_equal(np.stack(streamed, axis=1), whole)
    shown = TextStream(TOK)
    assert "".join(shown.push(t[0]) for t in streamed) + shown.finish() == TOK.decode(whole[0], skip_special=True)


def test_a_stream_stops_at_eos_and_closing_it_early_restores_the_mode():
    model = tiny()
    prompt = [TOK.encode("Hours?")]
    first = int(generate(model, prompt, 1)[0, 0])
    assert [int(t[0]) for t in stream(model, prompt, 10, eos_id=first)] == [first]  # the eos is the last token
    model.train()
    tokens = stream(model, prompt, 10)
    next(tokens)
    assert not model.training  # generating runs in eval mode ...
    tokens.close()
    assert model.training  # ... and a reply cut short (Ctrl-C in a chat) gives the mode back


def test_text_stream_holds_back_a_character_until_its_last_byte_arrives():
    text = "prix: 5 € — ok 🙂"
    pieces = TextStream(TOK)
    shown = [pieces.push(byte) for byte in TOK.encode(text)]
    assert "".join(shown) == text
    assert "\ufffd" not in "".join(shown)
    euro = len("prix: 5 ")  # "€" is three bytes: nothing new after the first two, all of it after the third
    assert shown[euro:euro + 3] == ["", "", "€"]
    assert pieces.finish() == ""


def test_text_stream_skips_special_tokens_and_flushes_an_unfinished_character():
    pieces = TextStream(TOK)
    shown = [pieces.push(t) for t in [*TOK.encode("ok"), 0xE2, 0x82, TOK.eos_id]]
    assert shown == ["o", "k", "", "", ""]
    assert pieces.finish() == "\ufffd"  # the model stopped mid-character: say so once, at the end
