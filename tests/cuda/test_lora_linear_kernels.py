"""LoraLinear on the kernel path (as with backend=cupy) equals the NumPy path, forward and backward.

``kernels.lora_kernels("on")`` sends NumPy arrays through the kernels too — on the CPU emulator —
so the autograd wiring (``LoraKernelUpdate``) is checked on every machine.
"""

import numpy as np
import pytest

from minift.autograd import Tensor, no_grad, op_counts
from minift.cuda import kernels
from minift.nn import Linear
from minift.peft import LoraConfig, LoraLinear


def lora_layer(d_in=20, d_out=12, r=4, seed=0):
    rng = np.random.default_rng(seed)
    layer = LoraLinear(Linear(d_in, d_out, rng=rng))
    layer.base_layer.weight.requires_grad = False  # frozen, as get_peft_model leaves it
    layer.add_adapter("default", LoraConfig(r=r, lora_alpha=8), rng)
    layer.active_adapters = ["default"]
    layer.lora_B["default"].weight.data = rng.normal(0, 0.5, (d_out, r)).astype(np.float32)  # as after training
    return layer


def forward_backward(layer, x, mode):
    for p in layer.parameters():
        p.grad = None
    xt = Tensor(x, requires_grad=True)
    with kernels.lora_kernels(mode):
        y = layer(xt)
        (y * y).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    return y.data, xt.grad, grads


@pytest.mark.parametrize("shape", [(7, 20), (2, 3, 20), (1, 20)])
def test_kernel_path_equals_the_numpy_path(shape):
    layer = lora_layer()
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    y_k, dx_k, grads_k = forward_backward(layer, x, "on")
    y_n, dx_n, grads_n = forward_backward(layer, x, "off")
    np.testing.assert_allclose(y_k, y_n, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx_k, dx_n, rtol=1e-4, atol=1e-4)
    assert grads_k.keys() == grads_n.keys() == {"lora_A.default.weight", "lora_B.default.weight"}
    for name in grads_k:
        np.testing.assert_allclose(grads_k[name], grads_n[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_inference_runs_the_fused_kernel_and_training_the_pair():
    layer, x = lora_layer(), np.random.default_rng(2).normal(size=(5, 20)).astype(np.float32)
    before = op_counts.copy()
    with kernels.lora_kernels("on"), no_grad():
        y_fused = layer(Tensor(x)).data
    assert op_counts["kernel:lora_fused"] == before["kernel:lora_fused"] + 1
    with kernels.lora_kernels("off"):
        np.testing.assert_allclose(y_fused, layer(Tensor(x)).data, rtol=1e-5, atol=1e-5)


def test_a_frozen_lora_A_gets_no_gradient_kernel():
    layer, x = lora_layer(), np.random.default_rng(3).normal(size=(4, 20)).astype(np.float32)
    layer.lora_A["default"].weight.requires_grad = False
    before = op_counts.copy()
    _, dx, grads = forward_backward(layer, x, "on")
    assert set(grads) == {"lora_B.default.weight"} and layer.lora_A["default"].weight.grad is None
    assert op_counts["kernel:lora_grad_weight"] - before["kernel:lora_grad_weight"] == 1  # dB only
    assert dx is not None


def test_auto_mode_keeps_numpy_arrays_on_numpy():
    assert not kernels.use_lora_kernels(np.zeros((2, 2), np.float32))
    with kernels.lora_kernels("on"):
        assert kernels.use_lora_kernels(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="lora_kernels mode"):
        with kernels.lora_kernels("sometimes"):
            pass
