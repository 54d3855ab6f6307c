"""The course notebooks run top to bottom, and the copies in the repository are stored executed.

Each ``notebooks/NN_*.ipynb`` is executed in a fresh Jupyter kernel with nbclient, from a copy
read into memory: the stored file, with the outputs that readers see on GitHub, is never
rewritten by a test run. To refresh the stored outputs, run a notebook in Jupyter and save it.

The kernel runs the Python that runs pytest (a kernel spec written for the test), from the
``notebooks/`` folder, with one BLAS thread from the start (each notebook also calls
``threadpool_limits(1)``): on a 2-core machine shared with other jobs, OpenBLAS's spinning worker
threads made the same notebook up to ten times slower. The notebooks
write only to a temporary folder and to ``notebooks/_runs/`` (git-ignored), where the toy
pretrained model of notebooks 02-05 is trained once and then reused.

Each notebook also runs a second time with ``MINIFT_BACKEND=cupy`` on the CuPy test double
(``tests/cupy_double``, see ``tests/test_cupy_double.py``): what a learner with a GPU would run.

Without the ``dev`` extra (nbclient, nbformat, ipykernel) these tests skip, except under CI
(the ``CI`` environment variable is set), where a missing package is a failure.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 600  # per cell; the slowest cell takes well under a minute on 2 idle cores
KERNEL_NAME = "minift-test-python"


def _require(module: str):
    if os.environ.get("CI"):
        return importlib.import_module(module)  # under CI a missing package is an error, not a skip
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[dev]')")


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A kernel spec for this very interpreter, found first via JUPYTER_PATH, and one BLAS thread."""
    _require("ipykernel")
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "minift tests", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")


def test_the_course_has_its_notebooks():
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["01_autograd", "02_transformer", "03_full_finetuning", "04_freezing_and_probes", "05_lora",
                     "06_nf4_and_qlora", "07_cuda_kernels", "08_multi_lora_serving", "09_forgetting",
                     "10_preference_tuning"], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, kernel_env):
    nbformat = _require("nbformat")
    _execute(nbformat.read(path, as_version=4))


def _execute(notebook) -> None:
    """Run ``notebook`` (in memory) in the test kernel, from ``notebooks/``; raises on any error."""
    nbclient = _require("nbclient")
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME,
                                     resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_unchanged_with_backend_cupy(path, kernel_env, monkeypatch):
    """``MINIFT_BACKEND=cupy`` with the CuPy test double (``tests/cupy_double``) in place of CuPy.

    No GPU here, so this cannot show GPU numerics or speed. It shows what breaks notebooks on a
    GPU most often: every cell runs with device arrays that refuse implicit host conversion
    (plots, ``numpy.testing``, ``json``), refuse mixing with NumPy arrays, and exist only for the
    functions CuPy has; kernels launch through ``cupy.RawModule``.
    """
    nbformat = _require("nbformat")
    double = ROOT / "tests" / "cupy_double"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(double), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MINIFT_BACKEND", "cupy")
    if path.stem != "07_cuda_kernels":  # 07 is about the kernels: it runs them on the emulator
        monkeypatch.setenv("CUPY_DOUBLE_KERNELS", "reference")  # elsewhere their NumPy math, 1000x faster
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(
        "import cupy, minift.backend\n"
        "assert minift.backend.get_backend() == 'cupy' and 'test double' in cupy.__version__"))
    _execute(notebook)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_notebook_is_executed_in_order_without_errors(path):
    nbformat = _require("nbformat")
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name} is not stored as one top-to-bottom run (execution counts {counts}): "
        "restart the kernel, run all cells, save")
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"{path.name} is stored with an error: {errors[0].get('evalue')}"
    assert any(out.get("data", {}).get("image/png") for cell in code for out in cell.outputs), \
        f"{path.name} is stored without its plots"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_ends_with_checked_exercises_and_is_in_the_lecture_map(path):
    nbformat = _require("nbformat")
    cells = nbformat.read(path, as_version=4).cells
    start = next((i for i, c in enumerate(cells) if c.cell_type == "markdown"
                  and "Check your understanding" in c.source), None)
    assert start is not None, f"{path.name} has no 'Check your understanding' section"
    exercises = [c for c in cells[start:] if c.cell_type == "markdown" and "**Exercise" in c.source]
    checks = [c for c in cells[start:] if c.cell_type == "code" and "assert" in c.source]
    assert 2 <= len(exercises) <= 4 and len(checks) >= len(exercises), path.name
    assert f"notebooks/{path.name}" in (ROOT / "docs" / "lecture-map.md").read_text(encoding="utf-8")
