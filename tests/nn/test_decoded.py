"""``DecodedLinear`` (issue 19), the one Function behind a 16-bit base (``WidenedLinear``) and
QLoRA's 4-bit base (``NF4Linear``): its input and bias gradients against central finite
differences in float64, for both decoders, and never a gradient for the stored weight."""

import numpy as np
import pytest

from minift.autograd import Tensor
from minift.nn.layers import WidenedLinear
from minift.nn.linear4bit import NF4Linear
from minift.quant.nf4 import quantize_nf4

# Central differences of L = sum(w * y), which is linear in x and b, so the truncation error is
# zero and only round-off is left: ~1e-16 * |L| / EPS, about 1e-9 here. A wrong backward (a
# transposed product, a missing bias sum) is off by O(1), so 1e-6 separates the two.
EPS = 1e-6
TOLERANCE = 1e-6
OUT, IN = 6, 64


def stored_weights():
    """The two storages of one float32 weight, as ``apply`` settings: 16 bits, and NF4 codes."""
    weight = np.random.default_rng(0).standard_normal((OUT, IN)).astype(np.float32)
    packed, state = quantize_nf4(weight, blocksize=64, double_quant=True)
    return {WidenedLinear: {"weight": weight.astype(np.float16)},
            NF4Linear: {"packed": packed, "state": state}}


def numerical_grad(loss, array):
    """d loss / d array by central differences, one element at a time (on ``array`` itself)."""
    grad = np.zeros_like(array)
    for k in np.ndindex(array.shape):
        original = array[k]
        array[k] = original + EPS
        plus = loss()
        array[k] = original - EPS
        minus = loss()
        array[k] = original
        grad[k] = (plus - minus) / (2 * EPS)
    return grad


@pytest.mark.parametrize("function", [WidenedLinear, NF4Linear])
def test_input_and_bias_gradients_match_finite_differences_in_float64(function):
    stored = stored_weights()[function]
    rng = np.random.default_rng(1)
    x, bias = rng.standard_normal((2, 3, IN)), rng.standard_normal(OUT)
    w = rng.standard_normal((2, 3, OUT))

    def loss():
        return float((w * function.apply(x, bias, **stored).data).sum())

    x_t, bias_t = Tensor(x.copy(), requires_grad=True), Tensor(bias.copy(), requires_grad=True)
    y = function.apply(x_t, bias_t, **stored)
    assert y.dtype == np.float64  # the weight is decoded to the input's float type
    y.backward(w)
    np.testing.assert_allclose(x_t.grad, numerical_grad(loss, x), rtol=TOLERANCE, atol=TOLERANCE)
    np.testing.assert_allclose(bias_t.grad, numerical_grad(loss, bias), rtol=TOLERANCE, atol=TOLERANCE)
    assert not np.allclose(x_t.grad, 0)


@pytest.mark.parametrize("function", [WidenedLinear, NF4Linear])
def test_only_the_gradients_asked_for_are_given(function):
    """No dW ever (the weight is a setting, not an input); a frozen input gets no dx."""
    stored = stored_weights()[function]
    x = np.ones((4, IN))
    bias = Tensor(np.zeros(OUT), requires_grad=True)
    y = function.apply(x, bias, **stored)
    dx, dbias = y._node.function.backward(y._node.ctx, np.ones((4, OUT)))
    assert dx is None
    np.testing.assert_array_equal(dbias, np.full(OUT, 4.0))
