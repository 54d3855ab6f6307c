"""SmolLM2 exported by minift's GGUF writer: transformers loads the f32 file with minift's logits
and the original file's tokenizer; minift reads its f16 / q8_0 exports back within their error;
llama.cpp (when llama-cpp-python is installed) continues a prompt as minift does."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop extra not installed (pip install -e '.[interop]')")
transformers = pytest.importorskip("transformers", reason="interop extra not installed")

from minift.io.gguf import load_gguf  # noqa: E402
from minift.io.gguf_writer import write_gguf  # noqa: E402

pytestmark = pytest.mark.interop

PROMPTS = ["The capital of France is",
           "<|im_start|>user\nWrite a haiku about 42 cats 🐈.<|im_end|>\n<|im_start|>assistant\n"]
TEXTS = ["Hello, world!", "café naïve 日本語 🤗", "I'm sure you'll see", "def f(x):\n    return x ** 2",
         "<|im_start|>user\nHi there<|im_end|>\n", "The year 2024 had 366 days, x  12"]


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    """SmolLM2 written as an f32 GGUF (540 MB), removed after the module's tests."""
    model, tok = smollm2
    path = write_gguf(model, tok, tmp_path_factory.mktemp("export") / "smollm2-f32.gguf")
    yield path
    path.unlink()


def test_transformers_loads_the_export_with_minifts_logits(smollm2, exported):
    model, tok = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported.parent, gguf_file=exported.name,
                                                           dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        with torch.no_grad():
            theirs = hf(torch.tensor([ids])).logits.numpy()
        diff = np.abs(model(np.array([ids])).data - theirs).max()
        assert diff < 1e-3, f"max |logit difference| {diff:.2e} on {prompt!r}"


def test_transformers_reads_the_same_tokenizer_as_from_the_original_file(smollm2, smollm2_gguf, exported):
    _, tok = smollm2
    ours = transformers.AutoTokenizer.from_pretrained(exported.parent, gguf_file=exported.name)
    original = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for text in TEXTS:  # transformers' GGUF tokenizer skips SmolLM2's Digits step (test_smollm2_transformers)
        assert ours.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False), text
    assert ours.encode(TEXTS[0], add_special_tokens=False) == tok.encode(TEXTS[0])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(messages, add_generation_prompt=True)
    assert (ours.eos_token_id, ours.pad_token_id) == (tok.eos_id, tok.pad_id)


#: dtype -> bound on max |logit difference| against the f32 model (measured: f16 0.03, q8_0 0.63;
#: SmolLM2's logits span about 40).
EXPECTED = {"f16": 0.1, "q8_0": 1.5}


@pytest.mark.parametrize("dtype", list(EXPECTED))
def test_minift_reads_its_lossy_exports_back_within_their_error(smollm2, tmp_path, dtype):
    model, tok = smollm2
    path = write_gguf(model, tok, tmp_path / f"smollm2-{dtype}.gguf", dtype=dtype)
    loaded, _ = load_gguf(path)
    path.unlink()
    ids = np.array([tok.encode(PROMPTS[0])])
    ours, theirs = model(ids).data, loaded(ids).data
    assert np.abs(ours - theirs).max() < EXPECTED[dtype]
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()  # the same next token


def test_llama_cpp_continues_the_export_as_minift_does(smollm2, exported):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (built from source)")
    model, tok = smollm2
    llm = llama_cpp.Llama(model_path=str(exported), n_ctx=256, verbose=False)
    ids = tok.encode(PROMPTS[0])
    ours = model.generate([ids], 20, eos_id=tok.eos_id)[0].tolist()
    theirs = llm.create_completion(PROMPTS[0], max_tokens=20, temperature=0.0)["choices"][0]["text"]
    assert theirs == tok.decode(ours)
