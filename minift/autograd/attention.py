"""Causal scaled dot-product attention with grouped-query heads, forward and backward.

Legend: B batch, Hq query heads, Hkv key/value heads (Hq = G * Hkv; G query heads share one
key/value head — grouped-query attention, Ainslie et al. 2023), Tq queries, Tk keys, d head dim.

    S = Q K^T / sqrt(d)          (B, Hkv, G, Tq, Tk)
    S[i, j] = -inf where key j is in the future of query i, or masked out
    P = softmax(S) over keys
    O = P V                      (B, Hkv, G, Tq, d)

Queries are the *last* Tq positions of the Tk keys: with a KV cache (Tq = 1, Tk = all tokens so
far) or learned prefix keys (prefix tuning), query i may see key j when j <= i + (Tk - Tq).
Packed rows (several examples per row) add a block-diagonal mask, ``segment_mask``.

Backward, with dO the incoming gradient:
    dV = P^T dO                  summed over the G query heads of each group
    dP = dO V^T
    dS = P * (dP - rowsum(dP * P))          (softmax backward)
    dQ = dS K / sqrt(d),   dK = dS^T Q / sqrt(d)   (dK summed over the group)

The G query heads of a group are a reshape of Q, not copies of K and V: K and V are never
repeated in memory. A query that may see no key at all (a padding position under left padding)
gets P = 0 and output 0 instead of NaN. Saves: Q, K, V and P.
"""

from __future__ import annotations

import math

from minift.autograd.elementwise import ShapeError, counted_matmul
from minift.autograd.function import Function
from minift.backend import xp


def causal_mask(tq: int, tk: int):
    """(Tq, Tk) booleans, True where query i (at position i + tk - tq) may look at key j."""
    offset = tk - tq
    return xp.arange(tk)[None, :] <= xp.arange(tq)[:, None] + offset


def segment_mask(segment_ids):
    """(B, T) segment ids -> (B, T, T) booleans, True where query i and key j share a segment.

    Sequence packing (``minift/data/packing.py``) lays several examples in one row and numbers
    them 1, 2, ...; combined with the causal mask this one is block diagonal, so no example
    attends to another and each gets the outputs it would get alone. Padding (segment 0) only
    sees padding, whose outputs no loss reads.
    """
    ids = xp.asarray(segment_ids)
    if ids.ndim != 2:
        raise ShapeError(f"segment_mask: segment ids must be (batch, tokens), got shape {ids.shape}")
    return ids[:, :, None] == ids[:, None, :]


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ShapeError(
            f"attention: expected q (B, Hq, Tq, d), k and v (B, Hkv, Tk, d); got q {q.shape}, "
            f"k {k.shape}, v {v.shape}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ShapeError(
            f"attention: q {q.shape} and k {k.shape} must share batch and head dim, and the "
            "number of query heads must be a multiple of the number of key/value heads"
        )
    if q.shape[2] > k.shape[2]:
        raise ShapeError(f"attention: more queries ({q.shape[2]}) than keys ({k.shape[2]})")


class ScaledDotProductAttention(Function):
    """See the module docstring. ``mask`` (optional) is boolean, broadcastable to
    (B, 1, 1, Tq, Tk), True = may attend; it is combined with the causal mask."""

    @staticmethod
    def forward(ctx, q, k, v, *, causal=True, mask=None):
        _check_shapes(q, k, v)
        b, hq, tq, d = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        qg = q.reshape(b, hkv, hq // hkv, tq, d)  # (B, Hkv, G, Tq, d)
        kg, vg = k[:, :, None], v[:, :, None]  # (B, Hkv, 1, Tk, d)
        scale = 1.0 / math.sqrt(d)
        s = counted_matmul(qg, xp.swapaxes(kg, -1, -2)) * xp.asarray(scale, dtype=q.dtype)
        allowed = causal_mask(tq, tk) if causal else None
        if mask is not None:
            allowed = mask if allowed is None else (allowed & mask)
        if allowed is not None:
            s = xp.where(allowed, s, xp.asarray(-xp.inf, dtype=s.dtype))
        row_max = s.max(axis=-1, keepdims=True)
        s -= xp.where(xp.isfinite(row_max), row_max, 0)  # a fully masked row stays -inf, not NaN
        p = xp.exp(s, out=s)
        total = p.sum(axis=-1, keepdims=True)
        p /= xp.where(total > 0, total, 1)  # ... and attends to nothing: its output is 0
        out = counted_matmul(p, vg)  # (B, Hkv, G, Tq, d)
        ctx.save_for_backward(qg, k, v, p)
        ctx.scale = scale
        return out.reshape(b, hq, tq, d)

    @staticmethod
    def backward(ctx, g):
        qg, k, v, p = ctx.saved
        b, hkv, groups, tq, d = qg.shape
        need_q, need_k, need_v = ctx.needs_input_grad
        go = g.reshape(b, hkv, groups, tq, d)
        kg, vg = k[:, :, None], v[:, :, None]
        dv = counted_matmul(xp.swapaxes(p, -1, -2), go).sum(axis=2) if need_v else None
        dq = dk = None
        if need_q or need_k:
            dp = counted_matmul(go, xp.swapaxes(vg, -1, -2))
            ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
            ds *= xp.asarray(ctx.scale, dtype=ds.dtype)
            if need_q:
                dq = counted_matmul(ds, kg).reshape(b, hkv * groups, tq, d)
            if need_k:
                dk = counted_matmul(xp.swapaxes(ds, -1, -2), qg).sum(axis=2)
        return dq, dk, dv
