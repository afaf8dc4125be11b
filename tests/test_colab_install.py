"""The notebooks' first cell installs jdeq in a fresh runtime, as on Colab.

A fresh venv stands for the Colab runtime: like Colab, it has the scientific stack preinstalled
(this environment's packages, seen through a ``.pth`` entry, every jdeq entry left out), never jdeq.
The repository is cloned to a temporary folder (the committed state, as a user would get it) and
the first cell's ``JDEQ_REPO`` form field is pointed at the clone as a ``file://`` git URL, the
way a Colab user edits the field. ``01_quickstart`` then runs headless (nbclient, ``JDEQ_QUICK=1``)
in that venv's kernel: the cell must install ``jdeq[notebook]`` with pip and the rest of the
notebook must run on what it installed. pip's cache lives in ``.cache/pip`` (gitignored), so only
the first run downloads wheels.

Also checked without a venv: every notebook's first cell has the same install logic, with the
form field defaulting to ``[project.urls] Repository`` of pyproject.toml, and the cell does
nothing where jdeq is importable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.py"))
PARAM = re.compile(r'^JDEQ_REPO = "([^"]*)"  #@param \{type:"string"\}$', re.M)


def _first_code_cell(path: Path) -> str:
    return next(c.source for c in jupytext.read(path).cells if c.cell_type == "code")


def test_first_cell_defaults_to_the_project_url_everywhere():
    url = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    cells = {p.name: _first_code_cell(p) for p in NOTEBOOKS}
    for name, cell in cells.items():
        assert cell.startswith("#@title"), f"{name}: the install cell is not a Colab form"
        match = PARAM.search(cell)
        assert match, f"{name}: no JDEQ_REPO #@param field"
        assert match.group(1) == url, f"{name}: JDEQ_REPO default {match.group(1)!r} != pyproject's {url!r}"
    assert len(set(cells.values())) == 1, "the notebooks' install cells differ"


def test_first_cell_does_nothing_where_jdeq_is_importable():
    cell = _first_code_cell(NOTEBOOKS[0])
    # pip pointed at a URL that cannot work: the cell must not reach it
    cell = PARAM.sub('JDEQ_REPO = "file:///nonexistent/jdeq"', cell)
    subprocess.run([sys.executable, "-c", cell], check=True, timeout=60)


def test_fresh_runtime_installs_and_runs_quickstart(tmp_path, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    clone = tmp_path / "jdeq-clone"
    # a full clone: pip clones the URL with --filter=blob:none, and a partial clone of a *shallow*
    # repository makes git re-fetch missing objects recursively (thousands of processes; it cost
    # this test ~10 minutes of CI before)
    subprocess.run(["git", "clone", "-q", f"file://{ROOT}", str(clone)], check=True)

    runtime = tmp_path / "runtime"
    venv.create(runtime, with_pip=True)
    py = runtime / "bin" / "python"
    # Colab preinstalls its scientific stack (jax, flax, optax, numpy, matplotlib, ipykernel, ...)
    # but not jdeq: the runtime sees this environment's packages through a .pth entry to a copy of
    # its site-packages made of symlinks, every jdeq entry left out (so `import jdeq` fails there
    # and pip does not count jdeq as installed). What pip installs lands in the runtime's own
    # site-packages; pip never uninstalls outside its environment. Without this the test spent
    # minutes installing jax & co. from scratch.
    stack = tmp_path / "preinstalled"
    stack.mkdir()
    outer = Path(sysconfig.get_paths()["purelib"])
    for entry in outer.iterdir():
        if not (entry.name.lower().startswith(("jdeq", "__editable__")) or entry.suffix == ".pth"):
            (stack / entry.name).symlink_to(entry)
    inner = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           check=True, capture_output=True, text=True).stdout.strip()
    (Path(inner) / "colab_preinstalled.pth").write_text(f"{stack}\n")
    env = {**os.environ, "PIP_CACHE_DIR": str(ROOT / ".cache" / "pip"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    probe = subprocess.run([str(py), "-c", "import jax, flax, optax, ipykernel; import jdeq"], env=env, cwd=tmp_path,
                           capture_output=True, text=True)
    assert "No module named 'jdeq'" in probe.stderr, probe.stderr[-2000:]  # the stack is there, jdeq is not

    # A kernelspec for the runtime's interpreter, found through JUPYTER_PATH.
    spec = tmp_path / "jupyter" / "kernels" / "fresh"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(py), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fresh runtime", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    nb = jupytext.read(ROOT / "notebooks" / "01_quickstart.py")
    first = next(c for c in nb.cells if c.cell_type == "code")
    first.source, n = PARAM.subn(f'JDEQ_REPO = "file://localhost{clone}"  #@param {{type:"string"}}', first.source)
    assert n == 1
    workdir = tmp_path / "work"  # not the checkout: `import jdeq` must find the installed copy
    workdir.mkdir()
    client = nbclient.NotebookClient(nb, kernel_name="fresh", timeout=600,
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute(env={**env, "JDEQ_QUICK": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"})

    out = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                  if o.output_type == "stream")
    assert "backend: " in out
    where = subprocess.run([str(py), "-c", "import jdeq; print(jdeq.__file__)"], check=True, env=env,
                           capture_output=True, text=True, cwd=workdir).stdout
    assert str(runtime) in where, f"jdeq was not installed into the fresh runtime: {where}"
