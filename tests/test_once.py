"""The ``once`` fixture (conftest.py) really computes once per xdist run: the 8-device and
multi-process checks rely on it to keep CI's time (each costs ~1-2 minutes per computation)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")

USER = '''
import os, time, pytest

COUNT = {count!r}

def compute():
    with open(COUNT, "a") as f:
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "master") + "\\n")
    time.sleep(1.0)  # both workers are waiting for it at once
    return {{"value": 42}}

def boom():
    with open(COUNT + ".boom", "a") as f:
        f.write("x\\n")
    raise RuntimeError("the expensive check crashed")

@pytest.mark.parametrize("i", range(6))
def test_value(once, i):
    assert once("shared", compute) == {{"value": 42}}

@pytest.mark.parametrize("i", range(2))
def test_failure_is_shared(once, i):
    once("broken", boom)
'''


def test_once_computes_once_across_xdist_workers(tmp_path):
    (tmp_path / "conftest.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('jdeq_test_conftest', {str(CONFTEST)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "once = mod.once\n"
    )
    count = tmp_path / "count.txt"
    (tmp_path / "test_user.py").write_text(USER.format(count=str(count)))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider", str(tmp_path),
         "--rootdir", str(tmp_path), "--basetemp", str(tmp_path / "base")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert "6 passed" in out and "2 failed" in out, out
    assert len(count.read_text().splitlines()) == 1, out  # computed by one worker only
    assert len((tmp_path / "count.txt.boom").read_text().splitlines()) == 1, out
    assert "the expensive check crashed" in out
    assert "failed in another xdist worker" in out
