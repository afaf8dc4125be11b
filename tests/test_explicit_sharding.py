"""Explicit and Auto sharding (DESIGN.md, v0.2): under ``jax.set_mesh`` with 8 simulated CPU
devices, every solver and every gradient mode (jaxopt's GMRES and BiCGSTAB backward included), vmap of
per-example code, both Flax layers and ``fit``/``evaluate``/``predict`` on data and model axes
give what one device gives, and a batch sharded on entry stays sharded.

XLA gives the CPU backend 8 devices only when the flag is set before jax is imported, so the
checks run once, in a subprocess (``tests/_explicit_worker.py``), which reports one JSON line per
check; each test below asserts its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_WORKER = os.path.join(os.path.dirname(__file__), "_explicit_worker.py")
sys.path.insert(0, os.path.dirname(__file__))
import _explicit_worker as W  # noqa: E402  (the check list; importing it sets no XLA flags)
from _devices import cpu_devices_env  # noqa: E402


def _results(kind: str) -> dict:
    env = cpu_devices_env(8)
    proc = subprocess.run([sys.executable, _WORKER, kind], capture_output=True, text=True, env=env, timeout=1200)
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            out[r["name"]] = r
    if not out:
        raise RuntimeError(f"worker produced no results (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return out


CHECKS = (
    [f"{kind}/{s}/{g}" for kind, pairs in W.PAIRS.items() for s, g in pairs]
    + [f"{k}/{c}" for k in ("explicit", "auto") for c in ("vmap_per_example", "flax_layers", "fit_evaluate_predict")]
    + ["explicit/feature_split_state"]
)


def test_every_solver_and_gradient_is_covered_under_each_axis_type():
    for kind, pairs in W.PAIRS.items():
        assert {s for s, _ in pairs} == set(W.SOLVERS), kind
    assert {g for _, g in W.PAIRS["explicit"]} == set(W.GRADIENTS)


# one worker subprocess per axis type, run once per test run (the ``once`` fixture of conftest.py
# shares it between xdist workers)
@pytest.mark.parametrize("name", CHECKS)
def test_sharded_equals_one_device(name, once):
    kind = name.split("/")[0]
    results = once(f"explicit_worker_{kind}", lambda: _results(kind))
    assert name in results, f"check {name} did not run; ran: {sorted(results)}"
    r = results[name]
    assert r["ok"], r["detail"]
