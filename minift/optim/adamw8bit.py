"""8-bit AdamW: AdamW whose two moments are stored in one byte each, blockwise quantized.

Full fine-tuning keeps, per trained parameter, the weight, its gradient and AdamW's ``m`` and
``v``: 4 x 4 bytes in float32, and the moments are half of it (lecture 003's "optimizer
states"). Dettmers et al. (2022), "8-bit Optimizers via Block-wise Quantization", store ``m`` and
``v`` in 8 bits and get the same fine-tuning results; bitsandbytes ships it as
``bnb.optim.AdamW8bit``. This is that optimizer, on minift's 8-bit codes (``minift/quant/nf4.py``).
"""

from __future__ import annotations

import functools

import numpy

from minift.autograd import Tensor
from minift.autograd.parallel import over_row_blocks
from minift.backend import xp
from minift.optim.adamw import AdamW, adamw_arithmetic
from minift.quant.nf4 import DYNAMIC_CODE, DYNAMIC_CODE_UNSIGNED, TINY_ABSMAX, nearest_code

#: Values per absmax block of the moments (bitsandbytes' blockwise optimizers use 256).
BLOCKSIZE = 256
#: Parameters with fewer values keep float32 moments (bitsandbytes' ``min_8bit_size``).
MIN_8BIT_SIZE = 4096
#: Values updated at once (256 blocks): the float32 moments and the other temporaries of the
#: update exist for one chunk at a time per thread, about ``SCRATCH_BYTES_PER_VALUE`` x 65536 =
#: 1.5 MiB each.
CHUNK_VALUES = 256 * BLOCKSIZE
#: Temporaries of one chunk's update, at their most: m and v, the scaled values, their bucket
#: keys, the gathered midpoints, the new codes; 20 bytes per value measured, 24 with slack.
SCRATCH_BYTES_PER_VALUE = 24
#: Low bits of a float32 dropped to name its bucket: 9 mantissa bits stay, so a bucket spans at
#: most 0.2% of its values, less than a third of the closest two levels of either map (0.7%).
BUCKET_SHIFT = 14
#: The moments' 8-bit state, per quantized parameter: codes (the parameter's shape) and absmax.
QUANTIZED_KEYS = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")


def blocks_of(n: int) -> int:
    """Absmax blocks of a parameter of ``n`` values (the last one may be shorter)."""
    return -(-n // BLOCKSIZE)


def state_nbytes_8bit(n: int, min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes of AdamW8bit's state for a parameter of ``n`` values: 2 codes + 2 float32 absmax per
    block of 256 (2.03 bytes per value) or, below ``min_8bit_size``, AdamW's 8."""
    if n < min_8bit_size:
        return 8 * n
    return 2 * n + 2 * 4 * blocks_of(n)


def quantize_blockwise(values, code):
    """float32 values (flat) -> (uint8 codes, float32 absmax per block of ``BLOCKSIZE``).

    Each block is scaled by its own largest magnitude into [-1, 1] and every value takes the
    index of the nearest level of the sorted ``code`` (bitsandbytes' GPU optimizer kernel; its
    CPU kernel first rounds to a grid of 65536 points, which can pick another code for values
    under 3e-5 of their block's absmax). An all-zero block stores absmax 0.
    """
    short = (-values.size) % BLOCKSIZE  # the last block of a tensor may be shorter: pad it with zeros
    padded = xp.concatenate([values, xp.zeros(short, dtype=xp.float32)]) if short else values
    blocks = padded.reshape(-1, BLOCKSIZE)
    absmax = xp.abs(blocks).max(axis=1)
    scaled = blocks * (xp.float32(1) / xp.maximum(absmax, TINY_ABSMAX))[:, None]
    xp.clip(scaled, -1, 1, out=scaled)
    return nearest_level(scaled.reshape(-1), code)[: values.size], absmax


def nearest_level(x, code):
    """``nearest_code(x, code)`` (ties to the lower level) for float32 ``x``, 8 times faster.

    ``nearest_code`` binary-searches the 255 midpoints between the levels for every value. Here the
    top 18 bits of a float32 (sign, exponent, 9 mantissa bits) name a bucket of neighbouring
    numbers, and a table built once per code gives the number of midpoints below each bucket's
    lowest number. A bucket is narrower than any gap between midpoints, so it holds at most one
    of them: the answer is the table's entry, plus one if the value lies above that midpoint.
    Equal to ``nearest_code`` on every input (tests/optim/test_adamw8bit.py).
    """
    first, midpoints = _bucket_table(numpy.asarray(code, dtype=numpy.float32).tobytes())
    first = xp.asarray(first)[_ordered_bits(x) >> BUCKET_SHIFT]
    first += xp.asarray(midpoints)[first] < x
    return first


def _ordered_bits(x):
    """float32 -> uint32 in the same order as the numbers: a negative number's bits are inverted
    (a larger magnitude is a smaller number), a positive one gets the top bit set."""
    key = (x.view(xp.int32) >> 31).view(xp.uint32)  # all ones for a negative number, else 0
    key |= xp.uint32(0x80000000)
    key ^= x.view(xp.uint32)
    return key


def build_bucket_tables() -> None:
    """Build both maps' tables now. They are built on first use and kept for the process
    (0.5 MiB, shared by every parameter and optimizer): the memory ledger builds them before it
    measures, so that they are not counted as one model's optimizer state."""
    for code in (DYNAMIC_CODE, DYNAMIC_CODE_UNSIGNED):
        _bucket_table(code.tobytes())


@functools.cache
def _bucket_table(code_bytes: bytes) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(midpoints below each bucket's lowest number (uint8, 2^18), midpoints + inf (float32))."""
    code = numpy.frombuffer(code_bytes, dtype=numpy.float32)
    midpoints = (code[:-1] + code[1:]) / numpy.float32(2)
    key = numpy.arange(1 << (32 - BUCKET_SHIFT), dtype=numpy.uint32) << numpy.uint32(BUCKET_SHIFT)
    lowest = numpy.where(key >> 31 == 1, key & numpy.uint32(0x7FFFFFFF), ~key).view(numpy.float32)
    with numpy.errstate(invalid="ignore"):  # the buckets of NaN bit patterns: never looked up
        first = numpy.searchsorted(midpoints, lowest, side="left")
    if numpy.diff(first).max() > 1:
        raise ValueError(f"minift/optim/adamw8bit.py: two midpoints of this code fall into one bucket of "
                         f"BUCKET_SHIFT={BUCKET_SHIFT}; lower BUCKET_SHIFT there")
    return first.astype(numpy.uint8), numpy.append(midpoints, numpy.float32(numpy.inf))


def dequantize_blockwise(codes, absmax, code):
    """uint8 codes (flat) and their blocks' absmax -> float32 values: code[q] * absmax."""
    values = xp.asarray(code)[codes]
    whole = values.size // BLOCKSIZE * BLOCKSIZE
    values[:whole].reshape(-1, BLOCKSIZE)[...] *= absmax[: whole // BLOCKSIZE, None]
    values[whole:] *= absmax[-1]  # the short last block of a tensor, if any
    return values


def encode_second_moment(v):
    """``quantize_blockwise`` with the unsigned map, except that a positive ``v`` never gets the
    level 0: it takes the smallest positive level (3.25e-7 x absmax) instead.

    The map's levels reach down 7 decades below a block's absmax; a ``v`` further down (gradients
    that span 4 decades in one block give squares that span 8) would round to 0, and every later
    step would see only this step's ``(1 - beta2) g**2`` under a ``m`` that remembers: a step up
    to ``1 / sqrt(1 - beta2)`` = 32 times AdamW's, which made a quadratic whose curvatures span 4
    decades diverge (tests/optim/test_adamw8bit.py). Rounding up instead errs on the side of a
    smaller step, as ``eps`` does.
    """
    codes, absmax = quantize_blockwise(v, DYNAMIC_CODE_UNSIGNED)
    codes[(codes == 0) & (v > 0)] = 1
    return codes, absmax


class AdamW8bit(AdamW):
    """``AdamW`` (same update, same hyper-parameters) with ``m`` and ``v`` stored in 8 bits.

    Each step, for every block of 256 values of a parameter, the moments are decoded, updated
    in float32, used, and encoded again::

        m, v  = code_m[q_m] * absmax_m,  code_v[q_v] * absmax_v      (dequantize)
        p     = p - lr * wd * p                                      (AdamW, exactly)
        m     = beta1 * m + (1 - beta1) * g
        v     = beta2 * v + (1 - beta2) * g**2
        p     = p - lr * m_hat / (sqrt(v_hat) + eps)                 (with the float32 m, v)
        absmax = max |m| per block;  q_m = nearest level to m / absmax (requantize; same for v,
                                                         but never the level 0 for a v > 0)

    The weights move with the float32 moments of this step; quantization error reaches only
    the moments carried to the next step. On step 1 (moments zero) the update is AdamW's to the
    bit.

    Why dynamic, not evenly spaced, levels: the moments span many orders of magnitude within a
    block (``v`` holds squared gradients), and an even grid of 256 levels would round everything
    below absmax/255 to zero — a ``v`` of zero under a nonzero ``m`` is a huge step. The dynamic
    map (``create_dynamic_map``, Dettmers 2016) spends its levels over 7 decades, so the
    *relative* error is about the same for small values and large. ``m`` uses the signed map;
    ``v`` is never negative and uses the unsigned one, whose 256 levels all lie on [0, 1]. Blocks
    of 256 (the paper's blockwise quantization) keep one outlier from coarsening the whole
    tensor: it only sets the scale of its own block.

    Memory: 1 + 1 bytes of codes per value plus two float32 absmax per 256 values, 2.03 bytes
    instead of AdamW's 8 (``state_nbytes_8bit``): SmolLM2-135M's 1026 MiB of moments become
    261 MiB. Parameters under ``min_8bit_size`` values (norm gains, biases, 4096 as in
    bitsandbytes) keep AdamW's float32 moments: they are a tiny share of the memory (0.03% of
    SmolLM2), so 8 bits would save next to nothing, and they are the parameters whose every
    value matters most (a norm gain scales a whole channel).

    The update runs ``CHUNK_VALUES`` values at a time, so decoding the embedding's moments never
    brings back a float32 copy of them (226 MiB for SmolLM2) for even a moment.
    """

    def __init__(self, params, lr: float = 1e-3, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE):
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False)
        self.min_8bit_size = min_8bit_size

    def quantized(self, p: Tensor) -> bool:
        """True when ``p``'s moments are stored in 8 bits (it has at least ``min_8bit_size`` values)."""
        return p.size >= self.min_8bit_size

    def _new_state(self, p: Tensor, amsgrad: bool) -> dict:
        """Zero moments: every code points at the level 0 and every absmax is 0."""
        if not self.quantized(p):
            return super()._new_state(p, amsgrad)
        zero_m, zero_v = (int(nearest_code(xp.zeros(1, dtype=xp.float32), c)[0])
                          for c in (DYNAMIC_CODE, DYNAMIC_CODE_UNSIGNED))
        absmax = xp.zeros(blocks_of(p.size), dtype=xp.float32)
        return {"step": 0, "exp_avg_codes": xp.full(p.shape, zero_m, dtype=xp.uint8), "exp_avg_absmax": absmax,
                "exp_avg_sq_codes": xp.full(p.shape, zero_v, dtype=xp.uint8), "exp_avg_sq_absmax": absmax.copy()}

    def _update(self, p: Tensor, group: dict) -> None:
        if not self.quantized(p):
            super()._update(p, group)
            return
        state = self.state.get(p)
        if state is None:
            state = self.state[p] = self._new_state(p, False)
        state["step"] += 1
        weights, grads = p.data.reshape(-1), p.grad.reshape(-1)
        arrays = (weights, grads, state["exp_avg_codes"].reshape(-1), state["exp_avg_absmax"],
                  state["exp_avg_sq_codes"].reshape(-1), state["exp_avg_sq_absmax"])
        per_entry = (1, 1, 1, BLOCKSIZE, 1, BLOCKSIZE)  # values per entry: one absmax per block
        update = functools.partial(self._update_values, t=state["step"], group=group)
        chunks = p.size // CHUNK_VALUES
        if chunks:  # whole chunks, one per row, over the BLAS threads (each row its own values)
            rows = [a[: chunks * CHUNK_VALUES // per].reshape(chunks, -1) for a, per in zip(arrays, per_entry)]
            over_row_blocks(lambda *block: update(*(a.reshape(-1) for a in block)), *rows)
        update(*(a[chunks * CHUNK_VALUES // per :] for a, per in zip(arrays, per_entry)))  # the shorter rest
        if not xp.may_share_memory(weights, p.data):  # a non-contiguous parameter: reshape copied it
            p.data[...] = weights.reshape(p.shape)

    @staticmethod
    def _update_values(weights, grads, m_codes, m_absmax, v_codes, v_absmax, *, t: int, group: dict) -> None:
        """AdamW's arithmetic (``adamw_arithmetic``, minift/optim/adamw.py) on a run of values that
        begins a block, ``CHUNK_VALUES`` at a time: decode the moments, update them and the
        weights, encode the moments again. The arrays are flat slices of the parameter's and its
        state's (absmax: one entry per block); a chunk's blocks touch nothing outside it."""
        for start in range(0, weights.size, CHUNK_VALUES):
            values = slice(start, start + CHUNK_VALUES)
            blocks = slice(start // BLOCKSIZE, (start + CHUNK_VALUES) // BLOCKSIZE)
            m = dequantize_blockwise(m_codes[values], m_absmax[blocks], DYNAMIC_CODE)
            v = dequantize_blockwise(v_codes[values], v_absmax[blocks], DYNAMIC_CODE_UNSIGNED)
            adamw_arithmetic(weights[values], grads[values], m, v, xp.empty_like(m), t=t, lr=group["lr"],
                             betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])
            m_codes[values], m_absmax[blocks] = quantize_blockwise(m, DYNAMIC_CODE)
            v_codes[values], v_absmax[blocks] = encode_second_moment(v)

    # ---- resuming --------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """``Optimizer.load_state_dict``, after checking each 8-bit entry: the codes are uint8 in
        the parameter's shape, one finite absmax >= 0 per block. The base class checks the rest
        (groups, sizes, the float32 moments of small parameters); the absmax arrays, which it
        would take for moments of the wrong shape, are put back after it."""
        groups, saved = state_dict["param_groups"], state_dict["state"]
        by_index = dict(zip((int(i) for g in groups for i in g["params"]), self._params_in_order(), strict=False))
        absmax = {}
        for key, entry in saved.items():
            p = by_index.get(int(key))
            if p is not None:
                absmax[p] = self._check_entry(entry, p, f"optimizer state of parameter {key}")
        super().load_state_dict({"state": {key: {k: v for k, v in entry.items() if not k.endswith("_absmax")}
                                           for key, entry in saved.items()}, "param_groups": groups})
        for p, arrays in absmax.items():
            self.state[p].update(arrays)

    def _check_entry(self, entry: dict, p: Tensor, where: str) -> dict:
        """Raise a ValueError naming ``where`` unless ``entry`` is this optimizer's state for ``p``;
        -> its absmax arrays, copied to the active backend."""
        expected = {"step", *(QUANTIZED_KEYS if self.quantized(p) else ("exp_avg", "exp_avg_sq"))}
        if set(entry) != expected:
            raise ValueError(f"{where} (shape {tuple(p.shape)}) has entries {sorted(entry)}, but AdamW8bit "
                             f"keeps {sorted(expected)} for it: the snapshot was written by another optimizer "
                             f"(resume with the --optim it was trained with) or another min_8bit_size")
        if not self.quantized(p):
            return {}
        for name in ("exp_avg_codes", "exp_avg_sq_codes"):
            codes = entry[name]
            if str(codes.dtype) != "uint8" or tuple(codes.shape) != tuple(p.shape):
                raise ValueError(f"{where}: {name!r} is {codes.dtype} of shape {tuple(codes.shape)}, expected "
                                 f"uint8 of shape {tuple(p.shape)}: the snapshot belongs to a different model")
        arrays = {}
        for name in ("exp_avg_absmax", "exp_avg_sq_absmax"):
            values = xp.asarray(entry[name])
            if str(values.dtype) != "float32" or values.shape != (blocks_of(p.size),):
                raise ValueError(f"{where}: {name!r} is {values.dtype} of shape {tuple(values.shape)}, expected "
                                 f"float32 of shape ({blocks_of(p.size)},), one per block of {BLOCKSIZE}")
            if not bool(xp.all(xp.isfinite(values) & (values >= 0))):
                raise ValueError(f"{where}: {name!r} holds a negative or non-finite scale; the checkpoint is "
                                 f"damaged: resume from an older one")
            arrays[name] = values.copy()
        return arrays
