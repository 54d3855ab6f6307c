"""The real SmolLM2-135M-Instruct GGUF read by minift and by transformers: logits, greedy text,
tokenizer ids and the chat template are the same; an HF folder written by transformers loads."""

import numpy as np
import pytest
import regex

torch = pytest.importorskip("torch", reason="interop extra not installed (pip install -e '.[interop]')")
transformers = pytest.importorskip("transformers", reason="interop extra not installed")
tokenizers = pytest.importorskip("tokenizers", reason="interop extra not installed")

from minift import load_pretrained  # noqa: E402
from minift.io.tokenizer_json import save_tokenizer_json  # noqa: E402

pytestmark = pytest.mark.interop

PROMPTS = ["The capital of France is",
           "def fibonacci(n):\n    if n < 2:\n        return n\n",
           "<|im_start|>user\nWrite a haiku about 42 cats 🐈.<|im_end|>\n<|im_start|>assistant\n",
           "Ein kurzer deutscher Satz, und dann: 日本語のテキスト。"]

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; π ≈ 3.14159, and 1,000,000 > 999.",
    "ids a1b2c3, v3.14, (42), x=1e-5, ¹²³",
    "  leading spaces, trailing spaces   ",
    "x  12   345\n\n  6\t\t7",  # whitespace runs before digits
    "tabs\tand\nnewlines\n\n\nand\r\nwindows line ends",
    "café naïve résumé Ærøskøbing ¹²³ ½ Ⅻ",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🤗🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n\nif (a && b) { return a->c[0]; }",
    "I'm sure you'll see they've gone; WE'LL SEE what's what",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|>text<repo_name>minift<file_sep>",
    "bytes with no token: a\x04b\x1dc",
    "=" * 40 + "\n" + "-" * 7 + "!!!???...",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3*3?\n\nThanks!"}],
]


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                              dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf):
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def published_tokenizer(hf_tokenizer):
    """transformers' tokenizer with the pre-tokenizer SmolLM2's own tokenizer.json declares
    (Digits(individual_digits) then ByteLevel), which llama.cpp's ``smollm`` type also applies.
    transformers' GGUF converter leaves the Digits step out; see ``test_tokenizer_ids_equal_transformers``."""
    backend = tokenizers.Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    pre = tokenizers.pre_tokenizers
    backend.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False)])
    return backend


def test_logits_equal_transformers(smollm2, hf_model):
    model, tok = smollm2
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ours = model(np.array([ids])).data
        with torch.no_grad():
            theirs = hf_model(torch.tensor([ids])).logits.numpy()
        diff = np.abs(ours - theirs).max()
        assert diff < 1e-3, f"max |logit difference| {diff:.2e} on {prompt!r}"


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[2]])
def test_greedy_generation_equals_transformers(smollm2, hf_model, prompt):
    model, tok = smollm2
    ids = tok.encode(prompt)
    ours = model.generate([ids], 30, eos_id=tok.eos_id)[0].tolist()
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)
    assert ours == theirs[0, len(ids):].tolist()
    assert len(ours) >= 20


def test_tokenizer_ids_equal_transformers(smollm2, hf_tokenizer, published_tokenizer):
    _, tok = smollm2
    for text in TEXTS:
        ours = tok.encode(text)
        assert ours == published_tokenizer.encode(text).ids, text
        # transformers' GGUF tokenizer skips the Digits step, so it differs where whitespace meets
        # a digit: "x  12" is [x, Ġ, Ġ, 1, 2] there, [x, ĠĠ, 1, 2] here; " ¹" merges to "ĠÂ" there
        if not regex.search(r"\s\p{N}", text):
            assert ours == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tok.decode(ours) == hf_tokenizer.decode(ours), text


def test_chat_template_equals_transformers(smollm2, hf_tokenizer):
    _, tok = smollm2
    for messages in CONVERSATIONS:
        for add in (False, True):
            theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert tok.apply_chat_template(messages, add_generation_prompt=add) == theirs


def test_saved_tokenizer_json_is_read_by_tokenizers(smollm2, tmp_path):
    _, tok = smollm2
    save_tokenizer_json(tok, tmp_path)
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in TEXTS:
        assert theirs.encode(text).ids == tok.encode(text), text


@pytest.mark.slow
def test_hugging_face_folder_written_by_transformers_loads(hf_model, hf_tokenizer, tmp_path):
    plain = transformers.LlamaForCausalLM(hf_model.config)  # a GGUF-loaded model refuses save_pretrained
    plain.load_state_dict(hf_model.state_dict())
    plain.config.quantization_config = None
    plain.save_pretrained(tmp_path)
    hf_tokenizer.save_pretrained(tmp_path)
    model, tok = load_pretrained(tmp_path)
    ids = tok.encode(PROMPTS[0])
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits.numpy()
    assert np.abs(model(np.array([ids])).data - theirs).max() < 1e-3
    for text in TEXTS:  # this folder's tokenizer.json is transformers' (no Digits step): we follow the file
        assert tok.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False), text
