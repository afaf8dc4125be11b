"""Smoke tests of the benchmarks: each ``main`` runs in-process at a tiny size and must write a
sane JSON and PNG and print its table last. Timings are never asserted, only shapes of results
(e.g. the DEQ's compiled memory is flat in the solver budget while the unrolled net's grows)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest

from benchmarks import backward_solvers, memory_vs_depth, speed, vs_torchdeq


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _load(tmp_path, name):
    path = tmp_path / f"{name}.json"
    assert path.is_file(), f"{path} was not written"
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    return json.loads(path.read_text())


def _last_lines(capsys, n=3):
    out = capsys.readouterr().out.strip().splitlines()
    return out[-n:]


def test_memory_vs_depth_flat_for_implicit_growing_for_unrolled(tmp_path, capsys):
    memory_vs_depth.main([
        "--depths", "1", "8", "--methods", "unrolled", "deq-implicit", "--time-depths", "8",
        "--steps", "2", "--warmup", "1", "--width", "16", "--batch", "4", "--out", str(tmp_path),
    ])
    doc = _load(tmp_path, "memory_vs_depth")
    assert doc["machine"]["backend"] and doc["machine"]["cpu_cores"] >= 1
    rows = doc["rows"]
    assert len(rows) == 4
    for r in rows:
        assert r["temp_bytes"] >= 0 and _positive(r["argument_bytes"]) and _positive(r["output_bytes"])
        assert _positive(r["compile_s"]) and _positive(r["fwd_iters"])
        assert (r["step_ms"] is not None) == (r["depth"] == 8)
        if r["step_ms"] is not None:
            assert _positive(r["step_ms"]) and r["timed_steps"] == 2
    by = {(r["method"], r["depth"]): r for r in rows}
    implicit = [by[("deq-implicit", d)]["temp_bytes"] for d in (1, 8)]
    unrolled = [by[("unrolled", d)]["temp_bytes"] for d in (1, 8)]
    assert implicit[0] == implicit[1], implicit  # compiled separately per budget, same memory
    assert unrolled[0] < unrolled[1], unrolled
    assert by[("deq-implicit", 8)]["fwd_iters"] == 8  # tol below float32: whole budget spent
    assert by[("deq-implicit", 8)]["bwd_iters"] == 8  # from Implicit's callback
    t = doc["targets"]["mlp"]
    assert t["flat_within_5pct"] and t["implicit_temp_spread"] == 0.0 and t["ratio_depth"] == 8
    assert any(line.strip().startswith("mlp") and "deq-implicit" in line for line in _last_lines(capsys))


def test_speed_rows_and_overhead(tmp_path, capsys):
    speed.main([
        "--settings", "mlp", "--solvers", "FixedPointIteration", "--gradients", "Implicit", "JFB",
        "--steps", "2", "--warmup", "1", "--width", "16", "--batch", "4", "--out", str(tmp_path),
    ])
    doc = _load(tmp_path, "speed")
    assert [(r["solver"], r["gradient"]) for r in doc["rows"]] == [
        ("FixedPointIteration", "Implicit"), ("FixedPointIteration", "JFB")]
    for r in doc["rows"]:
        for key in ("train_ms", "infer_ms", "fwd_nfe", "bwd_nfe", "overhead_train", "overhead_infer", "cell_cost_ms"):
            assert _positive(r[key]), (key, r[key])
        assert r["rel_residual"] < 1e-4 and r["converged"] == 1.0
    assert doc["rows"][1]["bwd_nfe"] == 1
    assert _positive(doc["cell_costs"]["mlp"]["t_eval_s"]) and _positive(doc["cell_costs"]["mlp"]["t_vjp_s"])
    assert "JFB" in _last_lines(capsys)[-1]


def test_speed_rejects_unknown_solver(tmp_path):
    with pytest.raises(ValueError, match="--solvers"):
        speed.main(["--settings", "mlp", "--solvers", "Newton", "--out", str(tmp_path)])


def test_backward_solvers_accuracy_and_ratios(tmp_path, capsys):
    backward_solvers.main([
        "--solvers", "FixedPointIteration", "bicgstab", "--tols", "1e-6", "--target", "1e-3",
        "--steps", "5", "--warmup", "1", "--width", "16", "--batch", "4", "--out", str(tmp_path),
    ])
    doc = _load(tmp_path, "backward_solvers")
    rows = {r["solver"]: r for r in doc["rows"]}
    assert set(rows) == {"FixedPointIteration", "bicgstab", "Implicit() as is (tol 1e-4 abs, maxiter 50)"}
    for name in ("FixedPointIteration", "bicgstab"):
        r = rows[name]
        assert r["reached"] and 0 <= r["rel_error"] <= 1e-3 and _positive(r["step_ms"])
    assert rows["bicgstab"]["ratio_vs_bicgstab"] == 1.0
    assert _positive(rows["FixedPointIteration"]["bwd_iters"])
    assert [p["tol"] for p in doc["sweep"]] == [1e-6, 1e-6]
    assert "bicgstab" in "\n".join(_last_lines(capsys, 6))


def test_vs_torchdeq_without_torch_exits_cleanly(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdeq", None)  # import torchdeq -> ImportError
    doc = vs_torchdeq.main(["--out", str(tmp_path)])
    assert doc["skipped"]
    assert 'pip install -e ".[compare]"' in capsys.readouterr().out
    assert not (tmp_path / "vs_torchdeq.json").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchdeq") is None,
    reason="needs the `compare` extra (torch, torchdeq)",
)
def test_vs_torchdeq_agreement_and_ratio(tmp_path, capsys):
    vs_torchdeq.main([
        "--rounds", "2", "--steps", "2", "--warmup", "1", "--width", "16", "--batch", "4", "--in-features", "8",
        "--out", str(tmp_path),
    ])
    doc = _load(tmp_path, "vs_torchdeq")
    tight = doc["agreement"]["tight"]
    assert tight["fixed_point_rel_diff"] < 1e-4 and tight["grad_rel_diff_all"] < 1e-3
    assert doc["agreement"]["benchmark"]["grad_rel_diff_all"] < 5e-2
    assert _positive(doc["ratio"]["median"]) and len(doc["ratio_per_round"]) == 2
    assert "ratio jdeq/TorchDEQ" in _last_lines(capsys)[-1]


def test_solver_steps_variants_solve_the_same_problem(tmp_path, capsys):
    """``benchmarks.solver_steps`` (tiny size): every formulation it times reaches the shipped
    Anderson's fixed point, converges on every example, and the table comes last."""
    from benchmarks import solver_steps

    doc = solver_steps.main(["--quick", "--cells", "mlp-slow", "--rounds", "1", "--steps", "1",
                             "--out", str(tmp_path)])
    rows = doc["cells"]["mlp-slow"]["rows"]
    assert {r["variant"] for r in rows} == set(solver_steps.VARIANTS)
    for r in rows:
        assert r["converged"], r
        assert r["max_abs_diff_to_shipped"] < 1e-3, r
        assert r["ms"] > 0 and r["ratio"] > 0
    shipped = next(r for r in rows if r["variant"] == "Anderson (shipped)")
    assert shipped["ratio"] == 1.0 and shipped["max_abs_diff_to_shipped"] == 0.0
    assert (tmp_path / "solver_steps.json").exists() and (tmp_path / "solver_steps.png").stat().st_size > 1000
    assert "FixedPointIteration" in capsys.readouterr().out.strip().splitlines()[-1]
