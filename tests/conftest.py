"""Shared fixtures: every test that takes ``backend`` runs once per backend present.

NumPy always; CuPy only where CuPy imports and sees a GPU (minitorch's pattern). The fixture
restores NumPy afterwards so tests never leak a backend into each other.
"""

import pytest

from minift import backend as B

AVAILABLE_BACKENDS = ["numpy"] + (["cupy"] if B.cupy_available() else [])


@pytest.fixture(params=AVAILABLE_BACKENDS)
def backend(request):
    B.set_backend(request.param)
    yield request.param
    B.set_backend("numpy")


@pytest.fixture(autouse=True)
def _reset_numpy_backend():
    yield
    if B.get_backend() != "numpy":
        B.set_backend("numpy")


def pytest_collectreport(report):
    """In CI (MINIFT_REQUIRE_INTEROP=1) an interop module that skips — PyTorch or PEFT missing —
    is a failure, not a quiet skip: the comparisons against the reference tools must run there."""
    import os  # noqa: PLC0415

    if os.environ.get("MINIFT_REQUIRE_INTEROP") == "1" and report.skipped and "interop" in report.nodeid:
        report.outcome = "failed"
        report.longrepr = f"{report.nodeid}: interop tests were skipped but MINIFT_REQUIRE_INTEROP=1"


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real SmolLM2-135M-Instruct GGUF, fetched once into the cache (minift.io.hub).

    Skips, saying why, only where it cannot be fetched (offline); in CI (MINIFT_REQUIRE_INTEROP=1
    or CI set) a failed fetch is a failure, so the real-model tests always run there."""
    import os  # noqa: PLC0415

    from minift.io.hub import FetchError, fetch  # noqa: PLC0415

    try:
        return fetch("smollm2")
    except FetchError as exc:
        if os.environ.get("MINIFT_REQUIRE_INTEROP") == "1" or os.environ.get("CI"):
            pytest.fail(f"SmolLM2 must be fetched in CI: {exc}")
        pytest.skip(f"SmolLM2 could not be fetched (offline?): {exc}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(model, tokenizer) of the real SmolLM2, loaded once per session (540 MB of float32)."""
    from minift.io.gguf import load_gguf  # noqa: PLC0415

    return load_gguf(smollm2_gguf)
