"""The real ``openai`` Python client talks to ``minift serve`` (issue 17): chat and completions,
streamed and not, for the base and for an adapter.

Reference: for chat, the reply ``minift generate --chat`` prints for the same question with the
same model folder (greedy); for completions, ``minift.models.generate.generate`` on the model
``load_pretrained`` gives for that folder, cut at eos. The streamed chunks must join to exactly
the non-streamed text. A tiny random model with the byte tokenizer, so it runs in seconds.
"""

import json

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="interop extra not installed (pip install -e '.[interop]')")

from minift.cli import main  # noqa: E402
from minift.data import ByteTokenizer  # noqa: E402
from minift.io import save_model  # noqa: E402
from minift.models import LlamaConfig, LlamaForCausalLM  # noqa: E402
from minift.models.generate import generate  # noqa: E402
from minift.peft import LoraConfig, get_peft_model  # noqa: E402
from minift.serve.engine import build_engine  # noqa: E402
from minift.serve.server import CompletionServer  # noqa: E402
from minift.training.pretrained import load_pretrained  # noqa: E402

pytestmark = pytest.mark.interop
TOK = ByteTokenizer()
QUESTION = "What is a deductible?"
PROMPT = "A claim is"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A saved base model folder, and an adapter folder that names it as its base."""
    root = tmp_path_factory.mktemp("openai")
    config = LlamaConfig(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                         max_seq_len=128, init_std=0.2)
    save_model(LlamaForCausalLM(config, seed=0), root / "model")
    base, _ = load_pretrained(root / "model")
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    rng = np.random.default_rng(3)
    for name, p in peft.named_parameters():
        if ".lora_B." in name:
            p.data = rng.normal(0.0, 0.4, p.shape).astype(p.data.dtype)
    adapter = peft.save_pretrained(root / "adapter")
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "base_model_name_or_path": str(root / "model")}))
    return {"base": root / "model", "legal": adapter}


@pytest.fixture(scope="module")
def client(folders):
    model, tok = load_pretrained(folders["base"])
    engine = build_engine(model, {"legal": str(folders["legal"])}, n_slots=2, max_batch=4, eos_id=tok.eos_id)
    with CompletionServer(engine, tok, port=0, timeout_s=60) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)


def minift_generate_chat(folder, capsys) -> str:
    """The reply ``minift generate --chat`` prints (the line ends with a marker if it was cut)."""
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--chat", "--max-new-tokens", str(MAX_TOKENS), QUESTION]) == 0
    printed = capsys.readouterr().out.removesuffix("\n")
    return printed.removesuffix(" [max tokens]")


def minift_complete(folder) -> str:
    model, tok = load_pretrained(folder)
    tokens = generate(model, [tok.encode(PROMPT)], MAX_TOKENS, eos_id=tok.eos_id)[0].tolist()  # the new tokens
    return tok.decode(tokens[: tokens.index(tok.eos_id)] if tok.eos_id in tokens else tokens, skip_special=True)


@pytest.mark.parametrize("model, folder", [("base", "base"), ("legal", "legal"), ("base:legal", "legal")])
def test_chat_streamed_and_not_equals_minift_generate_chat(client, folders, capsys, model, folder):
    messages = [{"role": "user", "content": QUESTION}]
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    text = answer.choices[0].message.content
    assert text == minift_generate_chat(folders[folder], capsys)
    assert answer.choices[0].message.role == "assistant" and answer.model == model
    assert answer.usage.prompt_tokens == len(TOK.encode(TOK.apply_chat_template(messages, add_generation_prompt=True)))
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason


@pytest.mark.parametrize("model, folder", [("base", "base"), ("legal", "legal")])
def test_completions_streamed_and_not_equal_minift_generation(client, folders, model, folder):
    answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert answer.choices[0].text == minift_complete(folders[folder])
    assert answer.usage.prompt_tokens == len(PROMPT)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == answer.choices[0].text
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_models_and_errors_through_the_client(client):
    assert [m.id for m in client.models.list()] == ["base", "base:legal"]
    assert client.models.retrieve("base:legal").id == "base:legal"
    with pytest.raises(openai.NotFoundError, match="model 'nope' does not exist"):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="'n' is not supported"):
        client.completions.create(model="base", prompt=PROMPT, max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="are not streamed"):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                       stream=True)


def test_logprobs_through_the_client(client):
    chat = client.chat.completions.create(model="base:legal", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob == c.top_logprobs[0].logprob for c in content)  # greedy
    text = client.completions.create(model="base", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=1)
    logprobs = text.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == text.usage.completion_tokens
    assert all(lp == max(top.values()) for lp, top in zip(logprobs.token_logprobs, logprobs.top_logprobs))
