"""minift's Llama against transformers' on the same weights: logits and generation."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop extra not installed (pip install -e '.[interop]')")
pytest.importorskip("transformers", reason="interop extra not installed")

from hf import hf_twin, minift_model  # noqa: E402

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"attention_bias": True, "mlp_bias": True},
                                       {"n_kv_heads": 4}, {"n_kv_heads": 1, "rope_theta": 100000.0}])
def test_logits_equal_transformers(overrides):
    model = minift_model(**overrides)
    hf = hf_twin(model)
    ids = np.random.default_rng(0).integers(0, 64, (3, 17))
    ours = model(ids).data
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5)


def test_greedy_generation_equals_transformers():
    model = minift_model()
    hf = hf_twin(model)
    ids = np.random.default_rng(1).integers(0, 64, (1, 6))
    ours = model.generate(ids, 20)
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(ids), max_new_tokens=20, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(ours[0], theirs[0, 6:].numpy())


def test_loss_and_gradients_equal_torch_autograd():
    """Float64 in both, but transformers' RMSNorm and RoPE tables compute in float32 whatever the
    model dtype, so agreement is at float32 level (~1e-7), not float64's 1e-15."""
    import minift.autograd.functional as F

    model = minift_model().to(np.float64)
    hf = hf_twin(model).double()
    ids = np.random.default_rng(2).integers(0, 64, (2, 9))
    targets = np.random.default_rng(3).integers(0, 64, (2, 9))
    loss = F.cross_entropy(model(ids), targets)
    loss.backward()
    logits = hf(torch.from_numpy(ids)).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), torch.from_numpy(targets).reshape(-1))
    hf_loss.backward()
    assert loss.item() == pytest.approx(hf_loss.item(), rel=1e-7)
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        theirs = hf_params[name].grad.numpy()
        np.testing.assert_allclose(p.grad, theirs, rtol=1e-4, atol=1e-6 * np.abs(theirs).max(), err_msg=name)
