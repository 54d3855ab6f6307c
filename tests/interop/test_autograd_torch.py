"""minift's gradients against torch.autograd, on the same computation written twice.

(a) a composite expression touching most ops, and (b) a whole Llama-style decoder layer
(RMSNorm, q/k/v projections, RoPE in Hugging Face's rotate-half layout, causal grouped-query
attention, o_proj, residual, RMSNorm, SwiGLU MLP, residual) followed by an output projection and
cross-entropy. Both sides run in float64, so they agree to round-off (at worst 1.3e-11 relative,
4e-15 absolute, element by element, when this was written); the stated tolerance, 1e-5 relative,
is far above that and far below what a wrong backward formula produces (O(1) relative).
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop extra not installed (pip install -e '.[interop]')")

import minift.autograd.functional as F  # noqa: E402
from minift.autograd import Tensor  # noqa: E402
from minift.backend import to_numpy, xp  # noqa: E402

pytestmark = pytest.mark.interop

RTOL = 1e-5  # float64 on both sides: round-off is <= 1.3e-11; a wrong formula is off by O(1)
ATOL = 1e-12  # only for entries that are zero up to round-off


def run_both(minift_fn, torch_fn, arrays):
    """Gradients of the scalar each function returns, w.r.t. every array in ``arrays``."""
    leaves = {k: Tensor(xp.asarray(a), requires_grad=True) for k, a in arrays.items()}
    loss = minift_fn(**leaves)
    loss.backward()
    t_leaves = {k: torch.tensor(a, dtype=torch.float64, requires_grad=True) for k, a in arrays.items()}
    t_loss = torch_fn(**t_leaves)
    t_loss.backward()
    np.testing.assert_allclose(loss.item(), t_loss.item(), rtol=1e-12)
    for name in arrays:
        np.testing.assert_allclose(to_numpy(leaves[name].grad), t_leaves[name].grad.numpy(), rtol=RTOL,
                                   atol=ATOL, err_msg=f"gradient of {name}")


# ---- (a) a composite expression --------------------------------------------------------------
IDS = np.array([[1, 4, 1], [0, 4, 4]])  # repeated ids: the embedding's scatter must add
ROWS = np.array([0, 3, 3, 7, 1, 0])  # repeated rows: so must the getitem's
TARGETS = np.array([2, -100, 0, 4, 4, -100])


def composite_minift(*, a, b, c, p, w, bias, emb, ln_w, ln_b, m):
    ids, rows, targets = xp.asarray(IDS), xp.asarray(ROWS), xp.asarray(TARGETS)
    u = (c * a - b / (p + 1.0)) ** 2 + F.exp(-a) * F.log(p) + F.sqrt(p) - F.rsqrt(p) / 3  # (2, 3, 4)
    v = F.layer_norm(u + F.embedding(ids, emb), ln_w, ln_b) @ m  # batched @ shared (4, 4)
    z = F.gelu(F.linear(v, w, bias))  # (2, 3, 5)
    s = F.softmax(z, axis=1) + F.log_softmax(z) + F.silu(z)
    flat = F.reshape(F.transpose(s, 0, 1), 6, 5)  # (3, 2, 5) -> (6, 5)
    joined = F.concatenate([flat, flat[1:3] * 2.0], axis=0)  # (8, 5)
    stacked = F.stack([joined, 1.0 - joined], axis=1)  # (8, 2, 5)
    logits = F.sum(stacked * F.permute(F.reshape(w[:2], 2, 1, 4)[..., :1], (1, 0, 2)), axis=1)
    return (F.cross_entropy(logits[rows], targets) + F.mean(F.max(s, axis=-1, keepdims=True))
            + F.mean(F.rms_norm(v, ln_w) ** 2, axis=(0, 2)).sum() / 10)


def composite_torch(*, a, b, c, p, w, bias, emb, ln_w, ln_b, m):
    nn = torch.nn.functional
    ids, rows, targets = (torch.tensor(t) for t in (IDS, ROWS, TARGETS))
    u = (c * a - b / (p + 1.0)) ** 2 + torch.exp(-a) * torch.log(p) + torch.sqrt(p) - torch.rsqrt(p) / 3
    v = nn.layer_norm(u + emb[ids], (4,), ln_w, ln_b, eps=1e-5) @ m
    z = nn.gelu(v @ w.T + bias, approximate="tanh")
    s = torch.softmax(z, dim=1) + torch.log_softmax(z, dim=-1) + z * torch.sigmoid(z)
    flat = s.transpose(0, 1).reshape(6, 5)
    joined = torch.cat([flat, flat[1:3] * 2.0], dim=0)
    stacked = torch.stack([joined, 1.0 - joined], dim=1)
    logits = (stacked * w[:2].reshape(2, 1, 4)[..., :1].permute(1, 0, 2)).sum(dim=1)
    rms = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * ln_w
    return (nn.cross_entropy(logits[rows], targets, ignore_index=-100)
            + s.amax(dim=-1, keepdim=True).mean() + (rms**2).mean(dim=(0, 2)).sum() / 10)


def test_composite_expression_gradients_equal_torch(backend):
    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.standard_normal((3, 4)),
        "b": rng.standard_normal(4),
        "c": rng.standard_normal((2, 3, 4)),
        "p": rng.uniform(0.5, 2.0, (3, 4)),  # log, sqrt, rsqrt need p > 0
        "w": rng.standard_normal((5, 4)),
        "bias": rng.standard_normal(5),
        "emb": rng.standard_normal((6, 4)),
        "ln_w": rng.standard_normal(4),
        "ln_b": rng.standard_normal(4),
        "m": rng.standard_normal((4, 4)) / 2,
    }
    run_both(composite_minift, composite_torch, arrays)


# ---- (b) a Llama decoder layer ----------------------------------------------------------------
B, T, DIM, N_HEADS, FFN, VOCAB, EPS, THETA = 2, 7, 16, 4, 24, 11, 1e-6, 10000.0
HEAD_DIM = DIM // N_HEADS


def llama_layer_minift(n_kv_heads, targets, *, x, n1, wq, wk, wv, wo, n2, wg, wu, wd, head):
    cos, sin = F.rope_tables(xp.arange(T), HEAD_DIM, THETA, dtype="float64")

    def heads(t, n):  # (B, T, n * hd) -> (B, n, T, hd)
        return F.transpose(F.reshape(t, B, T, n, HEAD_DIM), 1, 2)

    h = F.rms_norm(x, n1, eps=EPS)
    q = F.rope(heads(F.linear(h, wq), N_HEADS), cos, sin)
    k = F.rope(heads(F.linear(h, wk), n_kv_heads), cos, sin)
    v = heads(F.linear(h, wv), n_kv_heads)
    o = F.scaled_dot_product_attention(q, k, v, causal=True)
    x = x + F.linear(F.reshape(F.transpose(o, 1, 2), B, T, DIM), wo)
    h = F.rms_norm(x, n2, eps=EPS)
    x = x + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)
    return F.cross_entropy(F.linear(x, head), xp.asarray(targets))


def llama_layer_torch(n_kv_heads, targets, *, x, n1, wq, wk, wv, wo, n2, wg, wu, wd, head):
    def rms_norm(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + EPS) * w

    def rotate_half(t):
        return torch.cat([-t[..., HEAD_DIM // 2:], t[..., : HEAD_DIM // 2]], dim=-1)

    inv_freq = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    h = rms_norm(x, n1)
    q = (h @ wq.T).view(B, T, N_HEADS, HEAD_DIM).transpose(1, 2)
    k = (h @ wk.T).view(B, T, n_kv_heads, HEAD_DIM).transpose(1, 2)
    v = (h @ wv.T).view(B, T, n_kv_heads, HEAD_DIM).transpose(1, 2)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    groups = N_HEADS // n_kv_heads  # query head j reads key/value head j // groups
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    o = torch.softmax(scores.masked_fill(future, -math.inf), dim=-1) @ v
    x = x + o.transpose(1, 2).reshape(B, T, DIM) @ wo.T
    h = rms_norm(x, n2)
    x = x + (torch.nn.functional.silu(h @ wg.T) * (h @ wu.T)) @ wd.T
    logits = x @ head.T
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.tensor(targets).reshape(-1))


@pytest.mark.parametrize("n_kv_heads", [2, 4, 1], ids=["GQA Hq=2Hkv", "MHA Hq=Hkv", "MQA Hkv=1"])
def test_llama_decoder_layer_gradients_equal_torch(backend, n_kv_heads):
    rng = np.random.default_rng(n_kv_heads)
    kv_dim = n_kv_heads * HEAD_DIM

    def weight(out_features, in_features):
        return rng.standard_normal((out_features, in_features)) / math.sqrt(in_features)

    arrays = {
        "x": rng.standard_normal((B, T, DIM)),
        "n1": 1 + 0.1 * rng.standard_normal(DIM),
        "wq": weight(DIM, DIM),
        "wk": weight(kv_dim, DIM),
        "wv": weight(kv_dim, DIM),
        "wo": weight(DIM, DIM),
        "n2": 1 + 0.1 * rng.standard_normal(DIM),
        "wg": weight(FFN, DIM),
        "wu": weight(FFN, DIM),
        "wd": weight(DIM, FFN),
        "head": weight(VOCAB, DIM),
    }
    targets = rng.integers(0, VOCAB, (B, T))
    targets[0, :2] = -100  # prompt tokens left out of the loss, as in instruction tuning

    def mine(**leaves):
        return llama_layer_minift(n_kv_heads, targets, **leaves)

    def theirs(**leaves):
        return llama_layer_torch(n_kv_heads, targets, **leaves)

    run_both(mine, theirs, arrays)
