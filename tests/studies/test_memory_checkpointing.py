"""The memory ledger with gradient checkpointing (issue 19): the predicted rows agree with
tracemalloc as the plain rows do, and the activations shrink to the blocks' inputs."""

import pytest

from minift.models import LlamaConfig, LlamaForCausalLM
from minift.studies.memory import Precision, ledger, predict, recompute_bytes
from minift.training.methods import MethodOptions

CONFIG = LlamaConfig(vocab_size=1024, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=704, max_seq_len=128)
OPTIONS = MethodOptions(lora_r=32)
CHECKPOINTING = Precision(checkpointing=True)


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM(CONFIG)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_every_checkpointed_row_is_within_10_percent_of_tracemalloc(model, method):
    result = ledger(model, method, batch=4, seq=64, options=OPTIONS, checkpointing=True)
    assert result.rows_off(0.10) == [], str(result)
    assert "gradient checkpointing" in str(result)


def test_checkpointing_keeps_one_input_per_block_and_one_block_in_backward():
    plain, checkpointed = (predict(CONFIG, "lora", 4, 64, OPTIONS, p) for p in (Precision(), CHECKPOINTING))
    head = plain["activations"] - CONFIG.n_layers * recompute_bytes(CONFIG, "lora", OPTIONS, 4, 64, CHECKPOINTING)
    assert checkpointed["activations"] == head + 4 * 4 * 64 * CONFIG.n_layers * CONFIG.dim
    assert checkpointed["peak"] < plain["peak"]
    assert recompute_bytes(CONFIG, "lora", OPTIONS, 4, 64) == 0  # no checkpointing: nothing recomputed
