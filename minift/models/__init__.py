"""Model definitions: the Llama-style decoder and text generation."""

from minift.models.generate import generate
from minift.models.llama import (
    ATTENTION_PROJECTIONS,
    BLOCK_PROJECTIONS,
    MLP_PROJECTIONS,
    KVCache,
    LlamaConfig,
    LlamaForCausalLM,
)

__all__ = ["ATTENTION_PROJECTIONS", "BLOCK_PROJECTIONS", "MLP_PROJECTIONS",
           "KVCache", "LlamaConfig", "LlamaForCausalLM", "generate"]
