"""``minift memory --gradient-checkpointing`` and ``--compare-checkpointing`` (issue 19): what
checkpointing saves, measured by tracemalloc on a real step, not only projected."""

import pytest

from minift.cli import main
from minift.io import save_model
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.studies.memory import ROWS, compare_checkpointing
from minift.training.methods import MethodOptions

CONFIG = LlamaConfig(vocab_size=256, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=352, max_seq_len=64)
SHAPE = ["--method", "lora", "--batch", "2", "--seq", "64", "--lora-r", "8"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_model(LlamaForCausalLM(CONFIG), tmp_path_factory.mktemp("tiny"))


def columns(out: str) -> dict[str, list[str]]:
    """Each ledger row of the printed table: its numbers, in print order."""
    return {row: line[len(row):].split() for line in out.splitlines() for row in ROWS if line.startswith(row + " ")}


def test_compare_prints_the_plain_and_the_checkpointed_measurement_side_by_side(folder, capsys):
    assert main(["--threads", "1", "memory", "--model", str(folder), *SHAPE, "--compare-checkpointing"]) == 0
    table = columns(capsys.readouterr().out)
    assert set(table) == set(ROWS)
    _, plain, _, checkpointed, ratio = table["activations"]
    # three blocks' activations shrink to three block inputs: the head's probabilities remain
    assert float(checkpointed) < 0.5 * float(plain)
    assert float(ratio.rstrip("x")) == pytest.approx(float(checkpointed) / float(plain), abs=0.02)  # MiB rounded
    _, plain_peak, _, checkpointed_peak, _ = table["peak"]
    assert float(checkpointed_peak) < float(plain_peak)
    assert table["gradients"][0] == table["gradients"][2]  # the same adapters train either way


def test_the_checkpointed_ledger_is_the_comparisons_second_column(folder, capsys):
    assert main(["--threads", "1", "memory", "--model", str(folder), *SHAPE, "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "gradient checkpointing" in out
    comparison = compare_checkpointing(LlamaForCausalLM(CONFIG), "lora", 2, 64, MethodOptions(lora_r=8))
    predicted = {row: numbers[0] for row, numbers in columns(out).items()}
    assert predicted == {row: f"{comparison.checkpointed.predicted[row] / 2**20:.2f}" for row in ROWS}
    assert comparison.ratio("activations") < 0.5 and comparison.ratio("weights fp32") == pytest.approx(1, abs=0.01)


def test_the_projection_refuses_the_checkpointing_flags(capsys):
    assert main(["memory", "--params", "7e9", "--compare-checkpointing"]) == 1
    assert "already assumes checkpointing" in capsys.readouterr().err
