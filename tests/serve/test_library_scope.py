"""Every adapter is checked in full against the base, at start-up or at runtime (issue 17):
the modules its config's scope names on this base are exactly the saved ones, shapes fit,
values are finite, the rank fits the slots; unloading frees the slot only once no row uses it."""

import numpy as np
import pytest
from serve_fixtures import base_model, make_engine, merged_reference, rewrite

from minift.serve import AdapterError, AdapterLibrary, Request, ServingEngine

PREFIX = "base_model.model.model.layers"


def drop_pair(module):
    def change(tensors, config):
        for which in "AB":
            del tensors[f"{PREFIX}.{module}.lora_{which}.weight"]
    return change


def nan_in_b(tensors, config):
    tensors[f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"][0, 0] = np.nan


def wide_b(tensors, config):
    key = f"{PREFIX}.1.self_attn.q_proj.lora_B.weight"
    tensors[key] = np.zeros((tensors[key].shape[0] + 1, 1))


# r1 adapts q_proj and v_proj of blocks 0 and 1
@pytest.mark.parametrize("change, message", [
    (lambda t, c: c.update(target_modules=["q_proj"]),
     r"holds lora_A/lora_B for 'model.layers.0.self_attn.v_proj', outside the scope of adapter_config.json "
     r"\(target_modules=\['q_proj'\], layers_to_transform=None\)"),
    (lambda t, c: c.update(layers_to_transform=[1]),
     r"holds lora_A/lora_B for 'model.layers.0.self_attn.q_proj', outside the scope .*layers_to_transform=\[1\]"),
    (drop_pair("1.self_attn.v_proj"),
     r"adapts 'model.layers.1.self_attn.v_proj', but adapter_model.safetensors has no lora_A/lora_B for it"),
    (lambda t, c: c.update(target_modules="nothing_matches"), r"target_modules .* matched no Linear layer"),
    (lambda t, c: c.update(layers_to_transform=[0], layers_pattern="h"),
     r"layers_pattern is 'h', but this base's blocks are 'layers'"),
    (nan_in_b, r"q_proj.lora_B.weight' holds NaN or infinite values"),
    (wide_b, r"layers.1.self_attn.q_proj.lora_B has shape \(33, 1\); rank 1 on this base model needs \(32, 1\)"),
])
def test_an_adapter_whose_scope_or_values_do_not_fit_is_refused_naming_the_problem(folders, tmp_path, change,
                                                                                   message):
    library = AdapterLibrary(base_model())
    with pytest.raises(AdapterError, match=rf"adapter 'bad' \({tmp_path}\): .*{message}"):
        library.add("bad", rewrite(folders["r1"], tmp_path, change))
    assert "bad" not in library


@pytest.mark.parametrize("scope", [
    {"target_modules": r".*\.(q_proj|v_proj)"},  # a regex names the same modules
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 1], "layers_pattern": "layers"},
])
def test_a_scope_written_another_way_that_names_the_same_modules_is_served(folders, tmp_path, scope):
    library = AdapterLibrary(base_model())
    adapter = library.add("same", rewrite(folders["r1"], tmp_path, lambda t, c: c.update(scope)))
    assert sorted(adapter.weights) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]


def test_an_adapter_loaded_after_the_engine_wrapped_the_model_equals_it_merged(folders):
    """Runtime loading: the scope is resolved on the wrapped model (its MultiLoraLinear layers
    seen as their base layers), and the output equals the adapter merged into the base."""
    engine = make_engine({}, n_slots=2, max_rank=8, wrap_all=True)
    assert len(engine.layers) == 2 * 7  # every projection of both blocks
    for name in ("r2", "r8"):  # r2 adapts block 1 only, r8 four projections of each block
        engine.add_adapter(name, folders[name])
        request = Request([3, 1, 4, 1, 5], name, 5)
        done = engine.generate([request], record_logits=True)[0]
        reference = merged_reference(folders[name])
        tokens = reference.generate([request.prompt], 5)[0].tolist()
        assert done.tokens == tokens
        logits = reference(np.array([request.prompt + tokens[:-1]])).data[0, len(request.prompt) - 1:]
        np.testing.assert_allclose(done.logits, logits, rtol=1e-9, atol=1e-9)  # float64: rounding only


def test_a_runtime_adapter_over_the_slot_rank_or_on_unwrapped_layers_is_refused(folders):
    engine = make_engine({"r1": folders["r1"]}, n_slots=2, max_rank=4)  # wraps q_proj and v_proj only
    with pytest.raises(AdapterError, match=r"adapter 'r8' does not fit the slots: rank 8 is over the slot rank 4 "
                                           r"of this server; restart it with --max-lora-rank 8 or more"):
        engine.add_adapter("r8", folders["r8"])
    with pytest.raises(AdapterError, match=r"adapter 'r3' does not fit the slots: it adapts "
                                           r"'model.layers.0.self_attn.k_proj' \(and 3 more\), which was not "
                                           r"wrapped for serving at start-up; .*--allow-runtime-lora"):
        engine.add_adapter("r3", folders["r3"])
    assert engine.library.names() == ["r1"]


def test_max_rank_must_be_a_positive_integer():
    model = base_model()
    with pytest.raises(ValueError, match="max_rank \\(--max-lora-rank\\) must be a positive integer, got 0"):
        ServingEngine(model, AdapterLibrary(model), max_rank=0)


def test_remove_takes_the_adapter_out_and_a_new_one_may_take_its_name(folders):
    engine = make_engine({"r1": folders["r1"]}, n_slots=2, max_rank=8, wrap_all=True)
    engine.generate([Request([1, 2], "r1", 2)])
    engine.remove_adapter("r1")
    assert "r1" not in engine.library and not engine.slots.resident
    with pytest.raises(KeyError, match=r"unknown adapter 'r1'; loaded: none"):
        engine.validate(Request([1, 2], "r1", 2))
    with pytest.raises(KeyError, match=r"unknown adapter 'r1'"):
        engine.remove_adapter("r1")
    engine.add_adapter("r1", folders["r8"])  # the name again, another adapter: loaded afresh
    done = engine.generate([Request([1, 2], "r1", 3)], record_logits=True)[0]
    reference = merged_reference(folders["r8"])
    assert done.tokens == reference.generate([[1, 2]], 3)[0].tolist()


def test_an_unloaded_adapters_slot_stays_as_it_is_while_running_rows_pin_it(folders):
    """Rows still running with an unloaded adapter finish with its weights: its slot is given to
    nobody until no running row pins the name; then it is free again."""
    engine = make_engine({"r1": folders["r1"], "r3": folders["r3"]}, n_slots=2, max_rank=8, wrap_all=True)
    slots = engine.slots
    old = slots.acquire(["r1"])[0]
    engine.remove_adapter("r1")
    engine.add_adapter("r8", folders["r8"])
    q = "model.layers.0.self_attn.q_proj"
    before = engine.layers[q].A_stack[old].copy()
    new = slots.acquire(["r8"], pinned={"r1"})[0]  # a row of the old r1 still runs
    assert new != old and np.array_equal(engine.layers[q].A_stack[old], before)
    with pytest.raises(ValueError, match="needs 3 distinct adapter slots but there are only 2"):
        slots.acquire(["r3"], pinned={"r1", "r8"})
    slots.acquire(["r3"], pinned={"r8"})  # the r1 rows are done: its slot is free again
    assert sorted(slots.resident) == ["r3", "r8"] and not slots.retired and slots.stats.evictions == 0
