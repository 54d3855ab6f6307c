"""The serving tests' shared fixture: one folder per bundled test adapter (``serve_fixtures.ADAPTERS``),
written once per test module. A module that needs other adapters defines its own ``folders``."""

import pytest
from serve_fixtures import write_adapters


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_adapters(tmp_path_factory.mktemp("adapters"))
