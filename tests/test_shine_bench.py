"""Smoke test of ``benchmarks/shine.py --quick``: it writes a sane JSON and PNG and prints its
table last; behaviour checks only (no timing assertions): SHINE's direct gradient takes no
backward iterations, refine stays as exact as the default backward, fallback is no worse than
direct."""

from __future__ import annotations

import json
import math

from benchmarks import shine


def test_shine_quick(tmp_path, capsys):
    shine.main(["--quick", "--steps", "5", "--warmup", "1", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "shine.json").read_text())
    assert (tmp_path / "shine.png").stat().st_size > 1000
    assert doc["machine"]["backend"]
    rows = {(r["forward"], r["gradient"]): r for r in doc["rows"]}
    default, direct = rows[("Broyden", "Implicit()")], rows[("Broyden", "shine direct")]
    assert default["bwd_iters"] > 1 and direct["bwd_iters"] == 0
    assert 0 < direct["est_residual"] < 1
    for name in ("Implicit()", "shine refine"):
        assert rows[("Broyden", name)]["rel_error"] < 1e-3, name
    assert direct["rel_error"] > 1e-3 and direct["cosine"] > 0.5
    fallback = rows[("Broyden", "shine fallback")]  # per example: the estimate or the full solve
    assert 0 <= fallback["accepted"] <= 1
    assert fallback["rel_error"] <= max(1.5 * direct["rel_error"], 1e-3)
    for r in doc["rows"]:
        assert math.isfinite(r["step_ms"]) and r["step_ms"] > 0
    assert "vs Implicit()" in capsys.readouterr().out.strip().splitlines()[-7]
