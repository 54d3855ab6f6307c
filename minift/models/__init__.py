"""Model definitions: the Llama-style decoder and text generation."""

from minift.models.generate import generate
from minift.models.llama import KVCache, LlamaConfig, LlamaForCausalLM

__all__ = ["KVCache", "LlamaConfig", "LlamaForCausalLM", "generate"]
