"""The comparison shared by the demo and the forgetting study: same start, same batches, same yardsticks."""

import numpy as np

from minift.backend import to_numpy
from minift.data import ByteTokenizer, DataLoader
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.studies.experiment import (
    LEARNING_RATES,
    TINY_MODEL_LEARNING_RATES,
    Recipe,
    Yardsticks,
    compare_methods,
    finetune,
    general_sets,
    insurer_sets,
    measure,
)
from minift.training.methods import METHODS

TOK = ByteTokenizer()


def tiny():
    return LlamaForCausalLM(LlamaConfig(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                        ffn_dim=48, max_seq_len=384), seed=0)


def setup(model):
    """A two-step recipe and small yardsticks on the bundled sets."""
    train_set, eval_set = insurer_sets(TOK, model.config.max_seq_len, "You answer for an insurer.")
    qa, general = general_sets(TOK, 32, 2, blocks=2, questions=2)
    domain = DataLoader([eval_set[i] for i in range(3)], 3, shuffle=False, pad_id=TOK.pad_id)
    recipe = Recipe(train_set, steps=2, batch_size=2, learning_rates=LEARNING_RATES, progress=False)
    return recipe, Yardsticks(domain, general, qa)


def weights(model):
    return {name: to_numpy(w).copy() for name, w in model.state_dict().items()}


def test_every_method_has_a_learning_rate_in_both_tables():
    assert set(LEARNING_RATES) == set(METHODS) == set(TINY_MODEL_LEARNING_RATES)


def test_general_sets_take_the_first_n_or_everything():
    qa, loader = general_sets(TOK, 64, 4, blocks=3, questions=5)
    all_qa, all_blocks = general_sets(TOK, 64, 4, blocks=None, questions=None)
    assert len(qa) == 5 and qa == all_qa[:5] and len(all_qa) > 5
    assert len(loader.dataset) == 3 and len(all_blocks.dataset) > 3
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(loader.dataset, all_blocks.dataset))


def test_every_copy_starts_from_the_base_and_sees_the_same_batches():
    """Two copies trained with one recipe end bit-for-bit equal (each gets a new loader at the first
    batch), and the base they were copied from does not move."""
    base = tiny()
    before = weights(base)
    recipe, _ = setup(base)
    first, seconds = finetune(base, TOK, "full", recipe)
    second, _ = finetune(base, TOK, "full", recipe)
    assert seconds > 0
    assert all((before[k] == v).all() for k, v in weights(base).items())
    assert any(not np.array_equal(before[k], v) for k, v in weights(first).items())  # training did something
    assert all(np.array_equal(weights(second)[k], v) for k, v in weights(first).items())


def test_compare_methods_measures_the_base_then_one_copy_per_method():
    base = tiny()
    recipe, sticks = setup(base)
    runs = list(compare_methods(base, TOK, ("full", "lora"), recipe, sticks))
    assert [name for name, *_ in runs] == ["pretrained", "full", "lora"]
    (_, model0, pre, seconds0), (_, _, full, _), (_, lora_model, lora, lora_seconds) = runs
    assert model0 is base and seconds0 == 0 and pre["trainable_pct"] == 0
    assert pre == {**measure(base, TOK, sticks), "trainable_pct": 0}
    assert full["trainable_pct"] == 100 and 0 < lora["trainable_pct"] < 50 and lora_seconds > 0
    assert lora == {**measure(lora_model, TOK, sticks), "trainable_pct": lora["trainable_pct"]}
    assert full["domain_loss"] != pre["domain_loss"]
    assert pre["general_ppl"] > 1 and 0 <= pre["qa_accuracy"] <= 1


def test_the_recipe_gives_each_method_its_rate_and_folder(tmp_path):
    recipe = Recipe([], steps=3, batch_size=2, learning_rates=TINY_MODEL_LEARNING_RATES, schedule="linear",
                    out_dir=tmp_path)
    config = recipe.config("lora")
    assert config.lr == TINY_MODEL_LEARNING_RATES["lora"] and config.schedule == "linear"
    assert config.max_steps == 3 and config.out_dir == str(tmp_path / "lora")
    assert Recipe([], 3, 2, LEARNING_RATES).config("full").out_dir is None
