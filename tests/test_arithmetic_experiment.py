"""jdeq.experiments.arithmetic: the whole study at a tiny size, in-process, writes its reports."""

import dataclasses
import json

import pytest

import jdeq
from jdeq.experiments import arithmetic as E

# One DEQ and one weight-tied unrolled net cover the code paths of the four experiments: the
# baselines and the small-budget DEQs of experiment 4 go through the same training and scoring
# code (their construction is tested below); the cheapest gradient to compile (JFB).
TINY = dataclasses.replace(
    E.QUICK, length=8, max_depth=1, n_train=128, n_test=64, features=8, num_heads=2, steps=2,
    batch_size=32, unrolled_depths=(2,), baselines=(), extra_deqs=(), deq_gradient="jfb",
    extrap_train_depth=0, extrap_models=("unrolled-2",), test_maxiters=(1, 2), deq_maxiter=3,
    train_budgets=(), trace_maxiter=4, trace_examples=3, eval_batch_size=64,
    model_lr=(("unrolled", 1e-2),),
)


def test_tiny_study_end_to_end(tmp_path):
    res = E.run(TINY, str(tmp_path), progress=False, command="test")
    for name in E.EXPERIMENTS:
        for ext in ("json", "png", "md"):
            assert (tmp_path / f"{name}.{ext}").stat().st_size > 0
    assert (tmp_path / "summary.md").exists()
    depth = json.loads((tmp_path / "depth.json").read_text())
    assert depth["config"]["length"] == 8 and depth["machine"]["backend"]
    s = res["depth"]["summary"]
    assert set(s) == {"deq", "unrolled-2"}
    assert s["unrolled-2"]["forward_iterations"][0] == 2 and s["deq"]["params"] == s["unrolled-2"]["params"]
    assert s["unrolled-2"]["lr"] == 1e-2 and s["deq"]["lr"] == TINY.lr  # per-class learning rates
    assert set(s["deq"]["per_depth"]) == {"0", "1"}
    rows = res["compute"]["deq"][0]["rows"]
    assert [r["maxiter"] for r in rows] == [1, 2] and all(r["nsteps"] <= r["maxiter"] for r in rows)
    assert [r["depth"] for r in res["compute"]["unrolled"][0]["rows"]] == [1, 2]
    assert res["depth"]["runs"][0]["forward_iterations"] <= 3
    conv = res["convergence"]["reference"][0]
    assert conv["at_train_budget"]["nsteps"] <= 3 and len(conv["trajectories"]) == 3
    assert len(conv["trajectories"][0]) == 4 and sum(b["n"] for b in conv["residual_bins"]) == 64
    assert set(res["extrapolation"]["summary"]["unrolled-2"]) == {"0", "1"}


def test_models_gradients_and_matched_sizes():
    tied = E._matched_sizes(TINY)[0]
    for kind in ("transformer", "lstm"):  # sized to the tied cell's parameter count
        assert abs(jdeq.train.count_params(E.build_model(kind, TINY, 0)) - tied) < 0.1 * tied
    assert isinstance(E.build_model("deq", E.QUICK, 0).core.gradient, jdeq.Phantom)
    assert isinstance(E.build_model("deq", TINY, 0).core.gradient, jdeq.JacobianFree)
    deq = E.build_model("deq-implicit", TINY, 0, maxiter=3)
    assert isinstance(deq.core.gradient, jdeq.Implicit) and deq.core.solver.maxiter == 3
    assert E._models(dataclasses.replace(TINY, extra_deqs=("jfb",))) == ["deq", "deq-jfb", "unrolled-2"]


def test_bad_names_raise(tmp_path):
    with pytest.raises(ValueError, match="experiments"):
        E.run(TINY, str(tmp_path), ["depth", "nope"], progress=False)
    with pytest.raises(ValueError, match="kind"):
        E.build_model("gru", TINY, 0)
    with pytest.raises(ValueError, match="gradient"):
        E.build_model("deq-magic", TINY, 0)
