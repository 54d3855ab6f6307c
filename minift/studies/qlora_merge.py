"""Merging a QLoRA adapter: three ways to fold s B A into a 4-bit base, and what each does to the logits.

An adapter trained with QLoRA learned to correct the *quantized* base Q(W): the model it was
trained as is  y = Q(W) x + s B A x.  Folding it into one weight can be done three ways:

    re-quantized    W' = Q(Q(W) + s B A)     stays 4-bit; a second rounding error on every weight
    float, dequant. W' = Q(W) + s B A        exact (up to float rounding), but 16/32-bit again
    float, original W' = W + s B A           the unquantized checkpoint: the adapter never saw W,
                                             so the quantization error of the base comes back

``merge_drift`` measures each against the adapter kept separate (what was trained), plus the
quantization error of the base alone for scale. ``benchmarks/quant_study.py`` prints it for a
small random Llama and, when it is available, for SmolLM2.
"""

from __future__ import annotations

import copy

import numpy

from minift.backend import to_numpy
from minift.nn.linear4bit import Linear4bit, dequantize_model, quantize_model
from minift.peft import LoraConfig, LoraLinear, get_peft_model
from minift.training.export import format_drift, logit_drift, model_logits


def random_adapter(peft_model, relative_size: float = 0.02, seed: int = 0) -> None:
    """Give every lora_B random values scaled so that ||s B A|| = ``relative_size`` * ||W|| in each
    adapted layer — a stand-in for a trained adapter (which starts at B = 0 and moves away)."""
    rng = numpy.random.default_rng(seed)
    layers = [m for _, m in peft_model.named_modules() if isinstance(m, LoraLinear)]
    if not layers:
        raise ValueError(f"random_adapter: {type(peft_model).__name__} has no LoRA layer")
    for module in layers:
        base = module.base_layer
        w_norm = numpy.linalg.norm(to_numpy(base.dequantized_weight() if isinstance(base, Linear4bit)
                                            else base.weight.data))
        for adapter in module.lora_B.keys():
            b = module.lora_B[adapter].weight
            b.data = rng.standard_normal(b.shape).astype(b.dtype)
            b.data *= b.dtype.type(relative_size * w_norm / numpy.linalg.norm(to_numpy(module.delta_weight(adapter))))


def merge_drift(model, config: LoraConfig, input_ids, blocksize: int = 64, relative_size: float = 0.02,
                seed: int = 0) -> dict[str, dict[str, float]]:
    """Logit drift of each way of merging, against the adapter kept separate on the NF4 base.

    ``model`` (float, not modified) is quantized, gets an adapter of ``relative_size`` from
    ``random_adapter``, and is
    run on ``input_ids``. Rows: "no adapter: NF4 vs float base" (the quantization error itself,
    for scale), "merged, re-quantized", "merged into dequantized float", "merged into original float".
    """
    qlora = copy.deepcopy(model)
    quantize_model(qlora, blocksize)
    qlora = get_peft_model(qlora, config)
    random_adapter(qlora, relative_size, seed)
    adapter = {n: p.data for n, p in qlora.named_parameters() if ".lora_" in n}
    reference = model_logits(qlora, input_ids)
    with qlora.disable_adapter():
        quantization_error = logit_drift(model_logits(qlora, input_ids), model_logits(model, input_ids))
    rows = {"no adapter: NF4 vs float base": quantization_error}

    requantized = copy.deepcopy(qlora)
    requantized.merge_adapter()
    rows["merged, re-quantized"] = logit_drift(model_logits(requantized, input_ids), reference)
    del requantized

    dequantized = copy.deepcopy(qlora)
    dequantize_model(dequantized)
    merged = dequantized.merge_and_unload()
    rows["merged into dequantized float"] = logit_drift(model_logits(merged, input_ids), reference)
    del dequantized, merged

    original = get_peft_model(copy.deepcopy(model), config)
    for name, p in original.named_parameters():
        if name in adapter:
            p.data = adapter[name]
    rows["merged into original float"] = logit_drift(model_logits(original.merge_and_unload(), input_ids), reference)
    return rows


def format_merge_drift(rows: dict[str, dict[str, float]]) -> str:
    return format_drift(rows, "against the adapter kept separate")
