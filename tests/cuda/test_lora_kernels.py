"""kernels/lora_shrink_expand.cu against minift/cuda/reference.py, on every path.

Tolerance (``float32_tolerance``): |kernel - exact| <= 2 (n + 2) 2^-24 sum|products| elementwise,
n the length of the longest sum — the textbook bound for float32 dot products, evaluated per
element, so zeros, 1e9 and subnormals in one array are all held to it.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import kernel_arrays, lora_shapes

from minift.autograd.function import op_counts
from minift.backend import to_numpy
from minift.cuda import kernels
from minift.cuda import reference as ref

FEW = settings(max_examples=8, deadline=None)
scales = st.sampled_from([1.0, 0.5, 2.0, -0.25])


def draw_lora(data, shape):
    M, K, N, R = shape
    return [data.draw(kernel_arrays(s)) for s in ((M, K), (R, K), (N, R), (M, N))]


def assert_within(out, expected, tolerance):
    assert not np.isnan(out).any(), "an output element was never written (still NaN)"
    excess = np.abs(out.astype(np.float64) - expected) - tolerance
    assert (excess <= 0).all(), f"max error beyond tolerance: {excess.max():.3g}"


@pytest.mark.parametrize("version", [1, 2])
@FEW
@given(shape=lora_shapes(), data=st.data())
def test_shrink_matches_the_reference(device, version, shape, data):
    x, A, _, _ = draw_lora(data, shape)
    t = device.guarded((shape[0], shape[3]))
    kernels.lora_shrink(device.put(x), device.put(A), out=t.array, version=version)
    assert_within(t.result(), ref.lora_shrink(x, A), ref.float32_tolerance(ref.lora_shrink, x, A, terms=shape[1]))


@pytest.mark.parametrize("accumulate", [True, False])
@FEW
@given(shape=lora_shapes(), scale=scales, data=st.data())
def test_expand_matches_the_reference(device, accumulate, shape, scale, data):
    M, _, N, R = shape
    t, B, y0 = data.draw(kernel_arrays((M, R))), data.draw(kernel_arrays((N, R))), data.draw(kernel_arrays((M, N)))
    y = device.guarded((M, N), fill=y0 if accumulate else None)  # write mode: y starts as NaN
    kernels.lora_expand(device.put(t), device.put(B), y.array, scale, accumulate=accumulate)
    expected = ref.lora_expand(t, B, y0, scale, accumulate=accumulate)
    tolerance = ref.float32_tolerance(ref.lora_expand, t, B, y0, scale, terms=R, accumulate=accumulate)
    assert_within(y.result(), expected, tolerance)


@FEW
@given(shape=lora_shapes(), scale=scales, data=st.data())
def test_fused_matches_the_reference(device, shape, scale, data):
    x, A, B, y0 = draw_lora(data, shape)
    y = device.guarded(y0.shape, fill=y0)
    kernels.lora_fused(device.put(x), device.put(A), device.put(B), scale, y.array)
    tolerance = ref.float32_tolerance(ref.lora_fused, x, A, B, scale, y0, terms=shape[1] + shape[3])
    assert_within(y.result(), ref.lora_fused(x, A, B, scale, y0), tolerance)


@FEW
@given(m=st.integers(1, 40), p=st.integers(1, 40), q=st.integers(1, 40), scale=scales, data=st.data())
def test_grad_weight_matches_the_reference(device, m, p, q, scale, data):
    U, V = data.draw(kernel_arrays((m, p))), data.draw(kernel_arrays((m, q)))
    C = device.guarded((p, q))
    kernels.lora_grad_weight(device.put(U), device.put(V), scale, out=C.array)
    assert_within(C.result(), ref.lora_grad_weight(U, V, scale), ref.float32_tolerance(ref.lora_grad_weight, U, V,
                                                                                      scale, terms=m))


@FEW
@given(shape=lora_shapes(max_outputs=96), scale=scales, data=st.data())
def test_backward_matches_the_reference(device, shape, scale, data):
    M, K, N, R = shape
    x, A, B, g = draw_lora(data, shape)
    t = kernels.lora_shrink(device.put(x), device.put(A))
    grads = kernels.lora_backward(*map(device.put, (x, A, B)), t, device.put(g), scale)
    expected = ref.lora_backward(x, A, B, g, scale)
    tolerances = ref.float32_tolerance(ref.lora_backward, x, A, B, g, scale, terms=N + M + K)
    for got, want, tol in zip(grads, expected, tolerances):
        assert_within(to_numpy(got), want, tol)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_backward_runs_only_the_kernels_a_wanted_gradient_needs(device, needs):
    """Principle 2: a frozen A or B costs no kernel, not merely a discarded result."""
    rng = np.random.default_rng(0)
    x, A, B, g = (device.put(rng.normal(size=s).astype(np.float32)) for s in ((5, 7), (3, 7), (6, 3), (5, 6)))
    t = kernels.lora_shrink(x, A)
    before = op_counts.copy()
    grads = kernels.lora_backward(x, A, B, t, g, 0.5, needs=needs)
    assert [grad is not None for grad in grads] == list(needs)
    launched = {k: op_counts[k] - before[k] for k in op_counts if op_counts[k] != before[k]}
    expected = {(True, False, False): {"kernel:lora_shrink_v2": 1, "kernel:lora_expand": 1},
                (False, True, False): {"kernel:lora_shrink_v2": 1, "kernel:lora_grad_weight": 1},
                (False, False, True): {"kernel:lora_grad_weight": 1}}[needs]
    assert launched == expected
