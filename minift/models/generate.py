"""Text generation: greedy, temperature, top-k and top-p (nucleus) sampling, with a KV cache.

One step: run the model on the tokens it has not seen yet, take the logits of the last
position, turn them into a choice of next token, append it, repeat. The cache
(``KVCache``) makes each step cost one token's work instead of the whole prefix's.
"""

from __future__ import annotations

import numpy

from minift.autograd import no_grad
from minift.backend import to_numpy
from minift.models.llama import KVCache


def filter_logits(logits: numpy.ndarray, top_k: int | None = None, top_p: float | None = None):
    """Set to -inf every logit outside the top-k and outside the top-p nucleus (per row).

    top-p keeps the smallest set of most-likely tokens whose probabilities add up to at least
    ``top_p`` (Holtzman et al. 2020); the most likely token always stays.
    """
    logits = logits.astype(numpy.float64, copy=True)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = numpy.sort(logits, axis=-1)[:, -top_k][:, None]
        logits[logits < kth] = -numpy.inf
    if top_p is not None and top_p < 1.0:
        order = numpy.argsort(-logits, axis=-1)
        sorted_logits = numpy.take_along_axis(logits, order, axis=-1)
        probs = numpy.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        before = numpy.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop = numpy.zeros_like(drop_sorted)
        numpy.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits[drop] = -numpy.inf
    return logits


def choose_next(logits, temperature: float, top_k, top_p, rng: numpy.random.Generator):
    """Next token per row: argmax when ``temperature == 0``, else a sample from the filtered
    softmax(logits / temperature)."""
    logits = to_numpy(logits).astype(numpy.float64)
    if temperature == 0:
        return logits.argmax(axis=-1)
    filtered = filter_logits(logits / temperature, top_k, top_p)
    probs = numpy.exp(filtered - filtered.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return numpy.array([rng.choice(probs.shape[-1], p=row) for row in probs])


def generate(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None, seed: int = 0,
             use_cache: bool = True) -> numpy.ndarray:
    """Append up to ``max_new_tokens`` tokens to each row of ``input_ids`` (B, T).

    Returns the new tokens only, (B, n) int64; a row that produced ``eos_id`` is padded with it
    from then on, and generation stops once every row has finished. ``use_cache=False`` runs
    the whole sequence through the model at every step — slower, and the reference the cache
    is tested against.
    """
    ids = numpy.asarray(to_numpy(input_ids), dtype=numpy.int64)
    if ids.ndim == 1:
        ids = ids[None]
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    total = ids.shape[1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"context length {model.config.max_seq_len}")
    rng = numpy.random.default_rng(seed)
    was_training = model.training
    model.eval()
    cache = KVCache(model.config, ids.shape[0], total, model.dtype) if use_cache else None
    finished = numpy.zeros(ids.shape[0], dtype=bool)
    new_tokens = []
    pending = ids
    with no_grad():
        for _ in range(max_new_tokens):
            logits = model(pending if use_cache else ids, cache=cache, last_only=True).data[:, -1]
            token = choose_next(logits, temperature, top_k, top_p, rng)
            if eos_id is not None:
                token = numpy.where(finished, eos_id, token)
                finished |= token == eos_id
            new_tokens.append(token)
            ids = numpy.concatenate([ids, token[:, None]], axis=1)
            pending = token[:, None]
            if eos_id is not None and finished.all():
                break
    model.train(was_training)
    return numpy.stack(new_tokens, axis=1) if new_tokens else numpy.zeros((ids.shape[0], 0), numpy.int64)
