"""The API reference site (mkdocs + mkdocstrings, ``mkdocs.yml``) builds from the docstrings
with every warning an error (``--strict``): a docstring that names a parameter the signature
lacks, a broken cross-reference or a page missing from the navigation fails here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")

ROOT = Path(__file__).resolve().parents[1]


def test_api_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    core = (site / "api" / "core" / "index.html").read_text()
    for name in ["fixed_point", "Anderson", "Implicit", "SolverStats"]:  # rendered, not just listed
        assert f'id="jdeq.{name}"' in core, name
    assert (site / "api" / "nnx" / "index.html").is_file()
