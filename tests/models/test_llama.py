import numpy as np
import pytest

import minift.autograd.functional as F
from minift.autograd import op_counts
from minift.backend import to_numpy
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.models.generate import filter_logits
from minift.nn import freeze, freeze_layers

SMALL = dict(vocab_size=50, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)


def small_model(**overrides):
    return LlamaForCausalLM(LlamaConfig(**{**SMALL, **overrides}), seed=0)


def test_parameter_names_follow_the_hugging_face_llama_layout():
    names = {n for n, _ in small_model(tie_embeddings=False).named_parameters()}
    for suffix in ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                   "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                   "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]:
        assert f"model.layers.2.{suffix}" in names
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names


def test_parameter_count_matches_the_architecture_formula():
    c = LlamaConfig(**SMALL)
    hd = c.head_dim
    per_block = (c.dim * c.n_heads * hd * 2 + c.dim * c.n_kv_heads * hd * 2  # q, o and k, v
                 + 3 * c.dim * c.ffn_dim + 2 * c.dim)
    tied = c.vocab_size * c.dim + c.n_layers * per_block + c.dim
    assert small_model().num_parameters() == tied
    assert small_model(tie_embeddings=False).num_parameters() == tied + c.vocab_size * c.dim
    biases_per_block = (c.n_heads * hd + 2 * c.n_kv_heads * hd + c.dim  # q, k, v, o biases
                        + 2 * c.ffn_dim + c.dim)  # gate, up, down biases
    biased = small_model(attention_bias=True, mlp_bias=True).num_parameters()
    assert biased == tied + c.n_layers * biases_per_block


@pytest.mark.parametrize("bad", [dict(dim=30), dict(n_kv_heads=3), dict(n_layers=0), dict(dim=36, n_heads=12)])
def test_invalid_configs_are_rejected_with_the_field_named(bad):
    with pytest.raises(ValueError, match="LlamaConfig"):
        LlamaConfig(**{**SMALL, **bad})


def test_logits_shape_and_context_limit(backend):
    model = small_model()
    ids = np.arange(20).reshape(2, 10) % 50
    assert model(ids).shape == (2, 10, 50)
    with pytest.raises(ValueError, match="context length"):
        model(np.zeros((1, 65), dtype=np.int64))
    with pytest.raises(ValueError, match="batch, tokens"):
        model(np.zeros(5, dtype=np.int64))


def test_causality_future_tokens_do_not_change_past_logits(backend):
    model = small_model()
    ids = np.random.default_rng(0).integers(0, 50, (1, 12))
    changed = ids.copy()
    changed[0, 8:] = (changed[0, 8:] + 7) % 50
    a, b = to_numpy(model(ids).data), to_numpy(model(changed).data)
    np.testing.assert_array_equal(a[:, :8], b[:, :8])
    assert not np.allclose(a[:, 8:], b[:, 8:])


def test_kv_cache_gives_the_same_logits_and_tokens_as_full_recompute(backend):
    from minift.models import KVCache

    model = small_model()
    ids = np.random.default_rng(1).integers(0, 50, (2, 9))
    full = to_numpy(model(ids).data)
    cache = KVCache(model.config, 2, 16)
    first = to_numpy(model(ids[:, :5], cache=cache).data)
    rest = [to_numpy(model(ids[:, t:t + 1], cache=cache).data) for t in range(5, 9)]
    stepped = np.concatenate([first, *rest], axis=1)
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)
    cached = model.generate(ids, 12, use_cache=True)
    uncached = model.generate(ids, 12, use_cache=False)
    np.testing.assert_array_equal(cached, uncached)


def test_sampling_is_reproducible_and_eos_stops_rows(backend):
    model = small_model()
    ids = np.random.default_rng(2).integers(0, 50, (3, 4))
    a = model.generate(ids, 10, temperature=1.0, top_k=10, top_p=0.9, seed=5)
    b = model.generate(ids, 10, temperature=1.0, top_k=10, top_p=0.9, seed=5)
    np.testing.assert_array_equal(a, b)
    greedy = model.generate(ids, 10)
    eos = int(greedy[0, 2])
    stopped = model.generate(ids, 10, eos_id=eos)
    row = list(stopped[0])
    assert eos in row and all(t == eos for t in row[row.index(eos):])


def test_filter_logits_top_k_and_top_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    # nucleus 0.75: 0.5 alone is not enough, 0.5 + 0.3 is -> two tokens survive
    assert np.isfinite(filter_logits(logits, top_p=0.75)).tolist() == [[True, True, False, False]]
    assert np.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert np.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [[True, False, False, False]]


def test_freezing_the_bottom_skips_its_backward_matmuls(backend):
    """Frozen means frozen (lecture 000): freezing blocks 0-1 removes their dW *and* dx products."""
    ids = np.random.default_rng(3).integers(0, 50, (2, 8))

    def backward_matmuls(model):
        loss = F.cross_entropy(model(ids), ids)
        op_counts.clear()
        loss.backward()
        return op_counts["matmul"]

    # A trained block costs 18 backward products: 7 linears x (dx + dW) and 4 in attention
    # (dV, dP, dQ, dK). The tied head adds 2: d(hidden) and d(embedding matrix).
    per_block = 7 * 2 + 4
    assert backward_matmuls(small_model()) == 3 * per_block + 2
    # Blocks 0-1 and the embedding (= the tied head) frozen: the gradient stops at block 2,
    # so the frozen blocks cost nothing and the head costs only d(hidden).
    partly = small_model()
    freeze_layers(partly, 2)
    assert backward_matmuls(partly) == per_block + 1
    only_embedding = small_model()
    freeze(only_embedding, "embed")
    assert backward_matmuls(only_embedding) == 3 * per_block + 1


def test_float64_model_gradient_matches_finite_differences():
    model = small_model(n_layers=1, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=24).to(np.float64)
    ids = np.random.default_rng(4).integers(0, 50, (1, 6))
    targets = np.random.default_rng(5).integers(0, 50, (1, 6))
    F.cross_entropy(model(ids), targets).backward()
    for name, p in model.named_parameters():
        flat = p.data.reshape(-1)
        i = int(np.argmax(np.abs(p.grad.reshape(-1))))
        old = flat[i]
        flat[i] = old + 1e-6
        up = F.cross_entropy(model(ids), targets).item()
        flat[i] = old - 1e-6
        down = F.cross_entropy(model(ids), targets).item()
        flat[i] = old
        np.testing.assert_allclose(p.grad.reshape(-1)[i], (up - down) / 2e-6, rtol=1e-5, atol=1e-9, err_msg=name)


def test_a_left_padded_row_with_its_own_positions_equals_the_row_alone(backend):
    """Serving batches requests of different lengths by left padding: with per-row positions
    and a key mask, each row's logits equal that request run alone."""
    model = small_model()
    short, long = [5, 9, 2], [7, 1, 3, 3, 8, 4]
    alone = to_numpy(model(np.array([short])).data)[0]
    ids = np.array([[0, 0, 0, *short], long])
    mask = np.array([[False] * 3 + [True] * 3, [True] * 6])
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    batched = to_numpy(model(ids, attention_mask=mask, positions=positions).data)
    np.testing.assert_allclose(batched[0, 3:], alone, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batched[1], to_numpy(model(np.array([long])).data)[0], rtol=1e-5, atol=1e-5)
