"""Causal scaled dot-product attention with grouped-query heads, forward and backward.

Legend: B batch, Hq query heads, Hkv key/value heads (Hq = G * Hkv; G query heads share one
key/value head — grouped-query attention, Ainslie et al. 2023), Tq queries, Tk keys, d head dim.

    S = Q K^T / sqrt(d)          (B, Hkv, G, Tq, Tk)
    S[i, j] = -inf where key j is in the future of query i, or masked out
    P = softmax(S) over keys
    O = P V                      (B, Hkv, G, Tq, d)

Queries are the *last* Tq positions of the Tk keys: with a KV cache (Tq = 1, Tk = all tokens so
far) or learned prefix keys (prefix tuning), query i may see key j when j <= i + (Tk - Tq).
Packed rows (several examples per row): ``segment_mask`` is the reference, a block-diagonal mask
on the full (T, T) scores; ``SegmentAttention`` computes only the blocks on the diagonal
(``segment_layout`` says where they lie) and gives the same outputs and gradients.

Backward, with dO the incoming gradient:
    dV = P^T dO                  summed over the G query heads of each group
    dP = dO V^T
    dS = P * (dP - rowsum(dP * P))          (softmax backward)
    dQ = dS K / sqrt(d),   dK = dS^T Q / sqrt(d)   (dK summed over the group)

The G query heads of a group are a reshape of Q, not copies of K and V: K and V are never
repeated in memory. A query that may see no key at all (a padding position under left padding)
gets P = 0 and output 0 instead of NaN. Saves: Q, K, V and P.

The softmax and its backward work on each score row alone, so they run over blocks of rows
on the BLAS threads (``over_row_blocks``, minift/autograd/parallel.py), with the same bits.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy

from minift.autograd.elementwise import ShapeError, counted_matmul
from minift.autograd.function import Function
from minift.autograd.parallel import over_row_blocks
from minift.backend import to_numpy, xp

#: Segments are padded up to a multiple of this many tokens so that segments of nearby lengths
#: share one batched product (see ``segment_layout``).
SEGMENT_QUANTUM = 16


def causal_mask(tq: int, tk: int):
    """(Tq, Tk) booleans, True where query i (at position i + tk - tq) may look at key j."""
    offset = tk - tq
    return xp.arange(tk)[None, :] <= xp.arange(tq)[:, None] + offset


def segment_mask(segment_ids):
    """(B, T) segment ids -> (B, T, T) booleans, True where query i and key j share a segment.

    Sequence packing (``minift/data/packing.py``) lays several examples in one row and numbers
    them 1, 2, ...; combined with the causal mask this one is block diagonal, so no example
    attends to another and each gets the outputs it would get alone. Padding (segment 0) sees
    nothing: its output is 0 and no loss reads it. This is the reference that
    ``SegmentAttention`` is tested against.
    """
    ids = xp.asarray(segment_ids)
    if ids.ndim != 2:
        raise ShapeError(f"segment_mask: segment ids must be (batch, tokens), got shape {ids.shape}")
    return (ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] != 0)


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


def _attend(qg, kg, vg, allowed, scale):
    """Forward of the module docstring on grouped heads: qg (..., Hkv, G, Tq, d), kg and vg
    (..., Hkv, 1, Tk, d), ``allowed`` broadcastable to the scores or None -> (O, P)."""
    s = counted_matmul(qg, xp.swapaxes(kg, -1, -2)) * xp.asarray(scale, dtype=qg.dtype)
    if allowed is not None:
        s = xp.where(allowed, s, xp.asarray(-xp.inf, dtype=s.dtype))
    over_row_blocks(_softmax_rows, s.reshape(-1, s.shape[-1]))  # s is new, so this is a view
    return counted_matmul(s, vg), s


def _softmax_rows(s) -> None:
    """Scores (rows, Tk) -> their softmax over keys, in place. A row masked throughout stays
    -inf after the shift (not NaN) and ends as P = 0: it attends to nothing, its output is 0."""
    row_max = s.max(axis=-1, keepdims=True)
    s -= xp.where(xp.isfinite(row_max), row_max, 0)
    xp.exp(s, out=s)
    total = s.sum(axis=-1, keepdims=True)
    s /= xp.where(total > 0, total, 1)


def _softmax_backward_rows(ds, p, dp, scale) -> None:
    """dS = P * (dP - rowsum(dP * P)) * scale on a block of rows (the softmax's backward)."""
    xp.multiply(p, dp - (dp * p).sum(axis=-1, keepdims=True), out=ds)
    ds *= xp.asarray(scale, dtype=ds.dtype)


def _attend_backward(qg, kg, vg, p, go, scale, needs):
    """Backward of the module docstring on grouped heads (shapes as ``_attend``; dK and dV are
    summed over the G query heads of a group) -> (dQ, dK, dV), None where not ``needs``."""
    need_q, need_k, need_v = needs
    dv = counted_matmul(xp.swapaxes(p, -1, -2), go).sum(axis=-3) if need_v else None
    dq = dk = None
    if need_q or need_k:
        dp = counted_matmul(go, xp.swapaxes(vg, -1, -2))
        ds = xp.empty(dp.shape, dtype=xp.result_type(p, dp))
        over_row_blocks(functools.partial(_softmax_backward_rows, scale=scale),
                        *(a.reshape(-1, a.shape[-1]) for a in (ds, p, dp)))
        if need_q:
            dq = counted_matmul(ds, kg)
        if need_k:
            dk = counted_matmul(xp.swapaxes(ds, -1, -2), qg).sum(axis=-3)
    return dq, dk, dv


class ScaledDotProductAttention(Function):
    """See the module docstring. ``mask`` (optional) is boolean, broadcastable to
    (B, 1, 1, Tq, Tk), True = may attend; it is combined with the causal mask."""

    @staticmethod
    def forward(ctx, q, k, v, *, causal=True, mask=None):
        _check_shapes(q, k, v)
        b, hq, tq, d = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        qg = q.reshape(b, hkv, hq // hkv, tq, d)  # (B, Hkv, G, Tq, d)
        allowed = causal_mask(tq, tk) if causal else None
        if mask is not None:
            allowed = mask if allowed is None else (allowed & mask)
        ctx.scale = 1.0 / math.sqrt(d)
        out, p = _attend(qg, k[:, :, None], v[:, :, None], allowed, ctx.scale)  # (B, Hkv, G, Tq, d)
        ctx.save_for_backward(qg, k, v, p)
        return out.reshape(b, hq, tq, d)

    @staticmethod
    def backward(ctx, g):
        qg, k, v, p = ctx.saved
        dq, dk, dv = _attend_backward(qg, k[:, :, None], v[:, :, None], p, g.reshape(qg.shape),
                                      ctx.scale, ctx.needs_input_grad)
        return (None if dq is None else dq.reshape(g.shape)), dk, dv


@dataclass(frozen=True)
class SegmentBucket:
    """The segments of a batch padded to one length L: ``index`` (n, L) are their tokens'
    places in the flattened (B * T) batch, a padded slot repeating the segment's last token;
    ``real`` (n, L) is False on the padded slots; ``targets`` = ``index[real]``."""

    length: int
    index: object
    real: object
    targets: object


@dataclass(frozen=True)
class SegmentLayout:
    """Where the segments of a packed batch of shape ``(B, T)`` lie, grouped into buckets of
    equal padded length. Made once per batch by ``segment_layout`` and read by every layer."""

    shape: tuple[int, int]
    buckets: tuple[SegmentBucket, ...]


def segment_layout(segment_ids, quantum: int = SEGMENT_QUANTUM) -> SegmentLayout:
    """(B, T) segment ids (1, 2, ... per example, 0 on padding) -> their ``SegmentLayout``.

    Each segment is padded up to a multiple of ``quantum`` tokens and the segments of equal
    padded length form a bucket: one batched product per bucket, at most T / quantum of them,
    instead of one per distinct length, for at most ``quantum - 1`` padded rows and columns per
    segment. On the insurer set's packed rows, quanta of 1, 8 and 16 took the same time within
    noise and 64 about 15 % more: 16 keeps the products few at no measurable cost. The padded
    slots sit *after* a segment's tokens, so causality alone hides them from its real queries:
    no extra mask is needed.
    """
    ids = to_numpy(segment_ids)
    if ids.ndim != 2:
        raise ShapeError(f"segment_layout: segment ids must be (batch, tokens), got shape {ids.shape}")
    starts, lengths = _segment_runs(ids)
    padded = numpy.minimum(-(-lengths // quantum) * quantum, ids.shape[1])
    buckets = []
    for length in numpy.unique(padded):
        members = padded == length
        offsets = numpy.arange(length)
        real = offsets < lengths[members][:, None]
        index = starts[members][:, None] + numpy.minimum(offsets, lengths[members][:, None] - 1)
        buckets.append(SegmentBucket(int(length), xp.asarray(index), xp.asarray(real),
                                     xp.asarray(index[real])))
    return SegmentLayout(ids.shape, tuple(buckets))


def _segment_runs(ids):
    """Start (in the flattened B * T tokens) and length of every run of one nonzero id. Each id
    may form one run per row: the reference mask would join two runs into one example."""
    b, t = ids.shape
    flat = ids.reshape(-1)
    run_starts = numpy.ones(flat.size, dtype=bool)
    run_starts[1:] = flat[1:] != flat[:-1]
    run_starts[::t] = True  # every row starts a run
    starts = numpy.flatnonzero(run_starts)
    lengths = numpy.diff(starts, append=flat.size)
    real = flat[starts] != 0
    starts, lengths = starts[real], lengths[real]
    row_and_id = numpy.stack([starts // t, flat[starts]], axis=1)
    if len(numpy.unique(row_and_id, axis=0)) != len(row_and_id):
        raise ValueError("segment_layout: a segment id occurs in two separate runs of one row; number "
                         "the examples of a row 1, 2, ... each in one run (minift/data/packing.py)")
    return starts, lengths


class SegmentAttention(Function):
    """Causal attention of packed rows, one segment's own block at a time: outputs and gradients
    equal ``ScaledDotProductAttention`` under ``segment_mask``, for sum of L_seg^2 score cells
    per head instead of T^2 — the saving that FlashAttention's variable-length mode
    (Dao 2023, ``cu_seqlens``) makes on the GPU, here as NumPy batched products.

    Each bucket of ``layout`` is gathered from the flattened (B * T, H, d) tokens into
    (n, H, L, d), attended causally as an ordinary batch (``_attend``), and its real slots are
    scattered back. Every real token lies in exactly one real slot, so the scatter is a plain
    assignment, forward and backward, and padding (segment 0) keeps output 0 and gradient 0.
    The padded slots of a bucket get gradient 0 in backward: their outputs were thrown away.
    Saves: the gathered Q, K, V and P of every bucket.
    """

    @staticmethod
    def forward(ctx, q, k, v, *, layout: SegmentLayout):
        _check_shapes(q, k, v)
        b, hq, t, d = q.shape
        if (b, t) != layout.shape or k.shape[2] != t:
            raise ShapeError(f"segment attention: q {q.shape} and k {k.shape} do not match the "
                             f"(batch, tokens) {layout.shape} of the segment layout; build it from "
                             "this batch's segment_ids")
        ctx.scale, ctx.shapes, ctx.layout = 1.0 / math.sqrt(d), (q.shape, k.shape), layout
        hkv = k.shape[1]
        qf, kf, vf = _flat_tokens(q), _flat_tokens(k), _flat_tokens(v)
        out = xp.zeros_like(qf)
        saved = []
        for bucket in layout.buckets:
            qg = _gather(qf, bucket, hkv)  # (n, Hkv, G, L, d)
            kg, vg = _gather(kf, bucket, hkv), _gather(vf, bucket, hkv)  # (n, Hkv, 1, L, d)
            o, p = _attend(qg, kg, vg, causal_mask(bucket.length, bucket.length), ctx.scale)
            _scatter(out, o, bucket)
            saved += [qg, kg, vg, p]
        ctx.save_for_backward(*saved)
        return _unflat_tokens(out, q.shape)

    @staticmethod
    def backward(ctx, g):
        q_shape, k_shape = ctx.shapes
        shapes, needs = (q_shape, k_shape, k_shape), ctx.needs_input_grad
        grads = [_zero_tokens(shape, g.dtype) if need else None for shape, need in zip(shapes, needs)]
        gf = _flat_tokens(g)
        for i, bucket in enumerate(ctx.layout.buckets):
            qg, kg, vg, p = ctx.saved[4 * i:4 * i + 4]
            go = _gather(gf, bucket, k_shape[1], zero_padded_slots=True)
            for flat, grad in zip(grads, _attend_backward(qg, kg, vg, p, go, ctx.scale, needs)):
                if flat is not None:
                    _scatter(flat, grad, bucket)
        return tuple(None if flat is None else _unflat_tokens(flat, shape) for flat, shape in zip(grads, shapes))


def _flat_tokens(x):
    """x (B, H, T, d) -> its tokens (B * T, H, d), the layout that ``SegmentBucket.index`` indexes."""
    b, h, t, d = x.shape
    return xp.swapaxes(x, 1, 2).reshape(b * t, h, d)


def _zero_tokens(shape, dtype):
    """A zero (B * T, H, d) buffer for the tokens of a (B, H, T, d) array."""
    b, h, t, d = shape
    return xp.zeros((b * t, h, d), dtype=dtype)


def _unflat_tokens(flat, shape):
    """(B * T, H, d) -> (B, H, T, d)."""
    b, h, t, d = shape
    return xp.swapaxes(flat.reshape(b, t, h, d), 1, 2)


def _gather(flat, bucket: SegmentBucket, hkv: int, zero_padded_slots: bool = False):
    """Tokens (B * T, H, d) -> the bucket's segments, grouped (n, Hkv, H / Hkv, L, d)."""
    seg = flat[bucket.index]  # (n, L, H, d), a copy
    if zero_padded_slots:
        seg[~bucket.real] = 0
    n, length = bucket.index.shape
    h, d = flat.shape[1:]
    return xp.swapaxes(seg, 1, 2).reshape(n, hkv, h // hkv, length, d)


def _scatter(flat, seg, bucket: SegmentBucket) -> None:
    """Write the real slots of seg (n, Hkv, [G,] L, d) into their tokens of flat (B * T, H, d)."""
    n, length, d = seg.shape[0], seg.shape[-2], seg.shape[-1]
    flat[bucket.targets] = xp.swapaxes(seg.reshape(n, -1, length, d), 1, 2)[bucket.real]
