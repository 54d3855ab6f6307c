"""Fuzzing the loaders: a valid tiny GGUF, safetensors file, model folder, PEFT adapter folder and
JSONL file, mutated by hypothesis (truncation, bit flips, huge counts, wrong JSON types,
non-finite numbers), must each load or be refused with a clean error.

"Clean" means one of minift's messages: a ``ValueError``, ``KeyError`` or ``FileNotFoundError``
(subclasses included) but never ``UnicodeDecodeError``, the ``ValueError`` that names no file.
``MemoryError``, ``RecursionError``, ``TypeError``, ``IndexError``, ``struct.error`` and
``AttributeError`` are crashes, and fail the test. Each load also runs under ``tracemalloc``
with a cap of ``MAX_PEAK_MB`` (the valid files need a few MB; a memory bomb needs gigabytes),
and under an alarm of ``HANG_S`` seconds that turns a hang into a failure.

The examples are derandomized, so CI replays exactly the same inputs; ``OUTCOMES`` counts them and
the session prints the tally (``pytest -s tests/fuzz``).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minift.data import ByteTokenizer, InstructionDataset
from minift.io import load_file, load_gguf, read_model, save_file, save_model, write_gguf
from minift.models import LlamaConfig, LlamaForCausalLM
from minift.peft import LoraConfig, PeftModel, get_peft_model

MAX_PEAK_MB = 64
HANG_S = 30
CLEAN = (ValueError, KeyError, FileNotFoundError)
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def _tally():
    yield
    for target, counts in sorted(OUTCOMES.items()):
        errors = ", ".join(f"{name} {n}" for name, n in counts.items() if name not in ("loaded", "refused"))
        print(f"\nfuzz {target}: {counts['loaded'] + counts['refused']} inputs, {counts['loaded']} loaded, "
              f"{counts['refused']} refused cleanly ({errors})")


def _hang(signum, frame):
    raise AssertionError(f"a loader ran for over {HANG_S} s (a hang)")


def loads_or_refuses_cleanly(target: str, load) -> None:
    """Run ``load()``: it must return, or raise a clean error, within the memory cap."""
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(HANG_S)
    tracemalloc.start()
    try:
        load()
        outcome = "loaded"
    except UnicodeDecodeError as exc:
        raise AssertionError(f"{target}: a raw codec error escaped: {exc}") from exc
    except CLEAN as exc:
        assert str(exc), f"{target}: {type(exc).__name__} without a message"
        outcome = "refused"
        OUTCOMES[target][type(exc).__name__] += 1
    finally:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert peak < MAX_PEAK_MB, f"{target}: loading allocated {peak:.0f} MB (cap {MAX_PEAK_MB} MB)"
    OUTCOMES[target][outcome] += 1


# ---- mutations -----------------------------------------------------------------------------------

HUGE = [2**63, 2**64 - 1, 2**32, 10**9, 10**6]


@st.composite
def mutated_bytes(draw, data: bytes, header: int = 512):
    """``data`` with 1-3 of: a truncation, a bit flip, a huge little-endian u64, random bytes.
    Half the positions fall in the first ``header`` bytes, where the counts and offsets are."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        at = draw(st.one_of(st.integers(0, min(header, len(data) - 1)), st.integers(0, len(data) - 1)))
        kind = draw(st.sampled_from(["truncate", "flip", "huge", "bytes"]))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "huge":
            data[at:at + 8] = draw(st.sampled_from(HUGE)).to_bytes(8, "little")
        else:
            data[at:at + 8] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


ODD_VALUES = st.sampled_from([10**9, 10**6, -1, 0, 2.5, float("nan"), float("inf"), -float("inf"), "x", "",
                              None, True, [], [1, 2], {}, {"a": 1}, 10**30])


@st.composite
def mutated_json(draw, value: dict) -> bytes:
    """``value`` as JSON with 1-2 fields set to an odd value (or removed), or the whole document
    replaced by another shape; then, sometimes, byte mutations on top."""
    value = dict(value)
    choice = draw(st.sampled_from(["fields", "fields", "shape", "deep"]))
    if choice == "fields":
        for _ in range(draw(st.integers(1, 2))):
            key = draw(st.sampled_from(sorted(value)))
            if draw(st.booleans()):
                value[key] = draw(ODD_VALUES)
            else:
                value.pop(key)
        text = json.dumps(value).encode()
    elif choice == "shape":
        text = json.dumps(draw(st.sampled_from([[value], "config", 7, None]))).encode()
    else:
        text = b"[" * 100_000 + b"]" * 100_000
    return draw(mutated_bytes(text, header=len(text))) if draw(st.booleans()) else text


# ---- the valid files -------------------------------------------------------------------------------


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=260, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)
    return LlamaForCausalLM(config, seed=seed)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """The valid files every mutation starts from, as bytes (and JSON dicts)."""
    root = tmp_path_factory.mktemp("valid")
    from minift.io.model_dir import byte_tokenizer_as_bpe  # noqa: PLC0415

    gguf = write_gguf(tiny_model(), byte_tokenizer_as_bpe(), root / "m.gguf").read_bytes()
    save_file({"w": np.ones((3, 4), np.float32), "b": np.arange(5, dtype=np.int64),
               "h": np.ones(6, np.float16)}, root / "t.safetensors", metadata={"format": "pt"})
    save_model(tiny_model(), root / "model")
    peft = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(root / "adapter")
    records = [{"instruction": "Add 2 and 3.", "output": "5"},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    return {
        "gguf": gguf,
        "safetensors": (root / "t.safetensors").read_bytes(),
        "model_config": json.loads((root / "model" / "config.json").read_text()),
        "model_weights": (root / "model" / "model.safetensors").read_bytes(),
        "adapter_config": json.loads((root / "adapter" / "adapter_config.json").read_text()),
        "adapter_weights": (root / "adapter" / "adapter_model.safetensors").read_bytes(),
        "record": records[0],
        "jsonl": "".join(json.dumps(r) + "\n" for r in records).encode(),
    }


def write_folder(files: dict[str, bytes]) -> Path:
    """A fresh folder holding ``files`` (the previous example's folder is removed first)."""
    folder = Path(tempfile.gettempdir()) / f"minift-fuzz-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


# ---- the loaders ---------------------------------------------------------------------------------


GGUF_COUNTS = [b"llama.block_count", b"llama.embedding_length", b"llama.feed_forward_length",
               b"llama.context_length", b"llama.attention.head_count", b"llama.vocab_size"]


@st.composite
def gguf_with_odd_count(draw, data: bytes) -> bytes:
    """``data`` with one ``llama.*`` u32 count (after its key and its u32 type) set to an odd value."""
    key = draw(st.sampled_from([k for k in GGUF_COUNTS if k in data]))
    at = data.index(key) + len(key) + 4
    value = draw(st.sampled_from([2**32 - 1, 10**9, 10**6, 1000, 0, 3]))
    return data[:at] + value.to_bytes(4, "little") + data[at + 4:]


@FUZZ
@given(data=st.data())
def test_gguf(valid, data):
    mutation = gguf_with_odd_count(valid["gguf"]) if data.draw(st.booleans()) else mutated_bytes(valid["gguf"], 4096)
    path = write_folder({"m.gguf": data.draw(mutation)}) / "m.gguf"
    loads_or_refuses_cleanly("gguf", lambda: load_gguf(path))


@FUZZ
@given(data=st.data())
def test_safetensors(valid, data):
    path = write_folder({"t.safetensors": data.draw(mutated_bytes(valid["safetensors"]))}) / "t.safetensors"
    loads_or_refuses_cleanly("safetensors", lambda: load_file(path))


def build_saved_model(folder: Path):
    """What ``load_pretrained`` does with a minift folder: read and check it, then build."""
    saved = read_model(folder)
    LlamaForCausalLM(saved.config).load_state_dict(saved.state)


@FUZZ
@given(data=st.data())
def test_model_folder(valid, data):
    if data.draw(st.booleans()):
        files = {"config.json": data.draw(mutated_json(valid["model_config"])),
                 "model.safetensors": valid["model_weights"]}
    else:
        files = {"config.json": json.dumps(valid["model_config"]).encode(),
                 "model.safetensors": data.draw(mutated_bytes(valid["model_weights"], header=2048))}
    folder = write_folder(files)
    loads_or_refuses_cleanly("model folder", lambda: build_saved_model(folder))


@FUZZ
@given(data=st.data())
def test_peft_adapter_folder(valid, data):
    if data.draw(st.booleans()):
        files = {"adapter_config.json": data.draw(mutated_json(valid["adapter_config"])),
                 "adapter_model.safetensors": valid["adapter_weights"]}
    else:
        files = {"adapter_config.json": json.dumps(valid["adapter_config"]).encode(),
                 "adapter_model.safetensors": data.draw(mutated_bytes(valid["adapter_weights"], header=1024))}
    folder = write_folder(files)
    loads_or_refuses_cleanly("peft adapter", lambda: PeftModel.from_pretrained(tiny_model(), folder))


@FUZZ
@given(data=st.data())
def test_jsonl(valid, data):
    if data.draw(st.booleans()):
        line = data.draw(mutated_json(valid["record"]))
        text = valid["jsonl"] + line.replace(b"\n", b" ") + b"\n"
    else:
        text = data.draw(mutated_bytes(valid["jsonl"], header=len(valid["jsonl"])))
    path = write_folder({"d.jsonl": text}) / "d.jsonl"
    loads_or_refuses_cleanly("jsonl", lambda: InstructionDataset(path, ByteTokenizer(), max_len=64))
