"""LoRA adapters cross between minift and Hugging Face PEFT in both directions (issue 5)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop extra not installed (pip install -e '.[interop]')")
peft = pytest.importorskip("peft", reason="interop extra not installed")

from hf import hf_twin, minift_model  # noqa: E402

from minift.peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

pytestmark = pytest.mark.interop
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
IDS = np.random.default_rng(0).integers(0, 64, (2, 11))


def hf_logits(model):
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits.numpy()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_an_adapter_saved_by_minift_loads_in_peft(tmp_path, use_rslora):
    hf = hf_twin(minift_model())
    ours = get_peft_model(minift_model(), LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS,
                                                     use_rslora=use_rslora))
    rng = np.random.default_rng(1)
    for name, p in ours.named_parameters(trainable_only=True):
        if ".lora_B." in name:
            p.data = rng.normal(0, 0.2, p.shape).astype(np.float32)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    expected = ours(IDS).data
    assert np.abs(expected - hf_logits(hf_twin(minift_model()))).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(hf_logits(theirs), expected, rtol=0, atol=1e-4)


def test_an_adapter_trained_in_peft_loads_in_minift(tmp_path):
    hf = hf_twin(minift_model())
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian")
    theirs = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    theirs.eval()
    expected = hf_logits(theirs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(minift_model(), tmp_path)
    np.testing.assert_allclose(ours(IDS).data, expected, rtol=0, atol=1e-4)
    merged = ours.merge_and_unload()
    np.testing.assert_allclose(merged(IDS).data, expected, rtol=0, atol=1e-4)
