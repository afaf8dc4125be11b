"""Import weight: ``import jdeq`` loads the core and the Flax adapters only.

jaxopt (archived) loads when a jaxopt solver or linear solver is used, orbax when a checkpoint is
touched, and ``jdeq.train``, ``jdeq.data`` and ``jdeq.experiments`` on first attribute access.
Checked in a fresh interpreter (this process has imported everything already). Import *time*
is measured by ``benchmarks/import_time.py``, not asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import jdeq

NOT_ON_IMPORT = ["jaxopt", "orbax", "jdeq.train", "jdeq.data", "jdeq.experiments"]


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def _loaded(modules: set[str], name: str) -> list[str]:
    return sorted(m for m in modules if m == name or m.startswith(name + "."))


def test_import_jdeq_is_lean():
    modules = _modules_after("import jdeq")
    loaded = {name: _loaded(modules, name)[:5] for name in NOT_ON_IMPORT}
    assert not any(loaded.values()), f"`import jdeq` loaded: { {k: v for k, v in loaded.items() if v} }"
    for name in ["jdeq.nnx", "jdeq.linen", "jdeq.models"]:
        assert name in modules, name


def test_subpackages_load_on_first_use():
    modules = _modules_after("import jdeq\nassert jdeq.train.fit is not None")
    assert "jdeq.train" in modules
    assert not _loaded(modules, "orbax"), "touching jdeq.train loaded orbax before any checkpoint"
    for name in ["train", "data", "experiments"]:
        assert name in jdeq.__all__ and name in dir(jdeq), name
        assert getattr(jdeq, name).__name__ == f"jdeq.{name}"


def test_unknown_attribute_is_an_attribute_error():
    try:
        jdeq.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("jdeq.no_such_thing did not raise AttributeError")


def test_import_time_benchmark_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the benchmarks' plots (not in the minimum-versions venv)
    from benchmarks import import_time

    doc = import_time.main(["--rounds", "1", "--out", str(tmp_path)])
    (row,) = doc["rows"]
    assert row["variant"] == "current" and row["base_ms"] > 0 and row["jdeq_ms"] > 0
    assert (tmp_path / "import_time.json").is_file() and (tmp_path / "import_time.png").is_file()
    assert capsys.readouterr().out.strip().splitlines()[-1].lstrip().startswith("current")
