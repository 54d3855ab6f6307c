"""``token_logprob`` picks its top k with a partition, then sorts only those k: the result must
be what a stable sort of the whole vocabulary gives, ties (the smaller id first) included."""

import numpy as np
import pytest

from minift.serve.engine import token_logprob, top_k


def full_sort_reference(logits, token, k):
    """The plain way: a float64 log-softmax and a stable argsort of all V log-probabilities."""
    z = logits.astype(np.float64)
    logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
    best = np.argsort(-logp, kind="stable")[:k]
    return float(logp[token]), [(int(i), float(logp[i])) for i in best]


def logits_with_ties(rng, vocab):
    """Random logits drawn from a few values only, so most ranks (the k-th one too) are tied."""
    return rng.choice(rng.normal(size=5), size=vocab).astype(np.float32)


@pytest.mark.parametrize("draw", [lambda rng, v: rng.normal(size=v).astype(np.float32), logits_with_ties],
                         ids=["distinct", "ties"])
@pytest.mark.parametrize("vocab", [1, 2, 7, 64])
def test_the_top_k_equals_a_stable_full_sort_for_every_k(draw, vocab):
    rng = np.random.default_rng(vocab)
    for _ in range(20):
        logits = draw(rng, vocab)
        token = int(rng.integers(vocab))
        for k in sorted({0, 1, vocab // 2, vocab - 1, vocab, vocab + 3}):
            got = token_logprob(logits, token, k)
            logprob, top = full_sort_reference(logits, token, k)
            assert got.token == token and got.logprob == logprob
            assert got.top == top  # same ids, same order, same floats


def test_ties_at_the_cut_go_to_the_smaller_ids():
    scores = np.array([0.0, 2.0, 1.0, 2.0, 1.0, 1.0, 3.0])
    assert top_k(scores, 1).tolist() == [6]
    assert top_k(scores, 2).tolist() == [6, 1]
    assert top_k(scores, 4).tolist() == [6, 1, 3, 2]  # three 1.0s compete for one place: id 2
    assert top_k(scores, 5).tolist() == [6, 1, 3, 2, 4]
    assert top_k(scores, 0).tolist() == []
    assert top_k(scores, 7).tolist() == [6, 1, 3, 2, 4, 5, 0]
