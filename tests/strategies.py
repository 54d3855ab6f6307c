"""Hypothesis strategies shared by all property tests, kept in this one file so that every property
test draws its inputs the same way (docs/design.md, principle 4).

Bounded floats (no inf/NaN unless a test asks), shapes with odd and size-1 axes, and pairs of
shapes that broadcast against each other.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minift.quant.nf4 import BLOCKSIZES

small_dims = st.integers(min_value=1, max_value=5)


def shapes(min_dims: int = 1, max_dims: int = 3, max_side: int = 5):
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=max_side)


def arrays(shape, low: float = -3.0, high: float = 3.0, dtype=np.float64):
    """Arrays of bounded floats; float64 by default because finite differences need it."""
    return hnp.arrays(dtype, shape, elements=st.floats(low, high, allow_nan=False, width=64))


@st.composite
def broadcastable_pair(draw, max_dims: int = 3):
    """Two shapes that broadcast together (size-1 axes and missing leading axes included)."""
    shape_a, shape_b = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=max_dims,
                                                               min_side=1, max_side=4)).input_shapes
    return shape_a, shape_b


# ---- optimizers (tests/optim) ---------------------------------------------------------------
@st.composite
def adamw_hyperparams(draw):
    """AdamW settings from tiny to large: lr up to 0.1, betas in [0, 0.999], eps > 0, wd up to 0.5."""
    return {
        "lr": draw(st.floats(1e-5, 1e-1)),
        "betas": (draw(st.floats(0.0, 0.99)), draw(st.floats(0.0, 0.999))),
        "eps": draw(st.floats(1e-10, 1e-4)),
        "weight_decay": draw(st.floats(0.0, 0.5)),
    }


@st.composite
def gradient_sequences(draw, max_steps: int = 6):
    """(initial weights, [gradient per step]) of one shape, float64; gradients may be exactly 0."""
    shape = draw(shapes(max_dims=2, max_side=4))
    n_steps = draw(st.integers(1, max_steps))
    weights = draw(arrays(shape))
    return weights, [draw(arrays(shape)) for _ in range(n_steps)]


# ---- value ranges that keep an op smooth and well-conditioned ------------------------------
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def positive_arrays(shape, low: float = 0.5, high: float = 3.0):
    """Strictly positive floats: the domain of log, sqrt, rsqrt and fractional powers."""
    return arrays(shape, low, high)


@st.composite
def nonzero_arrays(draw, shape, low: float = 0.5, high: float = 3.0):
    """Floats with low <= |x| <= high and either sign: denominators, dropout inputs."""
    magnitude = draw(arrays(shape, low, high))
    sign = draw(hnp.arrays(np.bool_, shape))
    return np.where(sign, magnitude, -magnitude)


@st.composite
def distinct_arrays(draw, shape, spacing: float = 0.05):
    """Floats whose values are all at least ``spacing`` apart: no ties, so max is differentiable.

    A random permutation of an evenly spaced grid, shifted and jittered by less than spacing/4
    (so finite differences with eps << spacing never swap two values).
    """
    size = int(np.prod(shape, dtype=np.int64))
    order = draw(st.permutations(range(size)))
    offset = draw(st.floats(-2.0, 2.0))
    jitter = draw(arrays((size,), -spacing / 4, spacing / 4))
    values = np.asarray(order, dtype=np.float64) * spacing + offset + jitter
    return values.reshape(shape)


@st.composite
def tied_arrays(draw, shape):
    """Floats drawn from three values only, so reductions meet many ties."""
    return draw(hnp.arrays(np.float64, shape, elements=st.sampled_from([-1.0, 0.5, 2.0])))


# ---- axes, indices and ids -----------------------------------------------------------------
@st.composite
def reduction_axes(draw, ndim: int):
    """None, one axis (possibly negative) or a tuple of distinct axes of an ``ndim``-array."""
    kind = draw(st.sampled_from(["none", "int", "tuple"] if ndim else ["none"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    chosen = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    return tuple(a - ndim if draw(st.booleans()) else a for a in chosen)


@st.composite
def repeated_ids(draw, high: int, shape):
    """Integer ids in [0, high) of ``shape`` in which at least one id occurs twice."""
    size = int(np.prod(shape, dtype=np.int64))
    if size < 2:
        raise ValueError("repeated_ids needs room for a repeat")
    ids = draw(hnp.arrays(np.int64, (size,), elements=st.integers(0, high - 1)))
    i, j = draw(st.lists(st.integers(0, size - 1), min_size=2, max_size=2, unique=True))
    ids[j] = ids[i]
    return ids.reshape(shape)


@st.composite
def slices(draw, side: int):
    """A slice into an axis of length ``side`` (negative bounds and steps included, never empty)."""
    step = draw(st.sampled_from([1, 1, 2, -1, -2]))
    start = draw(st.integers(0, side - 1))
    if step > 0:
        stop = draw(st.integers(start + 1, side))
    else:
        stop = draw(st.integers(-1, start - 1))
        stop = None if stop == -1 else stop
    if draw(st.booleans()):  # the same slice written with a negative start
        start -= side
    return slice(start, stop, step)


@st.composite
def basic_and_advanced_indices(draw, shape):
    """An index for ``x[index]``: slices, ints, None, Ellipsis, or integer arrays with repeats."""
    kind = draw(st.sampled_from(["slices", "int", "array", "mixed", "ellipsis"]))
    if kind == "slices":
        return tuple(draw(slices(n)) for n in shape[: draw(st.integers(1, len(shape)))])
    if kind == "int":
        return draw(st.integers(-shape[0], shape[0] - 1))
    if kind == "ellipsis":
        return (Ellipsis, draw(st.integers(0, shape[-1] - 1)), None)
    count = draw(st.integers(2, 6))
    rows = draw(repeated_ids(shape[0], (count,)))  # repeats on purpose: the scatter must add
    if kind == "array":
        return rows
    return (draw(slices(shape[0])), rows % shape[1]) if len(shape) > 1 else rows


# ---- operand shapes for products and attention ----------------------------------------------
@st.composite
def matmul_shapes(draw):
    """Shapes (a, b) for a @ b: plain 2-D, batched, broadcast batch axes, or a shared 2-D weight."""
    n, k, m = draw(small_dims), draw(small_dims), draw(small_dims)
    kind = draw(st.sampled_from(["2d", "batched", "broadcast", "shared_weight", "shared_input"]))
    if kind == "2d":
        return (n, k), (k, m)
    if kind == "batched":
        batch = draw(shapes(1, 2, 3))
        return (*batch, n, k), (*batch, k, m)
    if kind == "shared_weight":
        return (*draw(shapes(1, 2, 3)), n, k), (k, m)
    if kind == "shared_input":
        return (n, k), (*draw(shapes(1, 2, 3)), k, m)
    batch_a, batch_b = draw(broadcastable_pair(max_dims=2))
    return (*batch_a, n, k), (*batch_b, k, m)


@st.composite
def attention_shapes(draw):
    """(B, Hq, Hkv, Tq, Tk, d) with Hq = G * Hkv for G in {1, 2} and Tq <= Tk."""
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2]))
    tk = draw(st.integers(1, 4))
    tq = draw(st.integers(1, tk))
    d = draw(st.sampled_from([2, 3, 4]))
    return b, groups * hkv, hkv, tq, tk, d


# ---- text and chats (tests/data) -------------------------------------------------------------
SPECIAL_STRINGS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
TRICKY_PIECES = ("é", "日本語", "🙂", "👩\u200d👩\u200d👧", "\t\t", "   ", "\n\n\n", "\r\n", "\x00",
                 "<|", "|>", "<|im_")

# Any Unicode text that UTF-8 can encode (Hypothesis leaves out lone surrogates), with emoji,
# joiners, whitespace runs and fragments of special-token names drawn often.
unicode_text = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(TRICKY_PIECES)),
                        max_size=6).map("".join)


@st.composite
def text_with_specials(draw):
    """Text with special-token strings (and near misses like ``<|im_``) spliced in."""
    pieces = draw(st.lists(st.one_of(unicode_text, st.sampled_from(SPECIAL_STRINGS)), max_size=6))
    return "".join(pieces)


@st.composite
def chats(draw, max_exchanges: int = 3):
    """A valid chat: optional system message, then user/assistant exchanges, ending with the assistant."""
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(unicode_text)})
    for _ in range(draw(st.integers(1, max_exchanges))):
        messages.append({"role": "user", "content": draw(text_with_specials())})
        messages.append({"role": "assistant", "content": draw(text_with_specials())})
    return messages


def bool_masks(shape):
    """Arrays of True/False (subsets of rows, attention masks)."""
    return hnp.arrays(np.bool_, shape)


def ids(high: int, shape):
    """Integer ids in [0, high) (targets, token ids), repeats allowed."""
    return hnp.arrays(np.int64, shape, elements=st.integers(0, high - 1))


# ---- multi-LoRA serving (tests/serve) -------------------------------------------------------
@st.composite
def serving_requests(draw, names, vocab_size: int, max_prompt: int, max_new: int, max_requests: int = 5):
    """[(prompt ids, adapter name or None for the base model, max_tokens)]: a mixed batch with
    prompts of different lengths (size 1 included) and repeated adapters."""
    mix = []
    for _ in range(draw(st.integers(1, max_requests))):
        prompt = draw(st.lists(st.integers(0, vocab_size - 1), min_size=1, max_size=max_prompt))
        mix.append((prompt, draw(st.sampled_from([None, *names])), draw(st.integers(1, max_new))))
    return mix


# ---- CUDA kernels (tests/cuda) --------------------------------------------------------------
#: Values that break careless kernels: signed zeros, huge magnitudes (1e9: a product of four of
#: them, 1e36, still fits in float32, so the float64 reference stays comparable), subnormals.
KERNEL_SPECIAL_VALUES = (0.0, -0.0, 1e9, -1e9, 3.5e8, 1e-40, -1e-40, 1.4e-45, 2.0**-126)


@st.composite
def kernel_arrays(draw, shape):
    """float32 arrays for kernel tests: N(0, 1) values, all zeros, or with 10% / 50% of the entries
    replaced by zeros or by ``KERNEL_SPECIAL_VALUES``. Drawn from a seed: fast at any size."""
    rng = np.random.default_rng(draw(seeds))
    mix = draw(st.sampled_from(["normal", "all_zero", "zeros", "specials"]))
    if mix == "all_zero":
        return np.zeros(shape, dtype=np.float32)
    a = rng.normal(size=shape).astype(np.float32)
    if mix != "normal":
        hit = rng.random(shape) < draw(st.sampled_from([0.1, 0.5]))
        pool = [0.0, -0.0] if mix == "zeros" else KERNEL_SPECIAL_VALUES
        a[hit] = rng.choice(np.asarray(pool, dtype=np.float32), size=int(hit.sum()))
    return a


@st.composite
def lora_shapes(draw, max_outputs: int = 192):
    """(M, K, N, R): M = 1 often, sizes that are no multiple of a tile (16, 32, 256), ranks 1..64.
    M * R is kept <= ``max_outputs`` so that the emulated grids stay small."""
    R = draw(st.one_of(st.sampled_from([1, 2, 8, 16, 33, 64]), st.integers(1, 64)))
    M = draw(st.one_of(st.just(1), st.integers(1, max(1, max_outputs // R))))
    K = draw(st.one_of(st.sampled_from([1, 31, 32, 33]), st.integers(1, 96)))
    N = draw(st.one_of(st.sampled_from([1, 255, 257]), st.integers(1, 80)))
    return M, K, N, R


@st.composite
def adapter_indices(draw, rows: int, n_adapters: int):
    """int32 adapter index per row, in the patterns a serving batch has: every row the same adapter,
    every row a different one, no adapter at all (-1), or a random mix with -1 rows."""
    pattern = draw(st.sampled_from(["same", "all_different", "none", "mixed"]))
    if pattern == "same":
        idx = [draw(st.integers(0, n_adapters - 1))] * rows
    elif pattern == "all_different":
        idx = [i % n_adapters for i in draw(st.permutations(range(rows)))]
    elif pattern == "none":
        idx = [-1] * rows
    else:
        idx = draw(st.lists(st.integers(-1, n_adapters - 1), min_size=rows, max_size=rows))
    return np.asarray(idx, dtype=np.int32)


# ---- 4-bit quantization (tests/quant) -------------------------------------------------------


@st.composite
def quant_inputs(draw, max_values: int = 8192):
    """(x float32, blocksize): a whole number of blocks of a bitsandbytes block size, shaped 1-D or
    (rows, cols) with odd and size-1 sides, values N(0, sigma) with sigma from 1e-4 to 1e4, and
    blocks replaced by the cases that break careless quantizers: all zeros, one huge value (1e30)
    among small ones, all one value (ties), and subnormal magnitudes (1e-40)."""
    blocksize = draw(st.sampled_from([b for b in BLOCKSIZES if b <= max_values]))
    n_blocks = draw(st.integers(1, max(1, max_values // blocksize)))
    n = n_blocks * blocksize
    shape = (n,)
    if draw(st.booleans()):
        cols = draw(st.sampled_from([d for d in range(1, min(n, 4096) + 1) if n % d == 0]))
        shape = (n // cols, cols)
    rng = np.random.default_rng(draw(seeds))
    blocks = (rng.standard_normal(n) * 10.0 ** draw(st.integers(-4, 4))).astype(np.float32).reshape(-1, blocksize)
    for b in range(n_blocks):
        kind = draw(st.sampled_from(["normal", "normal", "zeros", "huge", "constant", "subnormal"]))
        if kind == "zeros":
            blocks[b] = 0
        elif kind == "huge":
            blocks[b, rng.integers(blocksize)] = np.float32(1e30) * rng.choice([-1, 1])
        elif kind == "constant":
            blocks[b] = blocks[b, 0]
        elif kind == "subnormal":
            blocks[b] = np.float32(1e-40) * rng.integers(-3, 4, blocksize)
    return blocks.reshape(shape), blocksize


def nibbles(max_pairs: int = 64):
    """Even-length uint8 arrays of 4-bit codes 0..15."""
    return st.integers(1, max_pairs).flatmap(
        lambda pairs: hnp.arrays(np.uint8, (2 * pairs,), elements=st.integers(0, 15)))
