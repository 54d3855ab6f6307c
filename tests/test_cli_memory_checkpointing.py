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


@pytest.mark.parametrize("command", [["finetune", "--model", "m", "--out", "x"], ["dpo", "--model", "m", "--out", "x"],
                                     ["memory"]])
def test_the_flag_takes_an_optional_block_count(command):
    """``--gradient-checkpointing [BLOCKS]``: absent = off, alone or "all" = every block, N = the bottom N."""
    from minift.cli import _checkpointed_blocks, build_parser

    parse = build_parser().parse_args
    for flags, blocks in (([], None), (["--gradient-checkpointing"], None), (["--gradient-checkpointing", "all"], None),
                          (["--gradient-checkpointing", "2"], 2), (["--gradient-checkpointing", "0"], 0)):
        args = parse([*command, *flags])
        assert (args.gradient_checkpointing is not None) == bool(flags)
        assert _checkpointed_blocks(args, n_layers=3) == blocks


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_a_value_that_is_no_block_count_is_refused_by_the_parser(value, capsys):
    with pytest.raises(SystemExit):
        main(["memory", "--model", "x", "--gradient-checkpointing", value])
    assert f"{value!r} is not a block count" in capsys.readouterr().err


def test_the_ledger_checkpoints_the_bottom_blocks_asked_for_and_refuses_too_many(folder, capsys):
    assert main(["--threads", "1", "memory", "--model", str(folder), *SHAPE, "--gradient-checkpointing", "1"]) == 0
    assert "gradient checkpointing of 1 blocks" in capsys.readouterr().out
    assert main(["--threads", "1", "memory", "--model", str(folder), *SHAPE, "--gradient-checkpointing", "4"]) == 1
    assert "--gradient-checkpointing 4: the model has 3 blocks; give a count from 0 to 3" in capsys.readouterr().err


def test_compare_honours_the_block_count_and_the_optimizer(folder, capsys):
    """``--compare-checkpointing`` with ``--gradient-checkpointing 1 --optim adamw8bit``: the second
    column checkpoints one block of three, and both columns step the 8-bit optimizer."""
    args = ["--threads", "1", "memory", "--model", str(folder), *SHAPE, "--compare-checkpointing"]
    assert main(args) == 0
    every_block = columns(capsys.readouterr().out)
    assert main([*args, "--gradient-checkpointing", "1", "--optim", "adamw8bit"]) == 0
    out = capsys.readouterr().out
    assert "optimizer adamw8bit, the bottom 1 blocks checkpointed" in out
    one_block = columns(out)
    # checkpointed activations: one block recomputed keeps the other two blocks' activations
    assert float(one_block["activations"][3]) > 1.5 * float(every_block["activations"][3])
    assert one_block["activations"][0] == every_block["activations"][0]  # the plain column's prediction is unchanged
    # LoRA's adapters are under 4,096 numbers each: they keep 32-bit moments, so the state matches
    assert one_block["optimizer state"][0] == every_block["optimizer state"][0]
