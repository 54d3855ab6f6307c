"""Fine-tuning methods as model surgery: each one only decides what is trainable (and may add
a few new parameters). The Trainer is the same for all of them.

From most to least that changes (lectures 000, 003, 004):
    full     every parameter is trained
    freeze   the embedding and the first N blocks are frozen, the rest is trained
    last     only the last N blocks and the final norm are trained (last-layer tuning)
    lora     everything frozen; low-rank B A added to the attention projections
    qlora    lora on a 4-bit base: every block Linear stored in NF4 (minift/quant), then lora
    adapter  everything frozen; a bottleneck adapter after attention and MLP of each block
    prefix   everything frozen; learned key/value prefixes in every attention layer
"""

from __future__ import annotations

from dataclasses import dataclass

from minift.models import ATTENTION_PROJECTIONS
from minift.nn import freeze_layers, quantize_model, train_only_last_layers, unfreeze
from minift.peft import LoraConfig, get_peft_model
from minift.peft.adapters import add_bottleneck_adapters
from minift.peft.prefix import add_prefix_tuning

METHODS = ("full", "freeze", "last", "lora", "qlora", "adapter", "prefix")


@dataclass
class MethodOptions:
    layers: int | None = None  # freeze: blocks frozen from the bottom; last: blocks trained on top
    lora_r: int = 8
    lora_alpha: float = 16
    lora_targets: tuple[str, ...] = ATTENTION_PROJECTIONS
    bottleneck: int = 16
    nf4_blocksize: int = 64  # qlora: NF4 block size (double quantization always on)
    prefix_tokens: int = 8
    seed: int = 0


def prepare_model(model, method: str, options: MethodOptions | None = None):
    """Make ``model`` ready for ``method``; returns (model to train, one-line description).

    LoRA returns a ``PeftModel`` wrapping the model; the other methods change it in place.
    """
    o = options or MethodOptions()
    total = model.config.n_layers
    unfreeze(model)
    if method == "full":
        return model, "full fine-tuning: every parameter is trained"
    if method == "freeze":
        n = total // 2 if o.layers is None else o.layers
        freeze_layers(model, n)
        return model, f"layer freezing: embedding and blocks 0..{n - 1} frozen, blocks {n}..{total - 1} trained"
    if method == "last":
        n = 1 if o.layers is None else o.layers
        train_only_last_layers(model, n)
        return model, f"last-layer tuning: only the last {n} block(s) and the final norm are trained"
    if method in ("lora", "qlora"):
        quantized = quantize_model(model, o.nf4_blocksize) if method == "qlora" else []
        config = LoraConfig(r=o.lora_r, lora_alpha=o.lora_alpha, target_modules=list(o.lora_targets), seed=o.seed)
        base = (f"QLoRA: {len(quantized)} Linear layers in NF4 (block {o.nf4_blocksize}, double quant), "
                if quantized else "")
        return get_peft_model(model, config), (f"{base}LoRA r={o.lora_r} alpha={o.lora_alpha} on "
                                               f"{','.join(o.lora_targets)}: h = Wx + (alpha/r) B A x")
    if method == "adapter":
        return (add_bottleneck_adapters(model, o.bottleneck, seed=o.seed),
                f"bottleneck adapters (width {o.bottleneck}) after attention and MLP of every block")
    if method == "prefix":
        return (add_prefix_tuning(model, o.prefix_tokens, seed=o.seed),
                f"prefix tuning: {o.prefix_tokens} learned key/value vectors per layer")
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
