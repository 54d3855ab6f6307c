"""The CuPy test double (``tests/cupy_double/cupy.py``) and minift's ``backend=cupy`` path on it.

No GPU is available to this project, so the CuPy path is exercised on a stand-in that keeps
CuPy's rules at the host/device boundary (see the double's docstring for what it can and cannot
show). First the double itself is held to those rules, then minift's CuPy-parametrized tests
run on it in a subprocess. ``tests/test_notebooks.py`` runs every notebook on it too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

from minift import backend as B
from minift.cuda import check as kernels_check
from minift.cuda import kernels

ROOT = Path(__file__).resolve().parents[1]
DOUBLE = ROOT / "tests" / "cupy_double"


@pytest.fixture
def cupy(monkeypatch):
    """The double imported as ``cupy`` for this test only, with minift's backend switched to it."""
    spec = importlib.util.spec_from_file_location("cupy", DOUBLE / "cupy.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "cupy", module)
    spec.loader.exec_module(module)
    B.set_backend("cupy")
    yield module
    B.set_backend("numpy")


def test_device_arrays_never_become_numpy_arrays_implicitly(cupy):
    x = cupy.arange(6, dtype=np.float32).reshape(2, 3)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(x)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.testing.assert_allclose(x, x)
    assert isinstance(x.get(), np.ndarray) and isinstance(B.to_numpy(x), np.ndarray)
    np.testing.assert_array_equal(cupy.asnumpy(x), np.arange(6).reshape(2, 3))


@pytest.mark.parametrize("mix", [lambda x: x + np.ones(3, np.float32), lambda x: np.ones(3, np.float32) * x,
                                 lambda x: np.concatenate([x, np.ones((1, 3), np.float32)]),
                                 lambda x: x.__setitem__(0, np.ones(3, np.float32)),
                                 lambda x: x.__setitem__(0, [1.0, 2.0, 3.0])],
                         ids=["add", "rmul", "concatenate", "setitem", "setitem-list"])
def test_host_and_device_arrays_do_not_mix(cupy, mix):
    with pytest.raises(TypeError, match="Unsupported type <class '(numpy.ndarray|list)'>"):
        mix(cupy.zeros((2, 3), dtype=np.float32))


def test_scalars_stay_on_the_device_as_in_cupy(cupy):
    x = cupy.asarray([1.5, 2.5], dtype=np.float32)
    total = x.sum()
    assert type(total) is cupy.ndarray and total.shape == ()
    assert float(total) == 4.0 and f"{total:.2f}" == "4.00" and bool(total > 3)
    with pytest.raises(TypeError):
        json.dumps(total)
    with pytest.raises(TypeError):
        round(total, 1)
    assert type(x[0]) is cupy.ndarray and type(x + 1.0) is cupy.ndarray and x[np.array([1])].shape == (1,)


def test_only_cupys_names_exist(cupy):
    assert cupy.linalg.norm(cupy.ones(4, dtype=np.float32)).shape == ()
    with pytest.raises(AttributeError, match="fromregex"):
        cupy.fromregex  # noqa: B018 - NumPy has it, CuPy does not
    with pytest.raises(AttributeError, match="ctypes"):
        cupy.zeros(2).ctypes  # noqa: B018


def test_in_place_updates_keep_the_array_object(cupy):
    x = cupy.ones(3, dtype=np.float32)
    same = x
    x *= 2.0
    x -= cupy.ones(3, dtype=np.float32)
    probe = weakref.ref(x)
    assert x is same and probe() is x
    np.testing.assert_array_equal(x.get(), [1.0, 1.0, 1.0])


def test_kernels_launch_through_rawmodule_on_the_emulator_and_by_reference(cupy, monkeypatch):
    """Both ways the double runs a kernel agree with minift's NumPy reference within tolerance."""
    for mode in ("emulator", "reference"):
        monkeypatch.setenv("CUPY_DOUBLE_KERNELS", mode)
        results = kernels_check.check(["cupy"])
        assert results and all(r.passed for r in results), kernels_check.format_table(results)
    rng = np.random.default_rng(0)
    x, A = (cupy.asarray(rng.standard_normal(s, dtype=np.float32)) for s in [(5, 8), (2, 8)])
    t = kernels.lora_shrink(x, A)
    assert kernels.is_cupy_array(t)
    np.testing.assert_allclose(t.get(), x.get() @ A.get().T, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="Unsupported type"):
        cupy.RawModule(code=(kernels.KERNEL_DIR / "lora_shrink_expand.cu").read_text()).get_function(
            "lora_shrink_v2")((1, 1, 1), (32, 1, 1), (x.get(), A, t, np.int32(5), np.int32(8), np.int32(2)))


@pytest.mark.slow
def test_minifts_cupy_tests_pass_on_the_double():
    """Every test parametrized over backends, and the kernel tests' CuPy path, with backend=cupy."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DOUBLE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cupy",
                           "--ignore=tests/test_notebooks.py", "--ignore=tests/test_cupy_double.py",
                           "--ignore=tests/interop", "-x"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 190, summary  # 198 on 2026-11-23: the run really took the CuPy branches
