"""Attention of packed rows by segment blocks (issue 19) against the reference: full causal
attention under the block-diagonal ``segment_mask``. Outputs and the gradients of q, k and v agree
to 1e-12 in float64 for every row shape that packing makes."""

import numpy as np
import pytest

from minift.autograd import ShapeError, Tensor
from minift.autograd.attention import (
    SEGMENT_QUANTUM,
    ScaledDotProductAttention,
    SegmentAttention,
    segment_layout,
    segment_mask,
)


def runs(*lengths_and_ids):
    """One row from (length, id) runs: runs((3, 1), (2, 0)) -> [1, 1, 1, 0, 0]."""
    return [seg for length, seg in lengths_and_ids for _ in range(length)]


ROWS = {
    "one segment filling the row": [runs((64, 1))],
    "many short segments": [runs((1, 1), (2, 2), (3, 3), (1, 4), (5, 5), (2, 6), (4, 7), (46, 8))],
    "boundaries at chunk edges": [runs((16, 1), (32, 2), (15, 3), (1, 4)), runs((48, 1), (16, 0))],
    "trailing padding": [runs((9, 1), (17, 2), (38, 0)), runs((33, 1), (31, 0))],
    "rows of mixed shapes and an all-padding row": [runs((64, 1)), runs((20, 2), (44, 1)), runs((64, 0)),
                                                     runs((3, 1), (16, 2), (17, 3), (28, 0))],
}


def qkv(batch, tokens, hq, hkv, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, h, tokens, d)) for h in (hq, hkv, hkv)]


def outputs_and_grads(attend, arrays, weights):
    tensors = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    out = attend(*tensors)
    (out * Tensor(weights)).sum().backward()
    return out.data, [t.grad for t in tensors]


def reference(ids):
    mask = segment_mask(np.array(ids))[:, None, None]  # (B, 1, 1, T, T)
    return lambda q, k, v: ScaledDotProductAttention.apply(q, k, v, causal=True, mask=mask)


@pytest.mark.parametrize("quantum", [1, 5, SEGMENT_QUANTUM])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2), (3, 1)])
@pytest.mark.parametrize("case", sorted(ROWS))
def test_segment_blocks_give_the_masked_full_attentions_outputs_and_gradients(case, hq, hkv, quantum):
    ids = np.array(ROWS[case])
    arrays = qkv(ids.shape[0], ids.shape[1], hq, hkv)
    weights = np.random.default_rng(1).normal(size=arrays[0].shape)
    layout = segment_layout(ids, quantum)
    out, grads = outputs_and_grads(lambda q, k, v: SegmentAttention.apply(q, k, v, layout=layout), arrays, weights)
    want_out, want_grads = outputs_and_grads(reference(ids), arrays, weights)
    np.testing.assert_allclose(out, want_out, rtol=0, atol=1e-12)
    for name, grad, want in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(grad, want, rtol=0, atol=1e-12, err_msg=name)
    padding = ids == 0
    assert np.all(out.transpose(0, 2, 1, 3)[padding] == 0)  # padding sees nothing ...
    assert all(np.all(g.transpose(0, 2, 1, 3)[padding] == 0) for g in grads)  # ... and gets no gradient


def test_a_frozen_input_gets_no_gradient_and_the_others_the_reference_ones():
    ids = np.array(ROWS["trailing padding"])
    q, k, v = qkv(*ids.shape, hq=4, hkv=2)
    want = outputs_and_grads(reference(ids), [q, k, v], np.ones_like(q))[1]
    tensors = [Tensor(q), Tensor(k, requires_grad=True), Tensor(v, requires_grad=True)]
    SegmentAttention.apply(*tensors, layout=segment_layout(ids)).sum().backward()
    assert tensors[0].grad is None
    np.testing.assert_allclose(tensors[1].grad, want[1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(tensors[2].grad, want[2], rtol=0, atol=1e-12)


def test_the_layout_puts_every_real_token_in_exactly_one_real_slot():
    ids = np.array(ROWS["rows of mixed shapes and an all-padding row"])
    layout = segment_layout(ids, quantum=16)
    targets = np.concatenate([bucket.targets for bucket in layout.buckets])
    assert sorted(targets.tolist()) == np.flatnonzero(ids.reshape(-1)).tolist()
    assert [b.length for b in layout.buckets] == [16, 32, 48, 64]  # 3 and 16; 17 and 20; 44; 64
    for bucket in layout.buckets:
        assert bucket.length % 16 == 0 or bucket.length == ids.shape[1]
        # a padded slot repeats its segment's last token, so it never reads another segment
        assert np.all(ids.reshape(-1)[bucket.index] == ids.reshape(-1)[bucket.index[:, :1]])


def test_the_blocks_compute_fewer_score_cells_than_the_full_rows():
    ids = np.array(ROWS["many short segments"])
    cells = sum(len(b.index) * b.length ** 2 for b in segment_layout(ids, quantum=1).buckets)
    assert cells == 1 + 4 + 9 + 1 + 25 + 4 + 16 + 46 ** 2 < ids.size * ids.shape[1]


def test_a_segment_id_in_two_runs_and_a_mismatched_batch_are_refused():
    with pytest.raises(ValueError, match="two separate runs of one row"):
        segment_layout(np.array([[1, 1, 2, 1]]))
    q, k, v = qkv(1, 6, 2, 2)
    with pytest.raises(ShapeError, match="build it from this batch's segment_ids"):
        SegmentAttention.apply(q, k, v, layout=segment_layout(np.array([[1, 1, 2, 2, 0]])))
