"""The fused ops of a transformer: softmax, losses, norms, activations, dropout, embedding, RoPE.

"Fused" means one Function computes what would otherwise be a chain of small ops, with a
closed-form backward. That is both faster (fewer temporaries) and easier to read next to the
math than a graph of ten primitive nodes. Each formula is checked against finite differences in
tests/autograd/test_gradcheck.py.

Shapes: ``N`` rows, ``D`` features (the last axis), ``V`` vocabulary size.

The ops a training step spends most non-matmul time in (RMSNorm, SwiGLU, RoPE, the fused head)
compute through a ``_..._rows`` function that does one block of rows; ``over_row_blocks``
(minift/autograd/parallel.py) runs it on all rows at once or on row blocks side by side, with
the same bits either way. Reductions over rows (a norm's weight gradient) stay outside it.
"""

from __future__ import annotations

import functools
import math

from minift.autograd.elementwise import ShapeError, counted_matmul
from minift.autograd.function import Function, is_grad_enabled
from minift.autograd.parallel import over_row_blocks
from minift.backend import xp

#: The target that cross-entropy leaves out of the loss (prompt tokens, padding): PyTorch's value.
IGNORE_INDEX = -100


def _logsumexp(x, axis=-1):
    """log(sum(exp(x))) computed as m + log(sum(exp(x - m))) with m = max(x): no overflow."""
    m = xp.max(x, axis=axis, keepdims=True)
    return m + xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True))


class Softmax(Function):
    """y_i = exp(x_i) / sum_j exp(x_j) along ``axis``.

    dx = y * (g - sum(g * y)) — the Jacobian diag(y) - y y^T applied to g. Saves: y.
    """

    @staticmethod
    def forward(ctx, x, *, axis=-1):
        y = xp.exp(x - _logsumexp(x, axis))
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved
        return (y * (g - xp.sum(g * y, axis=ctx.axis, keepdims=True)),)


class LogSoftmax(Function):
    """y = x - logsumexp(x) along ``axis``.  dx = g - softmax(x) * sum(g).  Saves: y."""

    @staticmethod
    def forward(ctx, x, *, axis=-1):
        y = x - _logsumexp(x, axis)
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved
        return (g - xp.exp(y) * xp.sum(g, axis=ctx.axis, keepdims=True),)


class CrossEntropy(Function):
    """Mean next-token loss over the counted rows: L = mean_n [logsumexp(z_n) - z_n[t_n]].

    ``logits`` is (N, V), ``targets`` (N,) integers. Rows whose target equals ``ignore_index``
    (prompt tokens in instruction tuning, padding) count for nothing — neither in the sum nor in
    the mean's denominator. Fused and stable: logsumexp subtracts the row max first.

        dz_n = (softmax(z_n) - onehot(t_n)) * g / n_counted   for counted rows, 0 otherwise

    Saves: the softmax probabilities (N x V, turned into dz in place during backward unless the
    graph is retained), the targets, and the count. If every row is ignored the loss is 0 with a
    zero gradient.
    """

    @staticmethod
    def forward(ctx, logits, *, targets, ignore_index=IGNORE_INDEX):
        if logits.ndim != 2 or targets.shape != logits.shape[:1]:
            raise ShapeError(
                f"cross_entropy: logits must be (N, V) and targets (N,); got logits "
                f"{logits.shape} and targets {targets.shape}"
            )
        counted = targets != ignore_index
        safe_targets = xp.where(counted, targets, 0)
        lowest, highest = int(xp.min(safe_targets, initial=0)), int(xp.max(safe_targets, initial=0))
        if lowest < 0 or highest >= logits.shape[1]:
            raise ValueError(f"cross_entropy: a target is outside the vocabulary [0, {logits.shape[1]})")
        # One N x V buffer for everything (at 512 tokens x 49k words that is 100 MB; the plain
        # logsumexp + exp would make three): shift by the row max, exponentiate in place,
        # normalise in place. With s = z - max(z): loss = log(sum(exp(s))) - s[t].
        shifted = logits - logits.max(axis=1, keepdims=True)
        rows = xp.arange(logits.shape[0])
        picked = shifted[rows, safe_targets]
        probs = xp.exp(shifted, out=shifted)
        total = probs.sum(axis=1, keepdims=True)
        per_row = (xp.log(total[:, 0]) - picked) * counted
        probs /= total
        n_counted = int(counted.sum())
        ctx.save_for_backward(probs, safe_targets, counted)
        ctx.n_counted = n_counted
        return xp.asarray(per_row.sum() / max(n_counted, 1), dtype=logits.dtype)

    @staticmethod
    def backward(ctx, g):
        probs, targets, counted = ctx.saved
        # Reuse the saved N x V buffer when the graph frees it right after this call; a retained
        # graph needs the probabilities intact for its next backward.
        dz = probs if ctx.saved_is_scratch else probs.copy()
        dz[xp.arange(dz.shape[0]), targets] -= 1
        dz *= (counted * (g / max(ctx.n_counted, 1)))[:, None].astype(dz.dtype)
        return (dz,)


class LogSigmoid(Function):
    """y = log sigmoid(x) = -log(1 + exp(-x)), computed as min(x, 0) - log1p(exp(-|x|)) so that
    neither a large positive nor a large negative x overflows (the DPO loss is -log sigmoid).

    dx = g * sigmoid(-x) = g * exp(-|x|) / (1 + exp(-|x|)) for x >= 0, g / (1 + exp(x)) below.
    Saves: x.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return xp.minimum(x, 0) - xp.log1p(xp.exp(-xp.abs(x)))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        e = xp.exp(-xp.abs(x))  # <= 1: sigmoid(-x) without overflow on either side
        return (g * xp.where(x >= 0, e, 1.0) / (1 + e),)


class TokenLogProbs(Function):
    """Per-row log-probability of the target: y_n = z_n[t_n] - logsumexp(z_n), 0 on ignored rows.

    What sequence-level objectives need (DPO sums it over a response: log pi(y|x) =
    sum_t log p(y_t | x, y_<t)). It equals ``log_softmax(z)[n, t_n]`` but never keeps the N x V
    log-probabilities in the graph, only the probabilities the backward needs anyway:

        dz_n = g_n * (onehot(t_n) - softmax(z_n))   for counted rows, 0 otherwise

    Saves: the softmax probabilities (N x V), the targets and the counted mask.
    """

    @staticmethod
    def forward(ctx, logits, *, targets, ignore_index=IGNORE_INDEX):
        if logits.ndim != 2 or targets.shape != logits.shape[:1]:
            raise ShapeError(f"token_logprobs: logits must be (N, V) and targets (N,); got logits "
                             f"{logits.shape} and targets {targets.shape}")
        counted = targets != ignore_index
        safe_targets = xp.where(counted, targets, 0)
        if int(xp.min(safe_targets, initial=0)) < 0 or int(xp.max(safe_targets, initial=0)) >= logits.shape[1]:
            raise ValueError(f"token_logprobs: a target is outside the vocabulary [0, {logits.shape[1]})")
        shifted = logits - logits.max(axis=1, keepdims=True)
        picked = shifted[xp.arange(logits.shape[0]), safe_targets]
        probs = xp.exp(shifted, out=shifted)
        total = probs.sum(axis=1, keepdims=True)
        probs /= total
        ctx.save_for_backward(probs, safe_targets, counted)
        return ((picked - xp.log(total[:, 0])) * counted).astype(logits.dtype)

    @staticmethod
    def backward(ctx, g):
        probs, targets, counted = ctx.saved
        dz = probs if ctx.saved_is_scratch else probs.copy()
        dz[xp.arange(dz.shape[0]), targets] -= 1
        dz *= -(counted * g)[:, None].astype(dz.dtype)
        return (dz,)


#: Logits alive at once in the fused head + loss: 2^21 floats, 8 MiB in float32.
CHUNK_ELEMENTS = 2**21


class LinearTokenLogProbs(Function):
    """The output head and its log-softmax in one op, over the vocabulary in column chunks:
    y_n = log softmax(h_n W^T)[t_n], 0 on ignored rows, without ever holding the N x V logits.

    The head's logits are the largest activation of a small model's step (SmolLM2: 512 tokens x
    49,152 words = 96 MiB, and as much again for the probabilities the backward needs). Here W
    (V, C) is read in chunks of columns; each chunk's logits z_c = h W_c^T live only while it is
    processed. Two running sums, rescaled whenever a row's maximum grows (the online softmax of
    Milakov & Gimelshein 2018, which FlashAttention applies to keys), give everything:

        m_n = max over chunks so far,  s_n = sum_v exp(z_nv - m_n)      -> logsumexp = m_n + log s_n
        a_n = sum_v exp(z_nv - m_n) W_v                                  -> E_p[W] = a_n / s_n

    Since dy_n/dh_n = W[t_n] - E_p[W] does not depend on the incoming gradient, it is finished in
    the forward (for a frozen head that is the whole backward: the same products as logits then
    dz W, and no recompute). A trainable head (full fine-tuning, a tied embedding being trained)
    needs dW = sum_n g_n (onehot(t_n) - p_n)^T h_n, so the backward recomputes each chunk's
    probabilities from h and the saved logsumexp: one extra N x V x C product instead of
    keeping N x V numbers.

    A 16-bit head (a frozen tied embedding stored in bf16/f16) is widened one chunk at a time.
    Saves: dy/dh (N x C) if h needs a gradient; h, W and the logsumexp if W does; the targets.
    """

    @staticmethod
    def forward(ctx, h, weight, *, targets, ignore_index=IGNORE_INDEX, chunk_elements=CHUNK_ELEMENTS):
        if h.ndim != 2 or weight.ndim != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
            raise ShapeError(f"linear_token_logprobs: need h (N, C), weight (V, C) and targets (N,); got "
                             f"h {h.shape}, weight {weight.shape}, targets {targets.shape}")
        counted = targets != ignore_index
        safe_targets = xp.where(counted, targets, 0)
        vocab = weight.shape[0]
        if int(xp.min(safe_targets, initial=0)) < 0 or int(xp.max(safe_targets, initial=0)) >= vocab:
            raise ValueError(f"linear_token_logprobs: a target is outside the vocabulary [0, {vocab})")
        want_dh = ctx.needs_input_grad[0] and is_grad_enabled()
        width = vocab_chunk(h.shape[0], vocab, chunk_elements)
        lse, picked, expected = _online_logsumexp(h, weight, safe_targets, width, want_dh)
        dy_dh = None
        if want_dh:
            dy_dh = xp.asarray(weight[safe_targets], dtype=h.dtype) - expected
            dy_dh *= counted[:, None]
        need_w = ctx.needs_input_grad[1]
        ctx.save_for_backward(dy_dh, h if need_w else None, weight if need_w else None,
                              lse if need_w else None, safe_targets, counted)
        ctx.width = width
        return ((picked - lse) * counted).astype(h.dtype)

    @staticmethod
    def backward(ctx, g):
        dy_dh, h, weight, lse, targets, counted = ctx.saved
        dh = dy_dh * g[:, None].astype(dy_dh.dtype) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            row_weight = (g * counted).astype(h.dtype)  # g_n on counted rows, 0 elsewhere
            dw = xp.zeros(weight.shape, dtype=weight.dtype)
            for start in range(0, weight.shape[0], ctx.width):
                w = xp.asarray(weight[start:start + ctx.width], dtype=h.dtype)
                p = counted_matmul(h, w.T)
                over_row_blocks(_head_probs_rows, p, lse, row_weight)
                dw[start:start + w.shape[0]] = counted_matmul(p.T, h)
                del p  # as in the forward: one chunk of probabilities at a time
            xp.add.at(dw, targets, row_weight[:, None] * h)  # + g_n h_n at each target word
        return dh, dw


def vocab_chunk(rows: int, vocab: int, chunk_elements: int) -> int:
    """Columns per chunk: about ``chunk_elements`` logits at a time (the default 2^21 floats is
    8 MiB in float32: 4096 columns for a 4 x 128 batch, wide enough for a good BLAS shape)."""
    return max(1, min(vocab, chunk_elements // max(rows, 1)))


def _online_logsumexp(h, weight, targets, width: int, want_expected: bool):
    """One pass over the vocabulary in ``width``-column chunks -> (logsumexp, z[t], E_p[W]).

    ``E_p[W]`` (N, C), the probability-weighted mean of W's rows, is computed only when wanted."""
    n = h.shape[0]
    running_max = xp.full(n, -xp.inf, dtype=h.dtype)
    total = xp.zeros(n, dtype=h.dtype)
    picked = xp.zeros(n, dtype=h.dtype)
    weighted = xp.zeros(h.shape, dtype=h.dtype) if want_expected else None
    for start in range(0, weight.shape[0], width):
        w = xp.asarray(weight[start:start + width], dtype=h.dtype)
        z = counted_matmul(h, w.T)  # (N, chunk): this chunk's logits, the only ones alive
        here = (targets >= start) & (targets < start + w.shape[0])
        picked[here] = z[here, targets[here] - start]
        new_max, chunk_total = xp.empty_like(running_max), xp.empty_like(total)
        over_row_blocks(_exp_shifted_rows, z, running_max, new_max, chunk_total)  # z: exp(z - m')
        rescale = xp.exp(running_max - new_max)  # 0 on the first chunk (exp(-inf))
        total = total * rescale + chunk_total
        if want_expected:
            weighted *= rescale[:, None]
            weighted += counted_matmul(z, w)
        running_max = new_max
        del z  # free this chunk's logits before the next product allocates its own
    lse = running_max + xp.log(total)
    return lse, picked, (weighted / total[:, None] if want_expected else None)


def _exp_shifted_rows(z, running_max, new_max, row_total) -> None:
    """One chunk's step of the online softmax on a block of rows: the new running maximum
    m' = max(m, max_v z_v), z turned in place into exp(z - m'), and its row sums."""
    xp.maximum(running_max, z.max(axis=1), out=new_max)
    z -= new_max[:, None]
    xp.exp(z, out=z)
    z.sum(axis=1, out=row_total)


def _head_probs_rows(p, lse, row_weight) -> None:
    """Logits p of a block of rows -> -g_n p_n in place, p_n = exp(z_n - logsumexp_n): the
    softmax part of the trainable head's dW."""
    p -= lse[:, None]
    xp.exp(p, out=p)
    p *= -row_weight[:, None]


class RMSNorm(Function):
    """y = x / rms(x) * w, with rms(x) = sqrt(mean(x^2) + eps) over the last axis (Llama's norm).

    With r = 1/rms(x), xh = x r and dxh = g w:
        dw = sum over rows of g * xh
        dx = r * (dxh - xh * mean(dxh * xh))
    Saves: x and r (one number per row); xh is recomputed. y and dx are computed over row
    blocks (``_rms_norm_rows``, ``_rms_norm_backward_rows``); dw, a sum over rows, is not.
    """

    @staticmethod
    def forward(ctx, x, weight, *, eps):
        if weight.shape != x.shape[-1:]:
            raise ShapeError(f"rms_norm: weight {weight.shape} does not fit input {x.shape}")
        y = xp.empty(x.shape, dtype=xp.result_type(x, weight))
        r = xp.empty((*x.shape[:-1], 1), dtype=x.dtype)
        over_row_blocks(functools.partial(_rms_norm_rows, weight=weight, eps=eps),
                        _rows(y), _rows(r), _rows(x))
        ctx.save_for_backward(x, r, weight)
        return y

    @staticmethod
    def backward(ctx, g):
        x, r, weight = ctx.saved
        dw = (g * (x * r)).reshape(-1, x.shape[-1]).sum(axis=0) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dx = xp.empty(x.shape, dtype=xp.result_type(x, g, weight))
            over_row_blocks(functools.partial(_rms_norm_backward_rows, weight=weight),
                            _rows(dx), _rows(x), _rows(r), _rows(g))
        return dx, dw


def _rows(a):
    """(..., D) -> (rows, D), a 0-d array -> (1, 1): a view of a contiguous array (the ops'
    outputs), a copy otherwise."""
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1]) if a.ndim else a.reshape(1, 1)


def _rms_norm_rows(y, r, x, *, weight, eps) -> None:
    """RMSNorm's forward on a block of rows: r = 1 / rms(x), y = x r w."""
    r[...] = 1 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)
    xp.multiply(x, r, out=y)
    y *= weight


def _rms_norm_backward_rows(dx, x, r, g, *, weight) -> None:
    """RMSNorm's dx on a block of rows: r (dxh - xh mean(dxh xh)), xh = x r, dxh = g w."""
    xh = x * r
    dxh = g * weight
    xp.multiply(r, dxh - xh * xp.mean(dxh * xh, axis=-1, keepdims=True), out=dx)


class LayerNorm(Function):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last axis.

    With s = 1/sqrt(var + eps), xh = (x - mean) s and dxh = g w:
        dw = sum of g * xh,  db = sum of g  (over rows)
        dx = s * (dxh - mean(dxh) - xh * mean(dxh * xh))
    Saves: xh and s.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, *, eps):
        if weight.shape != x.shape[-1:] or bias.shape != x.shape[-1:]:
            raise ShapeError(f"layer_norm: weight {weight.shape} / bias {bias.shape} vs input {x.shape}")
        mu = xp.mean(x, axis=-1, keepdims=True)
        s = 1 / xp.sqrt(xp.var(x, axis=-1, keepdims=True) + eps)
        xh = (x - mu) * s
        ctx.save_for_backward(xh, s, weight)
        return xh * weight + bias

    @staticmethod
    def backward(ctx, g):
        xh, s, weight = ctx.saved
        rows = (-1, xh.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dxh = g * weight
            dx = s * (dxh - dxh.mean(axis=-1, keepdims=True) - xh * (dxh * xh).mean(axis=-1, keepdims=True))
        if ctx.needs_input_grad[1]:
            dw = (g * xh).reshape(rows).sum(axis=0)
        if ctx.needs_input_grad[2]:
            db = g.reshape(rows).sum(axis=0)
        return dx, dw, db


class SiLU(Function):
    """y = x * sigmoid(x) (a.k.a. swish; the gate of SwiGLU).

    dx = g * s * (1 + x (1 - s)), s = sigmoid(x). Saves: x.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x / (1 + xp.exp(-x))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        s = 1 / (1 + xp.exp(-x))
        return (g * s * (1 + x * (1 - s)),)


class SwiGLU(Function):
    """y = silu(gate) * up, the gated product of Llama's MLP (Shazeer 2020), as one op.

    With s = sigmoid(gate):
        d_up   = g * silu(gate)
        d_gate = g * up * s * (1 + gate (1 - s))
    The same numbers as ``silu(gate) * up`` built from two ops (tests/autograd/test_gradcheck.py
    checks both), but that pair saves three (B, T, ffn) arrays — gate, silu(gate) and up — and
    makes two passes; this saves two and recomputes s in backward. In SmolLM2 at 4 x 128 tokens
    that is 94 MB less memory per step. Saves: gate and up. Both directions run over row blocks
    (``_swiglu_rows``, ``_swiglu_backward_rows``).
    """

    @staticmethod
    def forward(ctx, gate, up):
        if gate.shape != up.shape:
            raise ShapeError(f"swiglu: gate {gate.shape} and up {up.shape} must have the same shape")
        ctx.save_for_backward(gate, up)
        y = xp.empty(gate.shape, dtype=gate.dtype)
        over_row_blocks(_swiglu_rows, _rows(y), _rows(gate), _rows(up))
        return y

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved
        d_gate, d_up = (xp.empty(gate.shape, dtype=gate.dtype) if need else None
                        for need in ctx.needs_input_grad[:2])
        over_row_blocks(_swiglu_backward_rows, *(None if a is None else _rows(a) for a in (d_gate, d_up)),
                        _rows(gate), _rows(up), _rows(g))
        return d_gate, d_up


def _swiglu_rows(y, gate, up) -> None:
    """y = silu(gate) * up = gate / (1 + exp(-gate)) * up on a block of rows, in place in y."""
    xp.negative(gate, out=y)
    xp.exp(y, out=y)
    y += 1
    xp.divide(gate, y, out=y)
    y *= up


def _swiglu_backward_rows(d_gate, d_up, gate, up, g) -> None:
    """SwiGLU's gradients on a block of rows, into d_gate and d_up (None: not wanted). In place
    wherever the formula allows: silu is built in d_up's rows and scaled last, so one scratch
    array (s) of the block's size is all it adds, the step's largest when a checkpointed block
    is recomputed."""
    s = xp.negative(gate)
    xp.exp(s, out=s)
    s += 1
    xp.reciprocal(s, out=s)  # sigmoid(gate)
    silu = gate * s if d_up is None else xp.multiply(gate, s, out=d_up)
    if d_gate is not None:
        xp.subtract(1, silu, out=d_gate)  # d silu / d gate = s (1 + gate (1 - s))
        d_gate *= s                       #                 = s (1 - silu) + silu
        d_gate += silu
        d_gate *= up
        d_gate *= g
    if d_up is not None:
        d_up *= g


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def _erf(x):
    """erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): NumPy has no erf of its own."""
    sign = xp.sign(x)
    a = xp.abs(x)
    t = 1 / (1 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1 - poly * xp.exp(-a * a))


class GELU(Function):
    """y = x * Phi(x), Phi the standard normal CDF (GPT-2/BERT's activation).

    approximate="tanh": Phi(x) ~ (1 + tanh(c (x + 0.044715 x^3))) / 2, c = sqrt(2/pi).
    approximate="none": Phi(x) = (1 + erf(x / sqrt 2)) / 2;  dx = g (Phi(x) + x phi(x)).
    Saves: x.
    """

    @staticmethod
    def forward(ctx, x, *, approximate="tanh"):
        ctx.save_for_backward(x)
        ctx.approximate = approximate
        if approximate == "tanh":
            return 0.5 * x * (1 + xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        if ctx.approximate == "tanh":
            th = xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
            d_inner = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x**2)
            return (g * (0.5 * (1 + th) + 0.5 * x * (1 - th**2) * d_inner),)
        cdf = 0.5 * (1 + _erf(x / math.sqrt(2)))
        pdf = xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return (g * (cdf + x * pdf),)


class Dropout(Function):
    """y = x * m / (1 - p), m ~ Bernoulli(1 - p) drawn from ``rng`` (so runs are reproducible).

    Dividing by 1 - p keeps E[y] = x, so nothing changes at eval time when dropout is off.
    dx = g * m / (1 - p). Saves: the mask m (booleans).
    ``rng`` is a NumPy generator: the mask is drawn on the host and copied to the array's
    device, so one seed gives the same masks on NumPy and on CuPy.
    """

    @staticmethod
    def forward(ctx, x, *, p, rng):
        keep = xp.asarray(rng.random(x.shape) >= p)
        ctx.save_for_backward(keep)
        ctx.scale = 1 / (1 - p)
        return x * keep * xp.asarray(ctx.scale, dtype=x.dtype)

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved
        return (g * keep * xp.asarray(ctx.scale, dtype=g.dtype),)


class Embedding(Function):
    """y = W[ids]: one row of the (V, D) table per token id.

    dW is zero except at the rows that were looked up; a token that appears k times adds k
    gradients into its row — a scatter-add (``add.at``), not an assignment.
    Saves: the ids and the table's shape.
    """

    @staticmethod
    def forward(ctx, weight, *, ids):
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
            raise IndexError(f"embedding: token ids must lie in [0, {weight.shape[0]}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        ctx.save_for_backward(ids)
        ctx.w_shape, ctx.w_dtype = weight.shape, weight.dtype
        return weight[ids]

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved
        dw = xp.zeros(ctx.w_shape, dtype=ctx.w_dtype)
        xp.add.at(dw, ids.reshape(-1), g.reshape(-1, ctx.w_shape[1]))
        return (dw,)


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] on the last axis: multiplying pairs (x1_i, x2_i) by i."""
    half = x.shape[-1] // 2
    return xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotate_half_transposed(g):
    """The transpose of ``rotate_half`` as a linear map: [g1, g2] -> [g2, -g1]."""
    half = g.shape[-1] // 2
    return xp.concatenate([g[..., half:], -g[..., :half]], axis=-1)


class RoPE(Function):
    """Rotary position embedding (Su et al. 2021), Hugging Face's "rotate half" layout.

    Feature i of a head is paired with feature i + d/2; the pair is rotated by the angle
    pos * theta^(-2i/d):   y = x cos + rotate_half(x) sin.
    A rotation's inverse is its transpose, so  dx = g cos + rotate_half^T(g sin).
    ``cos`` and ``sin`` are (T, d) tables from ``rope_tables``, or (B, 1, T, d) when each row of
    the batch has its own positions (left-padded batches). Saves: cos and sin (constants).
    Both directions run over blocks of the leading (batch) axis.
    """

    @staticmethod
    def forward(ctx, x, *, cos, sin):
        if cos.shape[-2:] != x.shape[-2:] or xp.broadcast_shapes(cos.shape, x.shape) != x.shape:
            raise ShapeError(f"rope: tables {cos.shape} do not fit (..., T, head_dim) = {x.shape}")
        ctx.save_for_backward(cos, sin)
        return _rope_over_rows(_rope_rows, x, cos, sin)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved
        return (_rope_over_rows(_rope_backward_rows, g, cos, sin),)


def _rope_over_rows(rows_fn, x, cos, sin):
    """``rows_fn(out, x, cos, sin)`` over blocks of x's leading axis -> out. Tables with one
    row per batch row are split with x; tables that broadcast are passed whole to each block."""
    out = xp.empty(x.shape, dtype=xp.result_type(x, cos, sin))
    if cos.ndim < x.ndim or cos.shape[0] != x.shape[0]:
        over_row_blocks(functools.partial(rows_fn, cos=cos, sin=sin), out, x)
    else:
        over_row_blocks(rows_fn, out, x, cos, sin)
    return out


def _rope_rows(y, x, cos, sin) -> None:
    """y = x cos + rotate_half(x) sin on a block of rows."""
    xp.multiply(x, cos, out=y)
    y += rotate_half(x) * sin


def _rope_backward_rows(dx, g, cos, sin) -> None:
    """dx = g cos + rotate_half^T(g sin) on a block of rows."""
    xp.multiply(g, cos, out=dx)
    dx += rotate_half_transposed(g * sin)


def rope_tables(positions, head_dim: int, theta: float = 10000.0, dtype="float32"):
    """cos and sin tables (..., T, head_dim) for integer positions of shape (..., T)."""
    inv_freq = 1.0 / (theta ** (xp.arange(0, head_dim, 2, dtype=xp.float64) / head_dim))
    angles = xp.asarray(positions, dtype=xp.float64)[..., None] * inv_freq
    angles = xp.concatenate([angles, angles], axis=-1)
    return xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)
