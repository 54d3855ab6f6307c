"""Which parameters get weight decay: the usual two-group split for AdamW.

Weight decay pulls every weight towards zero by ``lr * wd`` of itself each step (lecture 000's
typical ``wd = 0.01``). That is a sensible prior for the big matrices, but wrong for
* biases and the gains of RMSNorm/LayerNorm: a norm gain's natural value is 1, not 0, and
  these few numbers set scales rather than store knowledge;
* embeddings: AdamW's decay acts on every row every step, so the rows of tokens that seldom
  appear in a batch would shrink towards zero between the rare steps that use them.
Leaving biases and norm gains undecayed is near universal (HF Trainer, minGPT, nanoGPT);
leaving embeddings undecayed follows minGPT (nanoGPT and HF Trainer do decay them). Pass your
own ``no_decay`` patterns to choose differently.
"""

from __future__ import annotations

NO_DECAY = ("bias", "norm", "embed", "wte", "wpe")


def weight_decay_groups(named_parameters, weight_decay: float, no_decay=NO_DECAY) -> list[dict]:
    """``[{decayed params, weight_decay}, {the others, weight_decay 0}]`` for an optimizer.

    ``named_parameters`` is an iterable of ``(name, tensor)`` pairs, e.g. a Module's
    ``named_parameters()``. A parameter skips decay when it is 1-D (biases, norm gains) or its
    lower-cased name contains one of ``no_decay``: "norm" covers ``input_layernorm`` and
    ``attention_norm``; "embed" covers ``embed_tokens`` and ``tok_embeddings``; "wte"/"wpe" are
    GPT-2's token and position tables. Frozen parameters are left out: they need no optimizer.
    Both groups are always returned (possibly empty), decayed first.
    """
    decay, no_decay_params = [], []
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or any(pattern in name.lower() for pattern in no_decay)
        (no_decay_params if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay_params, "weight_decay": 0.0}]
