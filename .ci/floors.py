"""The minimum-versions job: jdeq's tests at the exact floors of pyproject.toml.

Reads ``[project] dependencies`` from pyproject.toml, turns every ``name>=X`` into ``name==X``,
installs exactly those (plus jdeq itself, editable, without further dependencies, and the test
runner) into a fresh venv, and runs the given tests there (default: the core tests and the
README example). A floor that does not install, or an API that a floor lacks, fails the job.

The venv is kept under ``.cache/floors/`` (gitignored), one per set of floors and Python version,
and pip's wheel cache under ``.cache/pip``, so a rerun with unchanged floors installs nothing.

Usage: ``python .ci/floors.py [pytest args...]`` (``make test-floors`` runs it).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
# The core tests (solvers, gradients, Flax layers, jaxopt adapter, lean import), the README
# example (fit, optax, tqdm) and checkpoint/resume (orbax): together they touch every floor.
DEFAULT_TESTS = [
    "tests/test_readme.py",
    "tests/test_solvers.py",
    "tests/test_gradients.py",
    "tests/test_flax.py",
    "tests/test_jaxopt_solver.py",
    "tests/test_import.py",
    "tests/test_train.py::test_resume_equals_uninterrupted",
    # Flax APIs newer than flax itself: Variable.get_value/set_value (the warm-start cache, model
    # axis shardings), nnx.SpectralNorm/WeightNorm/iter_modules (jdeq.models.norm, dropout masks).
    # Flax 0.12.0 lacks them all (this list found it; the floor is 0.12.1 since)
    "tests/test_warm_start.py::test_lookup_and_update_by_index",
    "tests/test_warm_start.py::test_pytree_state",
    "tests/test_warm_start.py::test_data_mesh_equals_one_device",
    # nnx.with_partitioning's names: flax 0.12.1 stores them under another key than later versions
    "tests/test_sharding.py::test_param_shardings_keep_the_models_annotations",
    "tests/test_norm_dropout.py",
]
TEST_TOOLS = ["pytest>=8", "pytest-xdist>=3.5"]


def floors() -> list[str]:
    """``name==X`` for every ``name>=X`` in pyproject's dependencies (each must have a floor)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = []
    for dep in deps:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][A-Za-z0-9.]*)\s*(,.*)?", dep)
        if not m:
            raise SystemExit(f"pyproject dependency {dep!r} has no '>=' floor to test")
        pins.append(f"{m.group(1)}=={m.group(2)}")
    return pins


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def venv_for(pins: list[str]) -> Path:
    """A venv holding exactly ``pins`` (made once per set of pins and Python version)."""
    key = "\n".join([sys.version, *pins, *TEST_TOOLS])
    venv = CACHE / "floors" / f"venv-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    stamp = venv / "floors.txt"
    if stamp.exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    env = {**os.environ, "PIP_CACHE_DIR": str(CACHE / "pip"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # One resolve: the pins, jdeq's own requirements (which the pins must satisfy) and pytest.
    run([py, "-m", "pip", "install", "-q", *pins, *TEST_TOOLS, "-e", str(ROOT)], env=env)
    frozen = subprocess.run([py, "-m", "pip", "freeze"], check=True, capture_output=True, text=True).stdout
    for pin in pins:  # pip must not have moved a floor to satisfy something else
        if pin.lower().replace("_", "-") not in frozen.lower().replace("_", "-"):
            raise SystemExit(f"{pin} did not install exactly; pip freeze:\n{frozen}")
    stamp.write_text(frozen)
    return venv


def main(argv: list[str]) -> int:
    pins = floors()
    print("floors:", " ".join(pins), flush=True)
    venv = venv_for(pins)
    args = argv or [*DEFAULT_TESTS, "-q", "-p", "no:cacheprovider", "-n", "auto"]
    cmd = [str(venv / "bin" / "python"), "-m", "pytest", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
