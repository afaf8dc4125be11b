"""The notebooks under notebooks/: each runs top to bottom at the small size, and each jupytext
pair (``NAME.py`` percent script, the source of truth, and ``NAME.ipynb`` with outputs) holds the
same cells.

Execution is headless (nbclient, the ``python3`` kernel, which jupyter_client starts with the
interpreter running this test, so the venv's jdeq) with ``JDEQ_QUICK=1``; the notebooks run two
at a time in their own kernels, and any error in a cell fails the test (naming the notebook).
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["01_quickstart", "02_memory_vs_depth", "03_arithmetic_depth", "04_stabilization", "05_inr"]


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def _execute(name: str):
    """Runs ``NAME.py`` (converted in memory) in a fresh kernel; returns None or the error."""
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    try:
        client.execute(env={**os.environ, "JDEQ_QUICK": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"})
    except Exception as exc:  # CellExecutionError and kernel failures: reported per notebook
        return exc
    return None


def test_every_notebook_is_listed():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.py")) == NAMES
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


def test_notebooks_run():
    # One test for all of them (not one per notebook): under pytest-xdist a shared fixture would run
    # the notebooks again in every worker that got one of its tests.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        errors = dict(zip(NAMES, pool.map(_execute, NAMES)))
    failed = {name: error for name, error in errors.items() if error is not None}
    assert not failed, "\n\n".join(f"{name} failed:\n{error}" for name, error in failed.items())


@pytest.mark.parametrize("name", NAMES)
def test_pair_in_sync(name):
    script = jupytext.read(NOTEBOOKS / f"{name}.py")
    notebook = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
    assert _cells(script) == _cells(notebook), f"{name}.py and {name}.ipynb differ: run `jupytext --sync notebooks/{name}.py`"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"{name}.ipynb was not executed top to bottom"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{name}.ipynb holds an error output"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "backend: " in text, f"{name}.ipynb does not say which backend it ran on"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}.ipynb holds no plot"
