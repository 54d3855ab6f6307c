"""The adapter library (loading, checks) and the device-slot cache (LRU, budget, stats)."""

from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serve_fixtures import ADAPTERS, base_model, make_engine, rewrite, write_adapters

from minift.backend import to_numpy
from minift.serve import AdapterError, AdapterLibrary, Request, SlotBudgetError, plan_batches


def slot_content(engine, module: str, slot: int):
    layer = engine.layers[module]
    return to_numpy(layer.A_stack[slot]), to_numpy(layer.B_stack[slot])


# ---- the cache ------------------------------------------------------------------------------
def test_lru_order_hits_misses_evictions_and_bytes(folders):
    engine = make_engine(folders, n_slots=2)
    slots, lib = engine.slots, engine.library
    for names in (["r1"], ["r3"], ["r1"], ["r8"]):  # r8 evicts r3, the least recently used
        slots.acquire(names)
    assert list(slots.resident) == ["r1", "r8"]
    assert slots.stats.to_dict() == {"hits": 1, "misses": 3, "evictions": 1,
                                     "bytes_moved": lib["r1"].nbytes + lib["r3"].nbytes + lib["r8"].nbytes}
    slots.acquire(["r3", "r8"])  # needs both slots: r1 (least recent) goes, r8 stays
    assert sorted(slots.resident) == ["r3", "r8"] and slots.stats.evictions == 2


def test_a_reloaded_slot_holds_exactly_the_new_adapter(folders):
    """A rank-2 adapter loaded into the slot a rank-8 one left: no stale rows in the padding, and
    layers the new adapter does not adapt are zero."""
    engine = make_engine(folders, n_slots=1)
    engine.slots.acquire(["r8"])
    engine.slots.acquire(["r2"])
    a, b = engine.library["r2"].weights["model.layers.1.mlp.down_proj"]
    A, B = slot_content(engine, "model.layers.1.mlp.down_proj", 0)
    np.testing.assert_array_equal(A[:2], a)
    np.testing.assert_array_equal(B[:, :2], b)
    assert not A[2:].any() and not B[:, 2:].any()
    A, B = slot_content(engine, "model.layers.0.mlp.up_proj", 0)  # adapted by r8, not by r2
    assert not A.any() and not B.any()


def test_an_evicted_adapter_comes_back_with_the_same_output(folders):
    engine = make_engine(folders, n_slots=1)
    request = Request([4, 8, 15, 16, 23, 42], "r3", 6)
    first = engine.generate([request], record_logits=True)[0]
    engine.generate([Request([1, 2], "r8", 3)])  # evicts r3
    assert "r3" not in engine.slots.resident
    again = engine.generate([request], record_logits=True)[0]
    assert again.tokens == first.tokens
    np.testing.assert_array_equal(again.logits, first.logits)
    assert engine.slots.stats.to_dict()["misses"] == 3 and engine.slots.stats.evictions == 2


ONE_MODULE = {name: "model.layers.1.self_attn.o_proj" if name == "r2" else "model.layers.0.self_attn.q_proj"
              for name in ADAPTERS}  # a layer each adapter adapts


@settings(max_examples=30, deadline=None)
@given(calls=st.lists(st.lists(st.sampled_from([None, *ADAPTERS]), min_size=1, max_size=4), min_size=1,
                      max_size=12),
       n_slots=st.integers(1, 4))
def test_the_cache_follows_a_reference_lru_and_never_exceeds_its_budget(folders, calls, n_slots):
    engine = make_engine(folders, n_slots=n_slots)
    slots, lru, expected = engine.slots, OrderedDict(), {"hits": 0, "misses": 0, "evictions": 0, "bytes_moved": 0}
    for names in calls:
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        if len(wanted) > n_slots:
            with pytest.raises(SlotBudgetError, match="split the batch"):
                slots.acquire(names)
            continue
        got = slots.acquire(names)
        for name in wanted:
            if name in lru:
                expected["hits"] += 1
                lru.move_to_end(name)
                continue
            expected["misses"] += 1
            expected["bytes_moved"] += engine.library[name].nbytes
            if len(lru) == n_slots:
                victim = next(n for n in lru if n not in wanted)
                del lru[victim]
                expected["evictions"] += 1
            lru[name] = True
        assert list(slots.resident) == list(lru) and len(slots.resident) <= n_slots
        assert slots.stats.to_dict() == expected
        for name, slot in zip(names, got):
            if name is None:
                assert slot == -1
                continue
            a, b = engine.library[name].weights[ONE_MODULE[name]]
            A, B = slot_content(engine, ONE_MODULE[name], slot)
            np.testing.assert_array_equal(A[: len(a)], a)
            np.testing.assert_array_equal(B[:, : len(a)], b)
    assert all(layer.A_stack.shape[0] == n_slots for layer in engine.layers.values())


def test_more_distinct_adapters_than_slots_splits_the_batch(folders):
    """Policy: group rows by adapter, at most n_slots distinct adapters per batch (base rows
    need no slot). 5 requests over 3 adapters with 2 slots -> 2 batches, answers unchanged."""
    requests = [Request([1, 2, 3], "r1", 4), Request([4, 5], "r3", 4), Request([6], "r8", 4),
                Request([7, 8], "r1", 4), Request([9, 9, 9], None, 4)]
    assert plan_batches(requests, n_slots=2, max_batch=8, context=40) == [[0, 3, 1], [2, 4]]
    engine = make_engine(folders, n_slots=2)
    split = engine.generate(requests)
    assert engine.batch_sizes == [3, 2]
    alone = [make_engine(folders, n_slots=1).generate([r])[0].tokens for r in requests]
    assert [c.tokens for c in split] == alone


def test_plan_caps_rows_and_the_padded_context():
    long, short = Request([1] * 30, None, 2), Request([1], None, 20)
    assert plan_batches([long, short], n_slots=1, max_batch=8, context=40) == [[0], [1]]  # 30 + 20 > 40
    assert plan_batches([short] * 5, n_slots=1, max_batch=2, context=40) == [[0, 1], [2, 3], [4]]


# ---- the library ----------------------------------------------------------------------------
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def move_to_layer_7(tensors):
    for which in "AB":
        tensors[Q.replace("layers.0", "layers.7") + f".lora_{which}.weight"] = tensors.pop(f"{Q}.lora_{which}.weight")


@pytest.mark.parametrize("change, message", [
    (lambda t, c: t.update({f"{Q}.lora_A.weight": np.zeros((1, 31))}), r"lora_A has shape \(1, 31\)"),
    (lambda t, c: c.update(r=2), r"lora_A of shape \(1, 32\) and lora_B of shape \(32, 1\), but r=2"),
    (lambda t, c: t.pop(f"{Q}.lora_B.weight"), "has lora_A but not its partner"),
    (lambda t, c: move_to_layer_7(t), "has no layer 'model.layers.7.self_attn.q_proj'"),
    (lambda t, c: t.update({"base_model.model.model.norm.weight": np.ones(32)}), "not a LoRA A/B weight"),
    (lambda t, c: c.update(use_dora=True), "DoRA"),
    (lambda t, c: c.update(modules_to_save=["lm_head"]), "plain LoRA only"),
])
def test_an_adapter_that_does_not_fit_the_base_is_a_clear_error(folders, tmp_path, change, message):
    library = AdapterLibrary(base_model())
    with pytest.raises(AdapterError, match=message):
        library.add("bad", rewrite(folders["r1"], tmp_path, change))
    assert "bad" not in library


def test_library_names_and_folders_are_checked(folders, tmp_path):
    library = AdapterLibrary(base_model())
    library.add("legal", folders["r1"])
    with pytest.raises(AdapterError, match="already loaded"):
        library.add("legal", folders["r3"])
    with pytest.raises(AdapterError, match="letters, digits"):
        library.add("a:b", folders["r3"])
    with pytest.raises(AdapterError, match="needs adapter_config.json"):
        library.add("empty", tmp_path)
    with pytest.raises(KeyError, match="unknown adapter 'nope'; loaded: \\['legal'\\]"):
        library["nope"]  # noqa: B018


def test_an_adapter_of_a_larger_model_is_refused(tmp_path):
    folder = write_adapters(tmp_path, names=["r1"], dim=64)["r1"]
    with pytest.raises(AdapterError, match=r"lora_A has shape \(1, 64\); rank 1 on this base model needs \(1, 32\)"):
        AdapterLibrary(base_model()).add("big", folder)


def test_an_adapter_added_after_the_slots_were_made_must_fit_them(folders):
    engine = make_engine({"r1": folders["r1"]}, n_slots=2)  # wraps q_proj and v_proj, slot rank 1
    engine.library.add("r3", folders["r3"])
    with pytest.raises(ValueError, match="does not fit the slots"):
        engine.generate([Request([1, 2], "r3", 2)])
    assert engine.slots.stats.misses == 0 and not engine.slots.resident
