"""NumPy definitions of the CUDA kernels in ``kernels/*.cu``: the executable specification.

Every kernel in ``minift/cuda/kernels.py`` is tested against the function of the same name here. The
references compute in float64 from the kernels' float32 inputs, so they give the exact result up
to float64 rounding, and ``float32_tolerance`` says how far a float32 kernel may be from it.
NF4 is defined by ``minift.quant.nf4`` (bitsandbytes' layout, checked against bitsandbytes): its
dequantization is exact float32 arithmetic (one product; for double-quantized absmax a product
and a sum first), so the NF4 kernels must match it bit for bit.
"""

from __future__ import annotations

import numpy

from minift.backend import asarray, to_numpy
from minift.quant import nf4

#: Unit roundoff of float32 (round to nearest): every + or * is exact up to a factor (1 + d), |d| <= U.
U32 = 2.0**-24


def _f64(*arrays):
    return [numpy.asarray(a, dtype=numpy.float64) for a in arrays]


def lora_shrink(x, A):
    """t = x A^T: x (M, K), A (R, K) -> (M, R)."""
    x, A = _f64(x, A)
    return x @ A.T


def lora_expand(t, B, y, scale, accumulate=True):
    """y + s t B^T (accumulate) or s t B^T: t (M, R), B (N, R), y (M, N)."""
    t, B = _f64(t, B)
    update = scale * (t @ B.T)
    return numpy.asarray(y, dtype=numpy.float64) + update if accumulate else update


def lora_fused(x, A, B, scale, y):
    """y + s (x A^T) B^T: the LoRA forward, shrink and expand in one."""
    return lora_expand(lora_shrink(x, A), B, y, scale)


def lora_grad_weight(U, V, scale):
    """C = s U^T V: U (M, P), V (M, Q) -> (P, Q), a sum over the M rows (dA and dB)."""
    U, V = _f64(U, V)
    return scale * (U.T @ V)


def lora_backward(x, A, B, g, scale):
    """(dx, dA, dB) of y = y0 + s (x A^T) B^T for dL/dy = g, with u = g B:
    dx = s u A,  dA = s u^T x,  dB = s g^T (x A^T)."""
    x, A, B, g = _f64(x, A, B, g)
    u = g @ B
    return scale * (u @ A), scale * (u.T @ x), scale * (g.T @ (x @ A.T))


def bgmv(x, A_stack, B_stack, idx, scale, y):
    """Row i gets y[i] + scale[a] B[a] (A[a] x[i]) with a = idx[i]; rows with idx -1 keep y[i].
    ``scale`` is one number or one per adapter."""
    x, A_stack, B_stack, y = _f64(x, A_stack, B_stack, y)
    idx = numpy.asarray(idx)
    scale = numpy.broadcast_to(numpy.asarray(scale, dtype=numpy.float64), (len(A_stack),))
    rows = numpy.flatnonzero(idx >= 0)
    a = idx[rows]
    t = numpy.einsum("mrk,mk->mr", A_stack[a], x[rows]) * scale[a][:, None]
    out = y.copy()
    out[rows] += numpy.einsum("mnr,mr->mn", B_stack[a], t)
    return out


#: bitsandbytes' NF4 levels; kernels/nf4_dequant.cu and nf4_gemv.cu carry the same 16 numbers.
NF4_CODE = nf4.NF4_CODE


def nf4_dequantize(packed, absmax, n: int, blocksize: int, dtype=numpy.float32):
    """w[i] = NF4[q_i] * absmax[i // blocksize]: ``minift.quant.nf4.dequantize_nf4``, the definition."""
    state = nf4.QuantState(shape=(n,), blocksize=blocksize, absmax=asarray(absmax, numpy.float32))
    return to_numpy(nf4.dequantize_nf4(asarray(packed), state, dtype=dtype))


def _nested_state(absmax_q, code2, absmax2, offset, n, blocksize, nested_blocksize):
    if not numpy.array_equal(to_numpy(code2), nf4.DYNAMIC_CODE):
        raise ValueError("minift.quant.nf4 decodes double-quantized absmax with its DYNAMIC_CODE only")
    state2 = nf4.QuantState(shape=(len(absmax_q),), blocksize=nested_blocksize, absmax=asarray(absmax2, numpy.float32),
                            code=nf4.DYNAMIC_CODE)
    return nf4.QuantState(shape=(n,), blocksize=blocksize, absmax=asarray(absmax_q), offset=numpy.float32(offset),
                          state2=state2)


def nf4_absmax_nested(absmax_q, code2, absmax2, offset, nested_blocksize: int = 256):
    """absmax[b] = code2[absmax_q[b]] * absmax2[b // nested_blocksize] + offset: ``nf4.block_absmax``."""
    state = _nested_state(absmax_q, code2, absmax2, offset, len(absmax_q), 1, nested_blocksize)
    return to_numpy(nf4.block_absmax(state))


def nf4_dequantize_nested(packed, absmax_q, code2, absmax2, offset, n: int, blocksize: int,
                          nested_blocksize: int = 256, dtype=numpy.float32):
    """``nf4_dequantize`` with double-quantized absmax: ``nf4.dequantize_nf4`` of a nested state."""
    state = _nested_state(absmax_q, code2, absmax2, offset, n, blocksize, nested_blocksize)
    return to_numpy(nf4.dequantize_nf4(asarray(packed), state, dtype=dtype))


def nf4_gemv(packed, absmax, x, N: int, K: int, blocksize: int):
    """y = W x with W the (N, K) dequantized weight (row-major flat layout), in float64."""
    W = nf4_dequantize(packed, absmax, N * K, blocksize).reshape(N, K)
    return W.astype(numpy.float64) @ numpy.asarray(x, dtype=numpy.float64)


def float32_tolerance(reference, *inputs, terms: int, **settings):
    """How far a float32 kernel may be from ``reference(*inputs)``, elementwise.

    A float32 sum of n products has an error of at most about n U sum |products| (Higham, the
    forward error of a dot product). For a product of sums (expand after shrink, dx after u = g B)
    the n add up. ``reference`` evaluated on |inputs| gives sum |products| for every output, so:

        |kernel - reference| <= 2 (terms + 2) U reference(|inputs|) + (terms + 2) 2^-149

    with ``terms`` the longest chain of additions (K for shrink, K + R for fused ...); the factor 2
    is headroom, the last term covers results in the subnormal range.
    """
    magnitude = reference(*(numpy.abs(numpy.asarray(a, dtype=numpy.float64)) for a in inputs), **settings)
    if isinstance(magnitude, tuple):
        return tuple(2 * (terms + 2) * U32 * m + (terms + 2) * 2.0**-149 for m in magnitude)
    return 2 * (terms + 2) * U32 * magnitude + (terms + 2) * 2.0**-149
