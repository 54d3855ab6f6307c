"""QA accuracy for the forgetting measurement."""

import pytest

from minift.data import ByteTokenizer
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.training.evaluation import answers_match, qa_accuracy, qa_prompt

TOK = ByteTokenizer()


def test_answers_match_is_a_case_insensitive_prefix_test():
    assert answers_match("  Paris, of course", "paris")
    assert not answers_match("It is Paris", "Paris")
    assert not answers_match("", "Paris")


def test_qa_accuracy_counts_exactly_the_records_the_model_completes():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=TOK.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                         ffn_dim=24, max_seq_len=64))
    cloze = "The capital of France is"
    greedy = TOK.decode(model.generate([TOK.encode(cloze)], 8, eos_id=TOK.eos_id)[0].tolist(), skip_special=True)
    right = {"question": "?", "answer": greedy.strip()[:3] or greedy, "cloze": cloze}
    wrong = {"question": "?", "answer": "zzzz-not-it", "cloze": cloze}
    assert qa_accuracy(model, TOK, [right, wrong, right]) == pytest.approx(2 / 3)


def test_chat_mode_uses_the_chat_template_and_bad_modes_are_rejected():
    prompt = qa_prompt(TOK, {"question": "Capital of France?"}, "chat")
    assert prompt.startswith("<|im_start|>user\nCapital of France?") and prompt.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="mode"):
        qa_prompt(TOK, {"question": "?"}, "exam")
