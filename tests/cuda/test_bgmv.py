"""kernels/bgmv.cu: every row its own adapter (or none), one launch, on every path."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import adapter_indices, kernel_arrays

from minift.backend import to_numpy
from minift.cuda import kernels
from minift.cuda import reference as ref


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 12), K=st.integers(1, 70), N=st.one_of(st.just(257), st.integers(1, 60)),
       R=st.one_of(st.sampled_from([1, 9, 64]), st.integers(1, 64)), n_adapters=st.integers(1, 4),
       per_adapter_scale=st.booleans(), data=st.data())
def test_bgmv_matches_the_reference(device, rows, K, N, R, n_adapters, per_adapter_scale, data):
    x, y0 = data.draw(kernel_arrays((rows, K))), data.draw(kernel_arrays((rows, N)))
    A, B = data.draw(kernel_arrays((n_adapters, R, K))), data.draw(kernel_arrays((n_adapters, N, R)))
    idx = data.draw(adapter_indices(rows, n_adapters))
    scale = np.linspace(0.5, -2.0, n_adapters, dtype=np.float32) if per_adapter_scale else 0.75
    y = device.guarded((rows, N), fill=y0)
    kernels.bgmv(device.put(x), device.put(A), device.put(B), device.put(idx),
                 device.put(scale) if per_adapter_scale else scale, y.array)
    out = y.result()

    np.testing.assert_array_equal(out[idx < 0], y0[idx < 0])  # base-only rows: bitwise untouched
    expected = ref.bgmv(x, A, B, idx, scale, y0)
    tolerance = ref.float32_tolerance(lambda x, A, B, s, y: ref.bgmv(x, A, B, idx, s, y), x, A, B, scale, y0,
                                      terms=K + R)
    assert (np.abs(out.astype(np.float64) - expected) <= tolerance).all()


def test_adapters_of_smaller_rank_are_padded_exactly(device):
    """Ranks 2, 5 and 8 in one stack of rank 8: the same result as each adapter on its own."""
    rng = np.random.default_rng(0)
    K, N = 40, 33
    adapters = [(rng.normal(size=(r, K)).astype(np.float32), rng.normal(size=(N, r)).astype(np.float32))
                for r in (2, 5, 8)]
    A_stack, B_stack = kernels.stack_lora_adapters(adapters)
    assert A_stack.shape == (3, 8, K) and B_stack.shape == (3, N, 8)
    x = rng.normal(size=(6, K)).astype(np.float32)
    idx = np.array([0, 1, 2, -1, 1, 0], dtype=np.int32)
    y = kernels.bgmv(device.put(x), device.put(A_stack), device.put(B_stack), device.put(idx), 0.5,
                     device.put(np.zeros((6, N), np.float32)))
    for i, a in enumerate(idx):
        if a >= 0:
            A, B = (w.astype(np.float64) for w in adapters[a])
            np.testing.assert_allclose(to_numpy(y)[i], 0.5 * B @ (A @ x[i]), rtol=1e-5, atol=1e-4)
        else:
            assert (to_numpy(y)[i] == 0).all()
