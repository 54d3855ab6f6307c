"""Bad arguments are refused by the shared Python checks, with a clear message, before any launch."""

import numpy as np
import pytest

from minift.autograd.function import op_counts
from minift.backend import cupy_available
from minift.cuda import kernels
from minift.cuda.kernels import KernelArgumentError


def arrays(*shapes, dtype=np.float32):
    rng = np.random.default_rng(0)
    return [rng.normal(size=s).astype(dtype) for s in shapes]


x, A, B, y, t = arrays((4, 6), (3, 6), (5, 3), (4, 5), (4, 3))
A_stack, B_stack = arrays((2, 3, 6), (2, 5, 3))
idx = np.array([0, 1, -1, 1], dtype=np.int32)

BAD_CALLS = {
    "float64 input": (lambda: kernels.lora_shrink(x.astype(np.float64), A), "x must be float32, got float64"),
    "inner sizes differ": (lambda: kernels.lora_shrink(x, A[:, :5].copy()),
                           r"A has shape \(3, 5\), expected \(\*, 6\)"),
    "not contiguous": (lambda: kernels.lora_shrink(np.asfortranarray(x), A), "x must be C-contiguous"),
    "transposed view": (lambda: kernels.lora_expand(t, np.ones((3, 5), np.float32).T, y, 1.0),
                        "B must be C-contiguous"),
    "1-D input": (lambda: kernels.lora_shrink(x[0], A), r"x has shape \(6,\), expected \(\*, \*\)"),
    "a list": (lambda: kernels.lora_shrink(x.tolist(), A), "x must be a NumPy or CuPy array, got list"),
    "wrong output shape": (lambda: kernels.lora_shrink(x, A, out=np.empty((3, 4), np.float32)),
                           r"out has shape \(3, 4\), expected \(4, 3\)"),
    "y of the wrong shape": (lambda: kernels.lora_expand(t, B, np.zeros(0, np.float32), 1.0),
                             r"y has shape \(0,\), expected \(4, 5\)"),
    "accumulate without y": (lambda: kernels.lora_expand(t, B, None, 1.0), "accumulate=True needs the array y"),
    "rank too large for shared memory": (lambda: kernels.lora_fused(*arrays((2, 4), (800, 4), (3, 800)), 1.0,
                                                                            np.zeros((2, 3), np.float32)),
                                         "rank R=800 needs 51200 bytes of shared memory"),
    "unknown version": (lambda: kernels.lora_shrink(x, A, version=3), "version must be 1 or 2"),
    "adapter index too large": (lambda: kernels.bgmv(x, A_stack, B_stack, np.array([0, 2, 0, 0], np.int32), 1.0, y),
                                r"adapter indices must be in \[-1, 2\), got values from 0 to 2"),
    "adapter index below -1": (lambda: kernels.bgmv(x, A_stack, B_stack, np.array([0, -2, 0, 0], np.int32), 1.0, y),
                               "got values from -2 to 0"),
    "int64 indices": (lambda: kernels.bgmv(x, A_stack, B_stack, idx.astype(np.int64), 1.0, y), "idx must be int32"),
    "one index per row": (lambda: kernels.bgmv(x, A_stack, B_stack, idx[:3].copy(), 1.0, y),
                          r"idx has shape \(3,\), expected \(4\)"),
    "stacks disagree": (lambda: kernels.bgmv(x, A_stack, B_stack[:1].copy(), idx, 1.0, y),
                        r"B_stack has shape \(1, 5, 3\), expected \(2, \*, 3\)"),
    "scale per adapter": (lambda: kernels.bgmv(x, A_stack, B_stack, idx, np.ones(3, np.float32), y),
                          r"scale has shape \(3,\), expected \(2\)"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_arguments_are_refused_before_any_launch(case):
    call, message = BAD_CALLS[case]
    launches_before = sum(v for k, v in op_counts.items() if k.startswith("kernel:"))
    with pytest.raises(KernelArgumentError, match=message):
        call()
    assert sum(v for k, v in op_counts.items() if k.startswith("kernel:")) == launches_before


def test_an_output_that_overlaps_an_input_is_refused():
    with pytest.raises(KernelArgumentError, match="the output shares memory with an input"):
        kernels.lora_shrink(x, A, out=x.reshape(-1)[:12].reshape(4, 3))  # the first 12 floats of x
    square = np.zeros((3, 3), np.float32)
    with pytest.raises(KernelArgumentError, match="the output shares memory with an input"):
        kernels.lora_grad_weight(square, square, 1.0, out=square)


@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a GPU to hold one argument on the device")
def test_mixing_host_and_device_arrays_is_refused():
    import cupy

    with pytest.raises(KernelArgumentError, match="mix NumPy"):
        kernels.lora_shrink(cupy.asarray(x), A)
