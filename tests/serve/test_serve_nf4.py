"""Adapters served over an NF4 base (``minift serve --quantize nf4``, issue 17).

Reference: the same base quantized the same way, then *dequantized* into float Linear layers
(``dequantize_model``), with the adapter merged in, run on the request alone. Both sides see the
same weights Q(W); they differ only in float32 rounding (W x + s B (A x) against (W + s B A) x,
and the NF4 matmul's decoded temporary against a stored one), so the logits must agree to 2e-5
and the greedy tokens exactly.
"""

import copy

import numpy as np
import pytest
from serve_fixtures import base_model, write_adapters

from minift.nn import Linear4bit, dequantize_model, quantize_model
from minift.peft import PeftModel
from minift.serve import Request, build_engine

TOL = 2e-5  # float32; measured 1.7e-6 (the float base instead of Q(W) is off by 3.4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_adapters(tmp_path_factory.mktemp("adapters"), names=["r1", "r8"])


def dequantized_reference(folder):
    """The NF4 base as float weights, the adapter merged into them."""
    model = base_model(np.float32)
    quantize_model(model)
    dequantize_model(model)
    return PeftModel.from_pretrained(copy.deepcopy(model), folder).merge_and_unload() if folder else model


def check_against_dequantized(engine, folders, requests):
    done = engine.generate(requests, record_logits=True)
    for request, completion in zip(requests, done):
        reference = dequantized_reference(folders.get(request.adapter))
        tokens = reference.generate([request.prompt], request.max_tokens)[0].tolist()
        assert completion.tokens == tokens, request
        logits = reference(np.array([request.prompt + tokens[:-1]])).data[0, len(request.prompt) - 1:]
        np.testing.assert_allclose(completion.logits, logits, rtol=TOL, atol=TOL)


REQUESTS = [Request([3, 1, 4, 1, 5], "r1", 6), Request([2, 7], None, 5), Request([9, 2, 6], "r8", 6)]


def test_a_batch_over_the_nf4_base_equals_each_request_on_the_dequantized_base(folders):
    engine = build_engine(base_model(np.float32), folders, n_slots=2, quantize="nf4")
    wrapped = engine.layers["model.layers.0.self_attn.q_proj"]
    assert isinstance(wrapped.base_layer, Linear4bit)  # served from the 4-bit codes, no float copy of W
    check_against_dequantized(engine, folders, REQUESTS)


def test_runtime_adapters_over_the_nf4_base(folders):
    engine = build_engine(base_model(np.float32), {}, n_slots=2, quantize="nf4", wrap_all=True, max_rank=8)
    assert all(isinstance(layer.base_layer, Linear4bit) for layer in engine.layers.values())
    for name in ("r1", "r8"):
        engine.add_adapter(name, folders[name])
    check_against_dequantized(engine, folders, REQUESTS)


def test_only_nf4_is_a_quantization_choice():
    with pytest.raises(ValueError, match="quantize must be None or 'nf4', got 'int8'"):
        build_engine(base_model(np.float32), {}, quantize="int8")
