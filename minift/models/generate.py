"""Text generation: greedy, temperature, top-k and top-p (nucleus) sampling, with a KV cache.

One step: run the model on the tokens it has not seen yet, take the logits of the last
position, turn them into a choice of next token, append it, repeat. The cache
(``KVCache``) makes each step cost one token's work instead of the whole prefix's.
"""

from __future__ import annotations

from collections.abc import Iterator

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
    is tested against. The tokens are ``stream``'s, collected: streaming changes when you see
    them, never which they are.
    """
    ids = _as_rows(input_ids)
    new_tokens = list(stream(model, ids, max_new_tokens, temperature, top_k, top_p, eos_id, seed, use_cache))
    return numpy.stack(new_tokens, axis=1) if new_tokens else numpy.zeros((ids.shape[0], 0), numpy.int64)


def stream(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, eos_id: int | None = None, seed: int = 0,
           use_cache: bool = True) -> Iterator[numpy.ndarray]:
    """``generate`` one step at a time: yields each step's new token per row, (B,) int64, as soon
    as it is chosen, so that a chat can show a reply while it is being written.

    Stop early by closing the generator (``close()``, or leaving a ``for`` loop over it): the
    model goes back to the mode it was in either way.
    """
    ids = _as_rows(input_ids)
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
    pending = ids
    try:
        with no_grad():
            for _ in range(max_new_tokens):
                logits = model(pending if use_cache else ids, cache=cache, last_only=True).data[:, -1]
                token = choose_next(logits, temperature, top_k, top_p, rng)
                if eos_id is not None:
                    token = numpy.where(finished, eos_id, token)
                    finished |= token == eos_id
                yield token
                ids = numpy.concatenate([ids, token[:, None]], axis=1)
                pending = token[:, None]
                if eos_id is not None and finished.all():
                    break
    finally:
        model.train(was_training)


def _as_rows(input_ids) -> numpy.ndarray:
    """``input_ids`` as a (B, T) int64 NumPy array (one prompt may come as a flat list)."""
    ids = numpy.asarray(to_numpy(input_ids), dtype=numpy.int64)
    return ids[None] if ids.ndim == 1 else ids


class TextStream:
    """Turns tokens arriving one at a time into text that is safe to print as it comes.

    A byte-level or BPE token can be part of a character: "é" is two bytes, and an emoji four,
    each byte its own token in a byte-level model. Decoding each token alone would print
    U+FFFD (the replacement character) for every piece. Instead the whole reply so far is
    decoded each time, and only the part after what was already shown is returned — minus a
    trailing U+FFFD, which may be a character still arriving. ``finish`` returns what was held
    back. ``tokenizer`` is any object with ``decode(ids, skip_special=...)``.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token: int) -> str:
        """Add one token; return the new complete text (possibly "")."""
        self.ids.append(int(token))
        return self._advance(self._decoded().rstrip("\ufffd"))

    def finish(self) -> str:
        """The rest of the text, incomplete characters included (as U+FFFD): the reply is over."""
        return self._advance(self._decoded())

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special=True)

    def _advance(self, text: str) -> str:
        new = text[len(self.shown):]  # decoding more bytes only ever extends the text shown
        self.shown += new
        return new
