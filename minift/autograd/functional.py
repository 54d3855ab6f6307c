"""The user-facing ops: plain functions over Tensors, each backed by one autograd Function.

``import minift.autograd.functional as F`` then ``F.softmax(x)``, ``F.cross_entropy(logits, targets)``...
Each function here only validates and forwards; the math and its backward live in
``minift/autograd`` (one screen per op).
"""

from __future__ import annotations

import numbers

from minift.autograd import attention as _attn
from minift.autograd import checkpointing as _checkpointing
from minift.autograd import elementwise as _ew
from minift.autograd import nn_ops as _nn
from minift.autograd import reduce as _red
from minift.autograd import shape as _shape
from minift.autograd.tensor import Tensor, as_tensor
from minift.backend import xp

rope_tables = _nn.rope_tables
IGNORE_INDEX = _nn.IGNORE_INDEX
causal_mask = _attn.causal_mask
segment_layout = _attn.segment_layout
SegmentLayout = _attn.SegmentLayout


def _raw(value):
    return value.data if isinstance(value, Tensor) else value


def _lift(value, like: Tensor):
    """A Python number becomes a constant of ``like``'s dtype (so float32 stays float32)."""
    if isinstance(value, numbers.Number):
        return Tensor(xp.asarray(value, dtype=like.dtype))
    return value


# ---- arithmetic -------------------------------------------------------------------------
def add(a, b):
    a = as_tensor(a)
    return _ew.Add.apply(a, _lift(b, a))


def sub(a, b):
    a = as_tensor(a)
    return _ew.Sub.apply(a, _lift(b, a))


def mul(a, b):
    a = as_tensor(a)
    return _ew.Mul.apply(a, _lift(b, a))


def div(a, b):
    a = as_tensor(a)
    return _ew.Div.apply(a, _lift(b, a))


def neg(x):
    return _ew.Neg.apply(x)


def pow(x, exponent: float):  # noqa: A001 - mirrors the operator's name
    if not isinstance(exponent, numbers.Number):
        raise TypeError("pow: the exponent must be a number (tensor exponents are not supported)")
    return _ew.Pow.apply(x, exponent=exponent)


def exp(x):
    return _ew.Exp.apply(x)


def log(x):
    return _ew.Log.apply(x)


def sqrt(x):
    return _ew.Sqrt.apply(x)


def rsqrt(x):
    return _ew.Rsqrt.apply(x)


def matmul(a, b):
    return _ew.MatMul.apply(a, b)


def linear(x, weight, bias=None):
    """x W^T + b with W of shape (out_features, in_features)."""
    return _ew.Linear.apply(x, weight) if bias is None else _ew.Linear.apply(x, weight, bias)


# ---- shapes -----------------------------------------------------------------------------
def reshape(x, *shape):
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return _shape.Reshape.apply(x, shape=shape)


def permute(x, *axes):
    axes = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
    return _shape.Permute.apply(x, axes=axes)


def transpose(x, axis0: int = -2, axis1: int = -1):
    """Swap two axes (the last two by default)."""
    axes = list(range(x.ndim))
    axes[axis0], axes[axis1] = axes[axis1], axes[axis0]
    return _shape.Permute.apply(x, axes=tuple(axes))


def getitem(x, index):
    if isinstance(index, tuple):
        index = tuple(_raw(i) for i in index)
    else:
        index = _raw(index)
    return _shape.GetItem.apply(x, index=index)


def concatenate(tensors, axis: int = 0):
    return _shape.Concatenate.apply(*tensors, axis=axis)


def stack(tensors, axis: int = 0):
    return _shape.Stack.apply(*tensors, axis=axis)


# ---- reductions -------------------------------------------------------------------------
def sum(x, axis=None, keepdims=False):  # noqa: A001
    return _red.Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    return _red.Mean.apply(x, axis=axis, keepdims=keepdims)


def max(x, axis=None, keepdims=False):  # noqa: A001
    return _red.Max.apply(x, axis=axis, keepdims=keepdims)


# ---- neural-network ops -----------------------------------------------------------------
def softmax(x, axis: int = -1):
    return _nn.Softmax.apply(x, axis=axis)


def log_softmax(x, axis: int = -1):
    return _nn.LogSoftmax.apply(x, axis=axis)


def cross_entropy(logits, targets, ignore_index: int = _nn.IGNORE_INDEX):
    """Mean cross-entropy of (..., V) logits against (...) integer targets.

    Positions whose target is ``ignore_index`` (prompt tokens, padding) are left out of both
    the sum and the count — the loss mask of instruction tuning.
    """
    targets = xp.asarray(_raw(targets))
    if logits.shape[:-1] != targets.shape:
        raise _ew.ShapeError(
            f"cross_entropy: logits {logits.shape} need targets of shape {logits.shape[:-1]}, "
            f"got {targets.shape}"
        )
    flat = reshape(logits, -1, logits.shape[-1]) if logits.ndim != 2 else logits
    return _nn.CrossEntropy.apply(flat, targets=targets.reshape(-1), ignore_index=ignore_index)


def log_sigmoid(x):
    """log(sigmoid(x)), stable for any x (the DPO loss is ``-log_sigmoid(beta * margin)``)."""
    return _nn.LogSigmoid.apply(x)


def token_logprobs(logits, targets, ignore_index: int = _nn.IGNORE_INDEX):
    """log p(target) of (..., V) logits at every (...) position; 0 where the target is
    ``ignore_index``. Summed over a response it is the sequence log-probability DPO compares."""
    targets = xp.asarray(_raw(targets))
    if logits.shape[:-1] != targets.shape:
        raise _ew.ShapeError(f"token_logprobs: logits {logits.shape} need targets of shape "
                             f"{logits.shape[:-1]}, got {targets.shape}")
    flat = reshape(logits, -1, logits.shape[-1]) if logits.ndim != 2 else logits
    picked = _nn.TokenLogProbs.apply(flat, targets=targets.reshape(-1), ignore_index=ignore_index)
    return reshape(picked, *targets.shape) if targets.ndim != 1 else picked


def linear_token_logprobs(h, weight, targets, ignore_index: int = _nn.IGNORE_INDEX,
                          chunk_elements: int = _nn.CHUNK_ELEMENTS):
    """log softmax(h W^T)[target] at every (...) position of (..., C) features ``h``, for a
    (V, C) head ``weight``; 0 where the target is ``ignore_index``. Equal to
    ``token_logprobs(linear(h, weight), targets)``, but the (..., V) logits are never whole: the
    head is applied over the vocabulary in chunks of about ``chunk_elements`` logits
    (``LinearTokenLogProbs``)."""
    targets = xp.asarray(_raw(targets))
    if h.shape[:-1] != targets.shape:
        raise _ew.ShapeError(f"linear_token_logprobs: features {h.shape} need targets of shape "
                             f"{h.shape[:-1]}, got {targets.shape}")
    flat = reshape(h, -1, h.shape[-1]) if h.ndim != 2 else h
    picked = _nn.LinearTokenLogProbs.apply(flat, weight, targets=targets.reshape(-1), ignore_index=ignore_index,
                                           chunk_elements=chunk_elements)
    return reshape(picked, *targets.shape) if targets.ndim != 1 else picked


def linear_cross_entropy(h, weight, targets, ignore_index: int = _nn.IGNORE_INDEX,
                         chunk_elements: int = _nn.CHUNK_ELEMENTS):
    """Mean next-token loss of the head ``weight`` over features ``h``: equal to
    ``cross_entropy(linear(h, weight), targets)`` without the N x V logits (see
    ``linear_token_logprobs``); the mean is over the counted (non-ignored) positions."""
    n_counted = int((xp.asarray(_raw(targets)) != ignore_index).sum())
    logprobs = linear_token_logprobs(h, weight, targets, ignore_index, chunk_elements)
    return sum(logprobs) * (-1.0 / (n_counted or 1))


def rms_norm(x, weight, eps: float = 1e-6):
    return _nn.RMSNorm.apply(x, weight, eps=eps)


def layer_norm(x, weight, bias, eps: float = 1e-5):
    return _nn.LayerNorm.apply(x, weight, bias, eps=eps)


def silu(x):
    return _nn.SiLU.apply(x)


def swiglu(gate, up):
    """silu(gate) * up in one op (Llama's MLP); equal to ``silu(gate) * up``, with less memory."""
    return _nn.SwiGLU.apply(gate, up)


def gelu(x, approximate: str = "tanh"):
    if approximate not in ("tanh", "none"):
        raise ValueError(f"gelu: approximate must be 'tanh' or 'none', got {approximate!r}")
    return _nn.GELU.apply(x, approximate=approximate)


def dropout(x, p: float, rng, training: bool = True):
    """Zero each element with probability ``p`` (and rescale the rest) when ``training``.

    ``rng`` is a ``numpy.random.Generator`` (``numpy.random.default_rng(seed)``, on either backend): the
    same seed gives the same masks, which keeps training runs reproducible and resumable.
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    _checkpointing.note_generator(rng)  # a checkpointed block's recompute must draw this same mask
    return _nn.Dropout.apply(x, p=p, rng=rng)


def embedding(ids, weight):
    """Rows of ``weight`` (V, D) picked by integer ``ids`` of any shape -> (*ids.shape, D)."""
    ids = xp.asarray(_raw(ids))
    if not xp.issubdtype(ids.dtype, xp.integer):
        raise TypeError(f"embedding: token ids must be integers, got {ids.dtype}")
    return _nn.Embedding.apply(weight, ids=ids)


def rope(x, cos, sin):
    """Rotate (..., T, head_dim) queries or keys by their positions' angles."""
    return _nn.RoPE.apply(x, cos=_raw(cos), sin=_raw(sin))


def scaled_dot_product_attention(q, k, v, causal: bool = True, mask=None):
    """Attention of q (B, Hq, Tq, d) over k, v (B, Hkv, Tk, d); returns (B, Hq, Tq, d).

    ``mask`` (optional, True = may attend) is either a key-padding mask (B, Tk) or a full
    (B, Tq, Tk) mask; it is combined with the causal mask.
    """
    if mask is not None:
        mask = xp.asarray(_raw(mask), dtype=bool)
        if mask.ndim == 2:  # (B, Tk): every query sees the same keys
            mask = mask[:, None, :]
        mask = mask[:, None, None]  # (B, 1, 1, Tq or 1, Tk)
    return _attn.ScaledDotProductAttention.apply(q, k, v, causal=causal, mask=mask)


def segment_attention(q, k, v, layout):
    """Causal attention of packed rows, each segment over its own tokens only: equal to
    ``scaled_dot_product_attention`` under the block-diagonal ``segment_mask``, computed over the
    diagonal blocks alone (``layout`` from ``segment_layout``, once per batch)."""
    return _attn.SegmentAttention.apply(q, k, v, layout=layout)
