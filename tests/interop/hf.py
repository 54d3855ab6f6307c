"""Helpers for the interop tests: the same small Llama built in minift and in transformers."""

import numpy as np

from minift.models import LlamaConfig, LlamaForCausalLM

SMALL = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64,
             rope_theta=10000.0, norm_eps=1e-5)


def minift_model(seed=0, **overrides):
    """A small random minift Llama, with norm weights perturbed so they are not all ones."""
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL, **overrides}), seed=seed)
    rng = np.random.default_rng(seed + 1)
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith(".bias"):
            p.data = (p.data + rng.normal(0, 0.1, p.shape)).astype(p.dtype)
    return model


def hf_twin(model):
    """A transformers LlamaForCausalLM with exactly ``model``'s weights (float32)."""
    import torch
    import transformers

    c = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
        attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    state = {name: torch.from_numpy(np.array(p.data)) for name, p in model.named_parameters()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    return hf
