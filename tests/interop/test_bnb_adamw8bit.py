"""minift's ``AdamW8bit`` against bitsandbytes' ``bnb.optim.AdamW8bit`` on the CPU.

Same maps (``create_dynamic_map`` signed for m, unsigned for v), same blocks of 256, same
``min_8bit_size``, same order of operations (decay, moments, step with the float32 moments,
requantize). Two documented differences move codes of tiny values only: bitsandbytes' CPU
quantizer first rounds a scaled value to a grid of 65536 points (minift picks the nearest level
itself), and minift never stores a positive v as the level 0. So: step 1 agrees to float32
rounding, codes agree almost everywhere, and the weights stay within a small fraction of a step.
"""

import numpy as np
import pytest

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'minift[interop]')")
torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install 'minift[interop]')")

from minift.nn.module import Parameter  # noqa: E402 - after the skips
from minift.optim import AdamW8bit  # noqa: E402
from minift.quant.nf4 import DYNAMIC_CODE, DYNAMIC_CODE_UNSIGNED  # noqa: E402

pytestmark = pytest.mark.interop
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def bnb_optimizer(weights):
    """bitsandbytes' optimizer over a copy of ``weights``, or a skip if this build cannot step on the CPU."""
    p = torch.nn.Parameter(torch.from_numpy(weights.copy()))
    opt = bnb.optim.AdamW8bit([p], **HYPER)
    try:
        p.grad = torch.zeros_like(p)
        opt.state[p] = {}
        opt.step()
    except (RuntimeError, NotImplementedError, AttributeError) as err:
        pytest.skip(f"this bitsandbytes has no CPU 8-bit optimizer ({type(err).__name__}: {err})")
    p.data = torch.from_numpy(weights.copy())  # start over from the same weights
    opt.state.clear()
    return p, opt


def test_the_maps_are_bitsandbytes_own():
    np.testing.assert_array_equal(bnb.functional.create_dynamic_map(signed=True).numpy(), DYNAMIC_CODE)
    np.testing.assert_array_equal(bnb.functional.create_dynamic_map(signed=False).numpy(), DYNAMIC_CODE_UNSIGNED)


def test_ten_steps_agree_with_bitsandbytes():
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((128, 96)).astype(np.float32)
    grads = [(rng.standard_normal(weights.shape) * 10.0 ** rng.uniform(-3, 0)).astype(np.float32)
             for _ in range(10)]
    theirs, their_opt = bnb_optimizer(weights)
    ours = Parameter(weights.copy())
    our_opt = AdamW8bit([ours], **HYPER)
    for t, g in enumerate(grads, start=1):
        theirs.grad, ours.grad = torch.from_numpy(g.copy()), g.copy()
        their_opt.step()
        our_opt.step()
        if t == 1:
            np.testing.assert_allclose(ours.data, theirs.detach().numpy(), rtol=0, atol=1e-6)
    state, their_state = our_opt.state[ours], their_opt.state[theirs]
    assert state["step"] == their_state["step"] == 10
    # measured: 99.5% of m's codes and 98.9% of v's are the same byte, m's absmax agree to 2.4e-7
    # and the weights differ by 2.2% of the largest distance they moved
    for ours_key, their_key, share in (("exp_avg_codes", "state1", 0.99), ("exp_avg_sq_codes", "state2", 0.98)):
        same = np.mean(state[ours_key] == their_state[their_key].numpy())
        assert same > share, (ours_key, same)
    np.testing.assert_allclose(state["exp_avg_absmax"], their_state["absmax1"].numpy(), rtol=1e-5)
    moved = np.abs(theirs.detach().numpy() - weights).max()
    assert np.abs(ours.data - theirs.detach().numpy()).max() < 0.05 * moved
