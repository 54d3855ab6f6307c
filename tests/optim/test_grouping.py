"""weight_decay_groups: matrices decay; biases, norm gains, embeddings and 1-D tensors do not."""

import numpy as np

from minift.backend import asarray, to_numpy
from minift.models.llama import LlamaConfig, LlamaForCausalLM
from minift.nn.module import Parameter
from minift.optim import AdamW, weight_decay_groups


def names_of(group, named):
    by_id = {id(p): n for n, p in named}
    return sorted(by_id[id(p)] for p in group["params"])


def test_llama_split():
    config = LlamaConfig(n_layers=1, attention_bias=True, tie_embeddings=False)
    named = list(LlamaForCausalLM(config).named_parameters())
    decay, no_decay = weight_decay_groups(named, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    layer = "model.layers.0."
    assert names_of(no_decay, named) == sorted(
        ["model.embed_tokens.weight", "model.norm.weight", layer + "input_layernorm.weight",
         layer + "post_attention_layernorm.weight"] + [f"{layer}self_attn.{x}_proj.bias" for x in "qkvo"])
    assert names_of(decay, named) == sorted(
        [f"{layer}self_attn.{x}_proj.weight" for x in "qkvo"]
        + [f"{layer}mlp.{x}_proj.weight" for x in ("gate", "up", "down")] + ["lm_head.weight"])


def test_names_from_other_model_families():
    matrix = np.ones((2, 2))
    named = [(name, Parameter(matrix)) for name in
             ["tok_embeddings.weight", "transformer.wte.weight", "transformer.wpe.weight",
              "layers.0.attention_norm.weight", "h.0.ln_1.LayerNorm.weight", "h.0.attn.c_attn.weight"]]
    named.append(("layers.0.gate.scale", Parameter(np.ones(3))))  # 1-D: no decay whatever its name
    decay, no_decay = weight_decay_groups(named, 0.1)
    assert names_of(decay, named) == ["h.0.attn.c_attn.weight"]
    assert len(no_decay["params"]) == 6


def test_frozen_parameters_are_left_out_and_custom_patterns_apply():
    frozen = Parameter(np.ones((2, 2)), requires_grad=False)
    head = Parameter(np.ones((2, 2)))
    named = [("frozen.weight", frozen), ("lm_head.weight", head)]
    assert [len(g["params"]) for g in weight_decay_groups(named, 0.1)] == [1, 0]
    assert [len(g["params"]) for g in weight_decay_groups(named, 0.1, no_decay=("lm_head",))] == [0, 1]


def test_adamw_decays_only_the_first_group(backend):
    # zero gradients isolate the decay: the matrix shrinks by (1 - lr*wd), the bias does not move
    w, b = Parameter(asarray(np.full((2, 2), 2.0))), Parameter(asarray(np.full(2, 2.0)))
    opt = AdamW(weight_decay_groups([("fc.weight", w), ("fc.bias", b)], 0.1), lr=0.5)
    w.grad, b.grad = asarray(np.zeros((2, 2))), asarray(np.zeros(2))
    opt.step()
    assert to_numpy(w.data).tolist() == [[2.0 * 0.95] * 2] * 2
    assert to_numpy(b.data).tolist() == [2.0, 2.0]
