"""The memory ledger (issue 10): predictions from the config agree with tracemalloc measurements of
a real training step, and lecture 003's 7B table comes out of the same formulas."""

import pytest

from minift.cli import main
from minift.io import save_model
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.studies.memory import MIXED, ROWS, Ledger, ledger, llama_shape, parameter_counts, predict, projection
from minift.training.methods import MethodOptions

# Large enough that arrays dwarf the Python objects around them (~0.1 MB), small enough to step in a second.
CONFIG = LlamaConfig(vocab_size=1024, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=704, max_seq_len=128)
OPTIONS = MethodOptions(lora_r=32)


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM(CONFIG)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_every_predicted_row_is_within_10_percent_of_tracemalloc(model, method):
    result = ledger(model, method, batch=4, seq=64, options=OPTIONS)
    assert result.rows_off(0.10) == [], str(result)
    if method == "qlora":  # read from nbytes on both sides: exact
        for row in ("weights nf4 codes", "weights nf4 state"):
            assert result.predicted[row] == result.measured[row] > 0
    assert "activations" in str(result) and "%" in str(result)


def test_the_predicted_rows_tell_the_lecture_story():
    rows = {m: predict(CONFIG, m, 4, 64, OPTIONS) for m in ("full", "lora", "qlora", "last")}
    n = sum(p.size for p in LlamaForCausalLM(CONFIG).parameters())
    assert rows["full"]["weights fp32"] == rows["full"]["gradients"] == 4 * n
    assert rows["full"]["optimizer state"] == 8 * n
    assert rows["lora"]["gradients"] == rows["qlora"]["gradients"] < rows["full"]["gradients"] / 10
    assert rows["lora"]["activations"] < rows["full"]["activations"]  # frozen linears save no input
    assert rows["qlora"]["activations"] == rows["lora"]["activations"]
    quantized = sum(rows["qlora"][r] for r in ("weights nf4 codes", "weights nf4 state"))
    assert 8 * quantized / parameter_counts(CONFIG)["linear"] == pytest.approx(4.127, abs=0.002)
    assert rows["last"]["activations"] < rows["full"]["activations"] / 1.5  # frozen blocks keep nothing
    for method, r in rows.items():
        assert r["peak"] > sum(r[k] for k in ("weights fp32", "weights nf4 codes", "optimizer state")), method


def test_the_ledger_refuses_methods_it_does_not_model():
    with pytest.raises(ValueError, match="predicts methods"):
        predict(CONFIG, "prefix", 1, 8)


def test_lecture_003s_7b_table_from_the_same_formulas():
    table = projection(7e9)
    gb = 1e9
    assert table["full"]["optimizer state"] == 84 * gb  # fp32 master + m + v = 12 B per parameter
    assert table["full"]["weights fp32"] == table["full"]["gradients"] == 14 * gb  # bf16
    assert 15 * gb < table["lora"]["peak"] < 17 * gb  # lecture: 16 GB
    assert 5.5 * gb < table["qlora"]["peak"] < 7 * gb  # lecture: 6 GB
    nf4 = table["qlora"]["weights nf4 codes"] + table["qlora"]["weights nf4 state"]
    shape = llama_shape(7e9)
    assert (shape.n_layers, shape.dim, shape.ffn_dim) == (32, 4096, 11008)  # Llama-2 7B
    counts = parameter_counts(shape)
    linear = 7e9 * counts["linear"] / sum(counts.values())  # 96% of the weights are block Linears
    assert 8 * nf4 / linear == pytest.approx(4.127, abs=0.001)
    assert table["qlora"]["activations"] == table["lora"]["activations"]
    assert MIXED.checkpointing


def test_the_7b_table_with_8bit_moments_halves_the_full_optimizer_column():
    """fp32 master weights (4 B) + two 8-bit moments with an fp32 absmax per 256 (2.03 B): the
    84 GB of full fine-tuning's optimizer state become ~42 GB, and the step fits under 80 GB."""
    plain, eight = projection(7e9), projection(7e9, optimizer="adamw8bit")
    gb = 1e9
    assert eight["full"]["optimizer state"] == pytest.approx(7e9 * (4 + 2 + 8 / 256), rel=1e-3)
    assert eight["full"]["weights fp32"] == plain["full"]["weights fp32"]
    assert eight["full"]["gradients"] == plain["full"]["gradients"]
    assert 70 * gb < eight["full"]["peak"] < 80 * gb < plain["full"]["peak"]
    assert eight["lora"]["optimizer state"] < plain["lora"]["optimizer state"]  # the adapters are 8-bit too


def test_minift_memory_projects_8bit_moments_and_says_so(capsys):
    assert main(["memory", "--params", "7e9", "--optim", "adamw8bit"]) == 0
    out = capsys.readouterr().out
    assert "AdamW8bit" in out and "2.03 bytes" in out and "42.22" in out


def test_minift_memory_prints_the_projection_with_its_assumptions(capsys):
    assert main(["memory", "--params", "7e9"]) == 0
    out = capsys.readouterr().out
    assert "84.00" in out and "gradient checkpointing" in out and "bf16" in out and "qlora" in out


def test_minift_memory_measures_a_saved_model(tmp_path, capsys):
    save_model(LlamaForCausalLM(LlamaConfig(vocab_size=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=1,
                                            ffn_dim=128, max_seq_len=32)), tmp_path)
    assert main(["memory", "--model", str(tmp_path), "--method", "qlora", "--batch", "2", "--seq", "16"]) == 0
    out = capsys.readouterr().out
    assert "method qlora" in out and "weights nf4 codes" in out and "measured" in out
    assert main(["memory"]) == 1


def test_activations_grow_with_the_square_of_the_sequence_only_through_attention():
    short, long = (predict(CONFIG, "full", 1, t)["activations"] for t in (32, 64))
    attention = 4 * CONFIG.n_layers * CONFIG.n_heads * (64 * 64 - 2 * 32 * 32)
    rope = 4 * 2 * CONFIG.head_dim * (64 - 2 * 32)
    assert long - 2 * short == attention + rope


def test_rows_off_names_a_missed_row_and_a_row_predicted_from_nothing():
    measured = dict.fromkeys(ROWS, 1000)
    measured["weights nf4 codes"] = 0
    predicted = {**measured, "gradients": 1100, "peak": 1099, "weights nf4 codes": 8}
    result = Ledger("lora", 1, 8, predicted, measured)
    assert result.rows_off(0.10) == ["weights nf4 codes", "gradients"]
    assert Ledger("lora", 1, 8, measured, measured).rows_off(0.10) == []


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_8bit_adamw_is_predicted_within_10_percent_and_stores_a_quarter_of_the_moments(model, method):
    """``--optim adamw8bit`` (issue 19): 2 bytes + 8 per 256 for each tensor of 4096 values or more,
    8 below; the per-tensor sizes the prediction uses add up to the trainable count. (LoRA's
    8-bit state here is 0.2 MiB, too little for the Python objects around it to stay under 10%.)"""
    from minift.studies.memory import trainable_count, trainable_sizes

    for each in ("full", "freeze", "last", "lora", "qlora"):
        assert sum(trainable_sizes(CONFIG, each, OPTIONS)) == trainable_count(CONFIG, each, OPTIONS), each
    result = ledger(model, method, batch=4, seq=64, options=OPTIONS, optimizer="adamw8bit")
    assert result.rows_off(0.10) == [], str(result)
    assert "optimizer adamw8bit" in str(result)
    fp32 = predict(CONFIG, method, 4, 64, OPTIONS)["optimizer state"]
    assert 0.25 < result.predicted["optimizer state"] / fp32 < 0.27  # 2.03 of 8 bytes, plus the small tensors


FOUR_BLOCKS = LlamaConfig(vocab_size=1024, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704, max_seq_len=128)


@pytest.mark.parametrize(("method", "blocks"), [("lora", 2), ("full", 2), ("freeze", 3)])
def test_checkpointing_some_blocks_is_predicted_within_10_percent(method, blocks):
    """``--gradient-checkpointing N`` (issue 19): the bottom N blocks keep their input, the rest
    everything. freeze's bottom 2 of 4 blocks record nothing, so N = 3 covers one recorded block."""
    from minift.studies.memory import Precision, plain_block_bytes, recompute_bytes

    result = ledger(LlamaForCausalLM(FOUR_BLOCKS), method, batch=4, seq=64, options=OPTIONS, checkpointing=True,
                    checkpointed_blocks=blocks)
    assert result.rows_off(0.10) == [], str(result)
    assert f"gradient checkpointing of {blocks} blocks" in str(result)
    none, some, every = (predict(FOUR_BLOCKS, method, 4, 64, OPTIONS, Precision(checkpointing=True,
                                                                                checkpointed_blocks=n))
                         for n in (0, blocks, None))
    assert every["activations"] < some["activations"] < none["activations"]
    one_block = recompute_bytes(FOUR_BLOCKS, method, OPTIONS, 4, 64, Precision(checkpointing=True))
    kept_input = 4 * 4 * 64 * FOUR_BLOCKS.dim
    assert some["activations"] - every["activations"] == (4 - blocks) * (one_block - kept_input)
    assert plain_block_bytes(FOUR_BLOCKS, method, OPTIONS, 4, 64, Precision(checkpointing=True,
                                                                            checkpointed_blocks=blocks)) \
        == (4 - blocks) * one_block
    with pytest.raises(ValueError, match=r"pass a count in 0\.\.4"):
        predict(FOUR_BLOCKS, method, 4, 64, OPTIONS, Precision(checkpointing=True, checkpointed_blocks=5))
