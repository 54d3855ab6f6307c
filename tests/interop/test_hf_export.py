"""SmolLM2 fine-tuned in minift leaves as a Hugging Face folder: transformers loads it (logits,
tokenizer ids, chat template), and PEFT loads a minift adapter whose base is such a folder."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop extra not installed (pip install -e '.[interop]')")
transformers = pytest.importorskip("transformers", reason="interop extra not installed")
peft = pytest.importorskip("peft", reason="interop extra not installed")

from minift.io.model_dir import save_hf_folder  # noqa: E402
from minift.models.llama import BLOCK_PROJECTIONS  # noqa: E402
from minift.peft import LoraConfig, get_peft_model  # noqa: E402
from minift.studies.qlora_merge import random_adapter  # noqa: E402

pytestmark = pytest.mark.interop

PROMPTS = ["The capital of France is",
           "def fibonacci(n):\n    if n < 2:\n        return n\n",
           "<|im_start|>user\nWrite a haiku about 42 cats 🐈.<|im_end|>\n<|im_start|>assistant\n"]
TEXTS = PROMPTS + ["x  12   345\n\n  6\t\t7", "café naïve ¹²³ 日本語 👨‍👩‍👧", "<|endoftext|>a\x04b<repo_name>"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3*3?"}],
]


def minift_logits(model, tok, prompts=PROMPTS):
    return [model(np.array([tok.encode(p)])).data for p in prompts]


def torch_logits(model, tok):
    with torch.no_grad():
        return [model(torch.tensor([tok.encode(p)])).logits.numpy() for p in PROMPTS]


def max_diff(a, b):
    return max(np.abs(x - y).max() for x, y in zip(a, b))


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    """SmolLM2 as an HF folder (the base), a random LoRA on it saved as a PEFT adapter naming that
    folder, and the merged model exported: their folders and minift's logits of each."""
    model, tok = smollm2
    root = tmp_path_factory.mktemp("export")
    base = save_hf_folder(model, tok, root / "base")
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=list(BLOCK_PROJECTIONS)))
    random_adapter(lora, relative_size=0.02)
    lora.peft_config["default"].base_model_name_or_path = str(base)
    adapter = lora.save_pretrained(root / "adapter")
    adapted = minift_logits(lora, tok)
    merged = save_hf_folder(lora.merge_and_unload(), tok, root / "merged")
    return {"base": base, "adapter": adapter, "merged": merged, "adapted": adapted,
            "base_logits": minift_logits(model, tok, PROMPTS[:1])}


def test_transformers_runs_the_exported_merged_model_as_minift_does(exported):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported["merged"], dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(exported["merged"])
    diff = max_diff(torch_logits(theirs, tok), exported["adapted"])
    print(f"max |logit diff| transformers vs minift, merged LoRA: {diff:.2e}")
    assert diff < 1e-3
    assert max_diff(exported["adapted"], exported["base_logits"]) > 1e-2  # the LoRA did change the model


def test_transformers_tokenizer_of_the_folder_gives_minifts_ids_and_chat(exported, smollm2):
    _, ours = smollm2
    theirs = transformers.AutoTokenizer.from_pretrained(exported["merged"])
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text), text
    for messages in CONVERSATIONS:
        for add in (False, True):
            rendered = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert rendered == ours.apply_chat_template(messages, add_generation_prompt=add)
    assert theirs.eos_token_id == ours.eos_id


def test_peft_loads_a_minift_adapter_from_its_folder_alone(exported):
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(exported["adapter"], dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(exported["base"])
    diff = max_diff(torch_logits(theirs, tok), exported["adapted"])
    print(f"max |logit diff| PEFT vs minift, adapter on the exported base: {diff:.2e}")
    assert diff < 1e-3
