"""PEFT's adapter folder: written and read back unchanged, and every way a folder can be broken is
refused on reading with a message that names the file and the field."""

import json

import numpy as np
import pytest

from minift.io import (
    AdapterFormatError,
    load_file,
    lora_pairs,
    lora_tensors,
    read_adapter_folder,
    save_file,
    write_adapter_folder,
)
from minift.io.peft_adapter import CONFIG_NAME, WEIGHTS_NAME

Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "bias": "none"}


def pairs(rank=2):
    rng = np.random.default_rng(0)
    return {Q: (rng.normal(size=(rank, 8)).astype(np.float32), rng.normal(size=(6, rank)).astype(np.float32)),
            V: (rng.normal(size=(rank, 8)), rng.normal(size=(4, rank)))}


def raw_folder(folder, config, tensors):
    """Write the two files directly, without the writer's checks: how a broken folder arrives."""
    folder.mkdir(exist_ok=True)
    save_file(tensors, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    return folder


def test_round_trip_keeps_config_keys_dtypes_and_values(tmp_path):
    head = {"base_model.model.lm_head.weight": np.ones((5, 8), np.float32)}  # a modules_to_save copy
    written = write_adapter_folder(tmp_path / "a", CONFIG, {**lora_tensors(pairs()), **head})
    assert written == tmp_path / "a"
    assert json.loads((written / CONFIG_NAME).read_text()) == CONFIG
    assert set(load_file(written / WEIGHTS_NAME)) == {
        "base_model.model.lm_head.weight",
        f"base_model.model.{Q}.lora_A.weight", f"base_model.model.{Q}.lora_B.weight",
        f"base_model.model.{V}.lora_A.weight", f"base_model.model.{V}.lora_B.weight"}
    config, tensors = read_adapter_folder(written)
    got, rest = lora_pairs(tensors)
    assert config == CONFIG and set(rest) == set(head) and set(got) == {Q, V}
    for module, (a, b) in pairs().items():
        for saved, original in zip(got[module], (a, b)):
            assert saved.dtype == original.dtype and np.array_equal(saved, original)


def test_a_refused_write_leaves_the_previous_adapter_whole(tmp_path):
    write_adapter_folder(tmp_path, CONFIG, lora_tensors(pairs()))
    broken = pairs()
    broken[Q][1][0, 0] = np.nan
    with pytest.raises(AdapterFormatError, match="NaN"):
        write_adapter_folder(tmp_path, {**CONFIG, "r": 3}, lora_tensors(broken))
    config, tensors = read_adapter_folder(tmp_path)
    assert config["r"] == 2 and np.isfinite(tensors[f"base_model.model.{Q}.lora_B.weight"]).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left


def test_missing_folder_or_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: no such folder"):
        read_adapter_folder(tmp_path / "nope")
    save_file(lora_tensors(pairs()), tmp_path / WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match=f"{CONFIG_NAME} does not exist"):
        read_adapter_folder(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(CONFIG))
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_NAME} does not exist"):
        read_adapter_folder(tmp_path)


def test_a_config_that_is_not_json_is_named(tmp_path):
    raw_folder(tmp_path, CONFIG, lora_tensors(pairs()))
    (tmp_path / CONFIG_NAME).write_text("{'r': 2}")
    with pytest.raises(AdapterFormatError, match=f"{CONFIG_NAME}: not valid JSON"):
        read_adapter_folder(tmp_path)


@pytest.mark.parametrize("config, message", [
    ([CONFIG], "holds a JSON list, but an adapter config is a JSON object"),
    ({**CONFIG, "peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({k: v for k, v in CONFIG.items() if k != "peft_type"}, "peft_type is None"),
    ({**CONFIG, "r": 0}, r"r \(the LoRA rank\) must be a positive integer, got 0"),
    ({**CONFIG, "r": "2"}, r"r \(the LoRA rank\) must be a positive integer, got '2'"),
    ({**CONFIG, "r": True}, r"r \(the LoRA rank\) must be a positive integer, got True"),
    ({**CONFIG, "r": 2.0}, r"r \(the LoRA rank\) must be a positive integer, got 2.0"),
    ({**CONFIG, "lora_alpha": 0}, "lora_alpha must be a finite positive number, got 0"),
    ({**CONFIG, "lora_alpha": float("nan")}, "lora_alpha must be a finite positive number, got nan"),
    ({**CONFIG, "lora_alpha": float("inf")}, "lora_alpha must be a finite positive number, got inf"),
    ({**CONFIG, "lora_alpha": "4"}, "lora_alpha must be a finite positive number, got '4'"),
    ({**CONFIG, "target_modules": None}, "target_modules must be a list of module names or a regular"),
    ({**CONFIG, "target_modules": ["q_proj", 1]}, "target_modules must be a list of module names or a regular"),
])
def test_a_broken_config_is_refused_naming_file_and_field(tmp_path, config, message):
    raw_folder(tmp_path, config, lora_tensors(pairs()))
    with pytest.raises(AdapterFormatError, match=f"{CONFIG_NAME}: {message}") as error:
        read_adapter_folder(tmp_path)
    assert "fix the field in the file or save the adapter again" in str(error.value)


def key(module, which):
    return f"base_model.model.{module}.lora_{which}.weight"


def with_nan(array):
    array = array.copy()
    array.flat[3] = np.nan
    return array


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop(key(Q, "B")), f"{Q} has lora_A but not its partner lora_B"),
    (lambda t: t.pop(key(V, "A")), f"{V} has lora_B but not its partner lora_A"),
    (lambda t: t.update({key(Q, "A"): np.ones((3, 8))}), rf"{Q} has lora_A of shape \(3, 8\) and lora_B of "
                                                         r"shape \(6, 2\), but r=2 in adapter_config.json"),
    (lambda t: t.update({key(V, "B"): np.ones((4, 3))}), rf"{V} has lora_A of shape \(2, 8\) and lora_B of "
                                                         r"shape \(4, 3\), but r=2"),
    (lambda t: t.update({key(Q, "A"): np.ones(16)}), r"lora_A of shape \(16,\)"),
    (lambda t: t.update({key(Q, "A"): with_nan(t[key(Q, "A")])}), f"tensor '{key(Q, 'A')}' holds NaN or infinite"),
    (lambda t: t.update({key(V, "B"): t[key(V, "B")] * np.inf}), f"tensor '{key(V, 'B')}' holds NaN or infinite"),
    (lambda t: t.update({f"{Q}.lora_A.weight": t.pop(key(Q, "A"))}),
     f"tensor '{Q}.lora_A.weight' does not start with 'base_model.model.'"),
    (lambda t: [t.pop(k) for k in list(t)], "holds no LoRA weights"),
])
def test_broken_weights_are_refused_naming_file_and_tensor(tmp_path, change, message):
    tensors = lora_tensors(pairs())
    change(tensors)
    raw_folder(tmp_path, CONFIG, tensors)
    with pytest.raises(AdapterFormatError, match=f"{WEIGHTS_NAME}: .*{message}"):
        read_adapter_folder(tmp_path)


def test_a_truncated_weights_file_is_named(tmp_path):
    raw_folder(tmp_path, CONFIG, lora_tensors(pairs()))
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[:-10])
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME}: tensor .* lies outside the file"):
        read_adapter_folder(tmp_path)


def test_a_rank_pattern_gives_a_module_its_own_rank(tmp_path):
    tensors = {**lora_tensors({Q: pairs(rank=2)[Q]}), **lora_tensors({V: pairs(rank=4)[V]})}
    with pytest.raises(AdapterFormatError, match="but r=2"):
        write_adapter_folder(tmp_path, CONFIG, tensors)
    write_adapter_folder(tmp_path, {**CONFIG, "rank_pattern": {"v_proj": 4}}, tensors)
    assert read_adapter_folder(tmp_path)[1].keys() == tensors.keys()
