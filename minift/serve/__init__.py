"""Multi-LoRA serving (lecture 004; Punica, S-LoRA): one base model, many adapters, one batch.

Reading order: ``multi_lora.py`` (the gathered per-row delta), ``library.py`` (loading and
checking adapters), ``slots.py`` (the device-slot cache, LRU), ``engine.py`` (batched generation
with left padding and per-row caches), ``scheduler.py`` (continuous batching: requests join and
leave the running batch at every step), ``server.py`` (the OpenAI-compatible HTTP endpoints:
completions and chat, streamed or not).
"""

from minift.serve.engine import Completion, Request, ServingEngine, build_engine, plan_batches
from minift.serve.library import Adapter, AdapterError, AdapterLibrary
from minift.serve.multi_lora import NO_ADAPTER, MultiLoraLinear, add_multi_lora, lora_gather_delta
from minift.serve.scheduler import Scheduler
from minift.serve.slots import AdapterSlots, CacheStats, SlotBudgetError

__all__ = ["NO_ADAPTER", "Adapter", "AdapterError", "AdapterLibrary", "AdapterSlots", "CacheStats", "Completion",
           "MultiLoraLinear", "Request", "Scheduler", "ServingEngine", "SlotBudgetError", "add_multi_lora",
           "build_engine", "lora_gather_delta", "plan_batches"]
