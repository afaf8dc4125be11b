"""The test modules themselves: importing them computes nothing with JAX."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_IMPORT_ALL = """
import importlib, pathlib, sys
sys.path[:0] = ["tests", "."]
from jax._src import xla_bridge
for path in sorted(pathlib.Path("tests").glob("test_*.py")):
    importlib.import_module("tests." + path.stem)
    if xla_bridge.backends_are_initialized():
        print(path.stem)
        break
"""


def test_no_test_module_starts_jax_at_import():
    # Mutation testing (.ci/mutation.py) forks every mutant's test run from a server that has
    # imported the test modules; tests/conftest.py refuses such a run if JAX's backend was
    # started there, and mutmut then reports the mutant as a "timeout" without running a test.
    # Module-level constants are numpy arrays; anything JAX builds is built inside a test.
    out = subprocess.run([sys.executable, "-c", _IMPORT_ALL], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"tests/{out.stdout.strip()}.py starts JAX's backend at import"
