"""The experiments the command line runs, each one a composition of the layers below.

``experiment.py`` (the protocol both comparisons share: the same copies, batches and held-out
sets for every method), ``demo.py`` (pretrain a tiny model, fine-tune it seven ways),
``forgetting.py`` (what fine-tuning SmolLM2 costs on general English), ``memory.py`` (the memory
ledger of a training step), ``qlora_merge.py`` (three ways to merge a QLoRA adapter),
``serve_bench.py`` (throughput of the multi-LoRA server). The layer under ``minift.cli``
(docs/design.md).
"""
