"""Smoke test of ``benchmarks.vs_peers`` at a tiny size, without needing any peer installed:
jdeq alone end to end (reference, calibration target, interleaved timing, JSON/PNG, table
last), and every peer's skip path (a missing package is a printed reason, never a crash)."""

from __future__ import annotations

import json
import math
import sys

from benchmarks import vs_peers as V


def test_jdeq_alone_and_skipped_peers(tmp_path, capsys, monkeypatch):
    for mod in ("optimistix", "lineax", "torch", "torchdeq"):
        monkeypatch.setitem(sys.modules, mod, None)  # import -> ImportError
    monkeypatch.setattr(V, "PEER_VENV", tmp_path / "no-venv")
    monkeypatch.setattr(V, "_python312_candidates", lambda: [])
    doc = V.main(["--quick", "--cells", "mlp-disk", "--peers", "optimistix,torchdeq,banax", "--no-levers",
                  "--no-overhead", "--rounds", "1", "--steps", "1", "--out", str(tmp_path)])
    assert set(doc["skipped"]) == {"optimistix", "torchdeq", "banax"}
    assert "3.12" in doc["skipped"]["banax"]
    rows = doc["cells"]["mlp-disk"]["rows"]
    assert [r["library"] for r in rows] == ["jdeq"]
    assert rows[0]["ratio"] == 1.0 and 0 < rows[0]["grad_err"] < 1e-2 and rows[0]["ms"] > 0
    saved = json.loads((tmp_path / "vs_peers.json").read_text())
    assert saved["cells"]["mlp-disk"]["target_grad_err"] == rows[0]["grad_err"]
    assert (tmp_path / "vs_peers.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "skipped banax" in out and "skipped torchdeq" in out
    assert "jdeq Anderson + Implicit (default)" in out.strip().splitlines()[-1]


def test_reference_and_error_metric():
    prob = V.make_problem("mlp-slow", quick=True)
    ref = V.reference_grad(prob)
    assert V.grad_error(ref, ref) == 0.0
    g = {k: 1.01 * v for k, v in ref.items()}
    assert math.isclose(V.grad_error(g, ref), 0.01, rel_tol=1e-6)
    w = prob["params"]["w"].astype(float)
    assert max(abs(__import__("numpy").linalg.eigvals(w))) < 1  # a few slow modes, still contractive


def test_accelerator_script_refuses_a_cpu_only_jax(tmp_path):
    """``benchmarks/accelerator.sh`` (the GPU/TPU path) stops before any benchmark when JAX sees
    only a CPU, so CPU figures are never filed as accelerator ones."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "accelerator.sh"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no accelerator" in proc.stderr
    assert sorted(os.listdir(tmp_path / "out")) == []  # nothing was run or written


def test_alternating_anderson_lever():
    """The benchmark's alternating-Anderson lever: ``mix_every=1`` is jdeq's Anderson, a period
    longer than the budget is plain iteration, and in between it solves the same problem."""
    import jax.numpy as jnp
    import numpy as np

    import jdeq

    rng = np.random.default_rng(0)
    w = jnp.asarray(0.9 * rng.standard_normal((16, 16)) / 4, jnp.float32)
    a = jnp.asarray(rng.standard_normal((5, 16)), jnp.float32)
    f = lambda z, a: jnp.tanh(z @ w + a)  # noqa: E731
    z0 = jnp.zeros((5, 16))
    solve = lambda s: jdeq.fixed_point(f, z0, a, solver=s)  # noqa: E731
    opts = dict(tol=1e-6, maxiter=60)
    same = solve(V.AlternatingAnderson(mix_every=1, **opts))
    ref = solve(jdeq.Anderson(**opts))
    np.testing.assert_array_equal(same.value, ref.value)
    np.testing.assert_array_equal(same.stats.nsteps, ref.stats.nsteps)
    plain = solve(V.AlternatingAnderson(mix_every=1000, **opts))
    fpi = solve(jdeq.FixedPointIteration(**opts))
    np.testing.assert_allclose(plain.value, fpi.value, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(plain.stats.nsteps, fpi.stats.nsteps)
    alt = solve(V.AlternatingAnderson(mix_every=2, **opts))
    assert bool(alt.stats.converged.all())
    np.testing.assert_allclose(alt.value, ref.value, atol=1e-5)
    # three evaluations = steps after k = 1 (one stored pair: a plain step either way) and k = 2
    three = dict(tol=1e-12, maxiter=3)
    np.testing.assert_array_equal(solve(V.AlternatingAnderson(mix_every=2, **three)).value,
                                  solve(jdeq.Anderson(**three)).value)  # k = 2 mixes
    np.testing.assert_allclose(solve(V.AlternatingAnderson(mix_every=3, **three)).value,
                               solve(jdeq.FixedPointIteration(**three)).value, rtol=0, atol=1e-6)  # k = 2 plain
    assert not np.allclose(solve(jdeq.Anderson(**three)).value, solve(jdeq.FixedPointIteration(**three)).value,
                           rtol=0, atol=1e-4)
