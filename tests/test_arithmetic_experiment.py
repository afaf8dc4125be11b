"""jdeq.experiments.arithmetic: the study at a tiny size, in-process, writes summary.json with the
schema of issue 16; the AA score and trajectory kinds on hand-made cases; model construction."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdeq
from jdeq.experiments import arith_measure as M
from jdeq.experiments import arithmetic as E
from jdeq.experiments.arith_models import SequenceClassifier

# The code paths of the study (a DEQ, a small-budget DEQ, the unrolled net, an LSTM; the other
# gradients and the transformer go through the same code, their construction is tested below),
# at a size where nothing is learned: E.QUICK, what `--quick` runs, with fewer steps.
TINY = dataclasses.replace(E.QUICK, steps=4, n_train=128, n_test=16, aa_examples=16, traj_examples=8,
                           eval_batch_size=64)


def test_tiny_study_writes_the_summary_schema(tmp_path):
    res = E.run(TINY, str(tmp_path), log=lambda *_: None)
    for name in ("summary.json", "summary.md", "runs.json", "depth.png", "compute.png", "path.png", "convergence.png"):
        assert (tmp_path / name).stat().st_size > 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["seeds"] == [0] and s["train_depths"] == [0, 1] and s["test_depths"] == [0, 1, 2]
    assert set(s["models"]) == {"deq", "deq-budget2", "unrolled-3", "lstm"}
    for name, m in s["models"].items():
        assert set(m) >= {"in_distribution_accuracy", "per_depth", "params", "forward_iterations"}
        assert len(m["in_distribution_accuracy"]) == 2 and set(m["per_depth"]) == {"0", "1", "2"}
        assert 0 <= m["in_distribution_accuracy"][0] <= 1
    assert s["models"]["unrolled-3"]["forward_iterations"] == [3.0, 0.0]
    assert s["models"]["deq-budget2"]["forward_iterations"][0] <= 2
    assert s["models"]["deq"]["params"] == s["models"]["unrolled-3"]["params"]
    tc = s["test_time_compute"]
    assert tc["iterations"] == [1, 3] and len(tc["models"]["deq"]["per_depth"]["2"]) == 2
    assert all(n <= 1 for n in tc["models"]["deq"]["nsteps"]["0"][:1])  # budget 1 -> at most one step
    pi = s["path_independence"]["models"]
    assert set(pi) == {"deq", "deq-budget2", "unrolled-3"} and -1 <= pi["deq"]["aa"][0] <= 1
    cv = s["convergence"]["models"]
    assert cv["deq-budget2"]["train_budget"] == 2 and cv["deq"]["train_budget"] == TINY.deq_maxiter
    kinds = cv["deq"]["trajectories"]
    assert sum(kinds[k][0] for k in ("converged", "limit_cycle", "slow", "irregular")) == pytest.approx(1)
    assert s["task"]["n_test_per_depth"] == {"0": 16, "1": 16, "2": 16}
    assert len(res["runs"]) == 4


def test_aa_score_is_one_for_a_contraction_and_low_for_a_memory():
    model = SequenceClassifier(16, 10, length=5, features=4, rngs=nnx.Rngs(0),
                               solver=jdeq.FixedPointIteration(tol=1e-7, maxiter=200))
    tokens = np.array([[1, 11, 2, 0, 0], [3, 12, 4, 11, 5], [6, 11, 7, 0, 0]], np.int32)
    # Shrink the cell's weights: the map is then a contraction, with one fixed point from anywhere.
    for lin in (model.deq.cell.gates, model.deq.cell.cand):
        lin.kernel[...] = 0.01 * lin.kernel[...]
    aa, same = M.aa_score(model, tokens)
    assert aa.shape == (3,) and np.all(aa > 0.999) and same.all()
    # Zero update gate (gate bias -> -inf): f(z) = z, the state never moves: AA is the cosine
    # between the start (another input's state = zeros) and the own state (zeros): defined as 0.
    model.deq.cell.gates.bias[...] = jnp.full_like(model.deq.cell.gates.bias[...], -1e4)
    aa, _ = M.aa_score(model, tokens, depth=3)
    assert np.all(aa < 0.5)


def test_trajectory_kinds_and_statistics():
    model = SequenceClassifier(16, 10, length=5, features=4, rngs=nnx.Rngs(0))
    tokens = np.array([[1, 11, 2, 0, 0], [3, 12, 4, 11, 5]], np.int32)
    for lin in (model.deq.cell.gates, model.deq.cell.cand):
        lin.kernel[...] = 0.01 * lin.kernel[...]
    k = M.trajectory_kinds(model, tokens, steps=40)
    assert k["converged"] == 1.0 and k["limit_cycle"] == 0.0 and k["n"] == 2
    assert M.auc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([True, True, False, False])) == 1.0
    assert M.auc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    assert M.auc(np.array([1.0]), np.array([True])) is None
    assert M.mean_std([1.0, 3.0]) == [2.0, pytest.approx(np.sqrt(2))]
    assert M.per_depth(np.array([1.0, 0.0, 1.0]), np.array([0, 0, 2])) == {"0": 0.5, "2": 1.0}


def test_models_and_matched_sizes():
    tied, _, _ = E.matched_sizes(TINY)
    for kind in ("transformer", "lstm"):  # sized to the tied cell's parameter count
        assert abs(jdeq.train.count_params(E.build_model(kind, TINY, 0)) - tied) < 0.25 * tied
    assert isinstance(E.build_model("deq", TINY, 0).deq.gradient, type(E.GRADIENTS[TINY.deq_gradient]))
    assert E.build_model("deq-budget4", TINY, 0).deq.solver.maxiter == 4
    assert isinstance(E.build_model("deq-jfb", TINY, 0).deq.gradient, jdeq.JacobianFree)
    assert isinstance(E.build_model("deq-phantom", TINY, 0).deq.gradient, jdeq.Phantom)
    full = dataclasses.replace(TINY, extra_gradients=("phantom", "jfb"), baselines=("transformer", "lstm"))
    assert E.model_names(full) == ["deq", "deq-phantom", "deq-jfb", "deq-budget2", "unrolled-3", "transformer", "lstm"]


def test_bad_names_raise():
    with pytest.raises(ValueError, match="kind"):
        E.build_model("gru", TINY, 0)
    with pytest.raises(ValueError, match="gradient"):
        E.build_model("deq-magic", TINY, 0)
    with pytest.raises(ValueError, match="gradient"):
        E.run(dataclasses.replace(TINY, deq_gradient="adjoint"), "unused")
    with pytest.raises(SystemExit):
        E.main(["--experiments", "depth"])
