"""Promises of ``jdeq.train``'s docstrings (``fit``'s options, ``JacReg``, ``evaluate``,
checkpoints), each held by a test that fails when the option is ignored (issue 18).
tests/test_promises.py holds the skip rule's parts and the checksums; tests/test_train.py the
seeded JacReg draws, fit == own loop, resume and ``keep``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdeq import train as T

RNG = np.random.default_rng(0)
X = RNG.normal(size=(23, 4)).astype(np.float32)
DATA = {"inputs": X, "labels": (X[:, 0] > 0).astype(np.int32)}


def _linear():
    return nnx.Linear(4, 2, rngs=nnx.Rngs(0))


# ---- fit: log_every, eval_every, callback; evaluate's weighting ----------------------------------


def test_fit_logs_evaluates_and_calls_back_on_the_documented_steps():
    """``log_every``: logged every k steps and at the end; ``eval_every``: evaluated every k
    steps and at the end; ``callback(step, metrics)``: after every step, ``step`` counting
    completed steps, ``metrics["skipped"]`` the per-step flag. The final evaluation is
    ``evaluate``'s "mean weighted by batch size" (eval_batch_size 5 on 23 examples)."""
    calls = []
    model = _linear()
    history = T.fit(model, optax.sgd(0.1), DATA, steps=7, batch_size=8, log_every=3, eval_every=2,
                    eval_data={"val": DATA}, eval_batch_size=5, progress=False,
                    callback=lambda step, m: calls.append((step, float(m["skipped"]), float(m["loss"]))))
    assert [r["step"] for r in history.train] == [3, 6, 7]
    assert [r["step"] for r in history.eval] == [2, 4, 6, 7]
    assert [c[0] for c in calls] == list(range(1, 8))
    assert all(c[1] == 0.0 for c in calls)
    assert history.train[-1]["loss"] == pytest.approx(calls[-1][2])
    whole = T.evaluate(model, DATA, batch_size=len(X))
    for k, v in whole.items():
        assert history.eval[-1]["val"][k] == pytest.approx(v, rel=1e-5), k


def test_evaluate_weights_a_short_last_batch_by_its_size():
    model = _linear()
    logits = np.asarray(model(jnp.asarray(X)))
    want = float((logits.argmax(-1) == DATA["labels"]).mean())
    for batch_size in (5, 10, 23, 64):
        assert T.evaluate(model, DATA, batch_size=batch_size)["accuracy"] == pytest.approx(want, abs=1e-6)


# ---- checkpoint_every and keep -------------------------------------------------------------------


def test_checkpoint_every_writes_those_steps_and_keeps_the_last_three(tmp_path):
    T.fit(_linear(), optax.sgd(0.1), DATA, steps=8, batch_size=8, checkpoint_dir=tmp_path,
          checkpoint_every=2, progress=False)
    assert T.checkpoint_steps(tmp_path) == [4, 6, 8]
    only_end = tmp_path / "end"
    T.fit(_linear(), optax.sgd(0.1), DATA, steps=3, batch_size=8, checkpoint_dir=only_end, progress=False)
    assert T.checkpoint_steps(only_end) == [3]  # None: only at the end


# ---- max_skipped_steps ---------------------------------------------------------------------------


def _nan_loss(model, batch):
    """A loss that is NaN at every step (``log(-1)``): every step is skipped."""
    loss = jnp.mean(model(batch["inputs"]) ** 2) + jnp.log(-jnp.ones(()))
    return loss, {"loss": loss}


def test_max_skipped_steps_raises_after_that_many_consecutive_skips():
    model = _linear()
    before = [np.array(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    with pytest.raises(FloatingPointError, match="3 consecutive steps were skipped"):
        T.fit(model, optax.sgd(0.1), DATA, steps=12, batch_size=4, loss_fn=_nan_loss, max_skipped_steps=3,
              progress=False)
    for a, b in zip(before, jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(a, b)  # the last finite parameters


def test_max_skipped_steps_none_never_raises_and_counts_every_skip():
    history = T.fit(_linear(), optax.sgd(0.1), DATA, steps=24, batch_size=4, log_every=8, loss_fn=_nan_loss,
                    max_skipped_steps=None, progress=False)
    assert [r["skipped"] for r in history.train] == [8, 16, 24]


def _nan_if_flagged(model, batch):
    """NaN exactly when the batch holds the flagged example (``log(-1)``)."""
    loss = jnp.mean(model(batch["inputs"]) ** 2) + jnp.log(1.0 - 2.0 * jnp.max(batch["flag"]))
    return loss, {"loss": loss}


def test_a_finite_step_resets_the_consecutive_skips():
    # 8 examples, one flagged, batches of 4: one step of every epoch (of two) is skipped, so at
    # most two in a row (the end of one epoch, the start of the next); a limit of 3 never fires
    data = {"inputs": X[:8], "labels": DATA["labels"][:8], "flag": np.eye(8, dtype=np.float32)[5]}
    history = T.fit(_linear(), optax.sgd(0.1), data, steps=24, batch_size=4, log_every=24, loss_fn=_nan_if_flagged,
                    max_skipped_steps=3, progress=False)
    assert history.train[-1]["skipped"] == 12  # one per epoch


def test_the_skip_total_carries_across_a_resume(tmp_path):
    kw = dict(batch_size=4, loss_fn=_nan_loss, checkpoint_dir=tmp_path, log_every=1, max_skipped_steps=None,
              progress=False)
    T.fit(_linear(), optax.sgd(0.1), DATA, steps=3, **kw)
    history = T.fit(_linear(), optax.sgd(0.1), DATA, steps=5, **kw)  # resumes at step 3
    assert [r["skipped"] for r in history.train] == [1, 2, 3, 4, 5]


# ---- JacReg: gamma, num_samples, noise reach each layer's jacobian_penalty, summed over solves ---


class _Equilibrium(nnx.Module):
    """A stand-in equilibrium layer (``fit``: "any module with ``record_equilibria`` and
    ``jacobian_penalty``"): ``z = v x``; its penalty reports the options it was given and
    depends on its own weight ``w`` only, so its gradient is visible in ``w``."""

    def __init__(self):
        self.v = nnx.Param(jnp.ones(()))
        self.w = nnx.Param(jnp.ones(()))
        self.record_equilibria = False

    def __call__(self, x):
        z = self.v[...] * x
        if self.record_equilibria:
            previous = getattr(self, "equilibria", None)
            records = tuple(previous.get_value()) if previous is not None else ()
            self.equilibria = nnx.Intermediate(records + ((x, z),))
        return z

    def jacobian_penalty(self, x, z_star, key, *, gamma, prob=1.0, num_samples=1, noise="normal"):
        code = num_samples + (100.0 if noise == "rademacher" else 0.0)
        return gamma * code * self.w[...] ** 2


class _TwoSolves(nnx.Module):
    def __init__(self):
        self.eq = _Equilibrium()

    def __call__(self, x):
        return self.eq(self.eq(x))


def _mse(model, batch):
    loss = jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
    return loss, {"loss": loss}


def test_jac_reg_options_reach_every_recorded_solve_and_the_gradient():
    data = {"x": np.ones((8, 3), np.float32), "y": np.zeros((8, 3), np.float32)}
    model, lr = _TwoSolves(), 0.01
    history = T.fit(model, optax.sgd(lr), data, steps=1, batch_size=8, log_every=1, loss_fn=_mse, progress=False,
                    jac_reg=T.JacReg(gamma=0.5, num_samples=3, noise="rademacher"))
    record = history.train[0]
    penalty = 2 * 0.5 * (3 + 100.0)  # two solves, each gamma * code * w^2 at w = 1
    assert record["jac_reg"] == pytest.approx(penalty)
    assert record["loss"] == pytest.approx(1.0)  # "loss" stays the task loss (v = 1: z = x)
    # the penalty is differentiated: dw = 2 * penalty (w = 1); the task loss does not use w
    assert float(model.eq.w[...]) == pytest.approx(1.0 - lr * 2 * penalty, rel=1e-6)


def test_consecutive_skips_carry_across_a_resume(tmp_path):
    """"steps skipped so far, carried across a resume by the checkpoint": the consecutive count
    too, so the limit fires at the step it would have fired at without the interruption."""
    kw = dict(batch_size=4, loss_fn=_nan_loss, checkpoint_dir=tmp_path, progress=False)
    history = T.fit(_linear(), optax.sgd(0.1), DATA, steps=3, max_skipped_steps=None, **kw)
    assert history.train[-1]["skipped"] == 3
    with pytest.raises(FloatingPointError) as e:
        T.fit(_linear(), optax.sgd(0.1), DATA, steps=12, max_skipped_steps=5, **kw)
    assert str(e.value) == (
        "jdeq.train.fit: 5 consecutive steps were skipped (steps 1..5) because the loss, the gradients or the "
        "updated parameters/optimizer state were non-finite (NaN/inf). The model keeps its last finite "
        "parameters. Lower the learning rate, check the data and the DEQ's stats (`nonfinite`), or raise "
        "`max_skipped_steps`.")


# ---- restore_checkpoint(step=k): "a given step to read instead (nothing is moved; a bad one raises)" --


def test_restore_a_given_step_and_a_bad_given_step_raises(tmp_path):
    for step in (1, 2, 3):
        assert T.save_checkpoint(tmp_path, step, {"w": jnp.full(3, float(step))}, meta={"at": step})
    like = {"w": jnp.zeros(3)}
    ckpt = T.restore_checkpoint(tmp_path, like, step=2)
    assert ckpt.step == 2 and ckpt.meta["at"] == 2
    np.testing.assert_array_equal(ckpt.tree["w"], 2.0)
    assert T.restore_checkpoint(tmp_path, like).step == 3
    with pytest.raises(FileNotFoundError):
        T.restore_checkpoint(tmp_path, like, step=5)
    marker = next((tmp_path / "2").rglob("commit_success.txt"))
    marker.unlink()  # step 2 now looks unfinished
    with pytest.raises(T.CheckpointError):
        T.restore_checkpoint(tmp_path, like, step=2)
    assert T.checkpoint_steps(tmp_path) == [1, 2, 3]  # nothing moved
    assert not (tmp_path / "corrupt").exists()


# ---- the default loss's metrics, as documented -------------------------------------------------


def test_classification_loss_metrics_as_documented():
    """Accuracy per row of the logits; the solver's stats as batch means, the residuals over
    the finite examples only (example 2 has a NaN residual: counted by `nonfinite` instead)."""
    import jdeq

    logits = jnp.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    stats = jdeq.SolverStats(
        nsteps=jnp.array([3, 5, 30, 2], jnp.int32),
        abs_residual=jnp.array([1e-3, 3e-3, jnp.nan, 2e-3]),
        rel_residual=jnp.array([1e-4, 2e-4, 6e-4, jnp.inf]),
        converged=jnp.array([True, True, False, False]),
        nonfinite=jnp.array([False, False, True, True]),
    )
    loss, m = T.classification_loss(lambda x: (x, stats), {"inputs": logits, "labels": jnp.array([1, 0, 2, 1])})
    assert sorted(m) == ["abs_residual", "accuracy", "converged", "loss", "nonfinite", "nsteps", "rel_residual"]
    np.testing.assert_allclose(m["accuracy"], 0.75)  # argmax per row: 1, 0, 2, 0
    np.testing.assert_allclose(m["loss"], optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.array([1, 0, 2, 1])).mean())
    np.testing.assert_allclose(m["nsteps"], 10.0)
    np.testing.assert_allclose(m["abs_residual"], 2e-3, rtol=1e-6)  # (1e-3 + 3e-3) / 2: both residuals finite
    np.testing.assert_allclose(m["rel_residual"], 1.5e-4, rtol=1e-6)
    np.testing.assert_allclose(m["converged"], 0.5)
    np.testing.assert_allclose(m["nonfinite"], 0.5)


def test_classification_loss_accuracy_over_the_last_axis_of_sequence_logits():
    logits = jnp.zeros((2, 3, 4)).at[:, :, 3].set(1.0)  # every position predicts class 3
    labels = jnp.array([[3, 3, 0], [3, 1, 3]])
    _, m = T.classification_loss(lambda x: x, {"inputs": logits, "labels": labels})
    np.testing.assert_allclose(m["accuracy"], 4 / 6)


def test_data_size_checks_and_their_messages():
    """data_size: every documented check, each message in full."""
    from jdeq.train.batches import data_size

    good = {"x": np.zeros((4, 2), np.float32), "y": np.arange(4)}
    assert data_size(good) == 4
    cases = [
        ([], TypeError, "`data` must be a non-empty mapping of arrays, got list."),
        ({}, TypeError, "`data` must be a non-empty mapping of arrays, got dict."),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3)}, ValueError,
         "the arrays of `data` must share a leading axis, got sizes {'x': 4, 'y': 3}."),
        ({"x": np.zeros((0, 2))}, ValueError, "`data` has no examples (leading size 0)."),
        ({"x": np.array(["a", "b"])}, TypeError, "`data['x']` must be real numbers (bool, int or float), got dtype <U1."),
        ({"x": np.array([1.0, np.nan])}, ValueError,
         "`data['x']` has 1 non-finite value (NaN/inf); clean or drop those examples."),
        ({"x": np.array([np.inf, np.nan])}, ValueError,
         "`data['x']` has 2 non-finite values (NaN/inf); clean or drop those examples."),
    ]
    for data, exc, message in cases:
        with pytest.raises(exc) as e:
            data_size(data)
        assert str(e.value) == message
    assert data_size({"x": np.array([0, 1, 2]), "ok": np.array([True, False, True])}) == 3  # ints and bools pass


def test_data_size_of_predict_inputs_an_array_a_mapping_or_a_pytree():
    """inputs_size (predict's check): an array, a mapping or any pytree of arrays, each leaf
    checked as data_size checks a mapping (named by its path)."""
    from jdeq.train.batches import inputs_size

    a, b = np.zeros((4, 3), np.float32), np.ones((4,), np.int32)
    assert inputs_size(a) == 4
    assert inputs_size({"x": a, "m": b}) == 4
    assert inputs_size((a, [b])) == 4
    with pytest.raises(ValueError) as e:
        inputs_size((a, np.zeros((5, 2))))
    assert str(e.value) == "the arrays of `inputs` must share a leading axis, got sizes {'[0]': 4, '[1]': 5}."
    with pytest.raises(ValueError) as e:
        inputs_size(np.array([1.0, np.nan]))
    assert str(e.value) == "`inputs` has 1 non-finite value (NaN/inf); clean or drop those examples."
    for empty in (None, {}, ()):
        with pytest.raises(TypeError) as e:
            inputs_size(empty)
        assert str(e.value) == f"`inputs` must be an array or a non-empty mapping of arrays, got {empty!r}."


def test_run_options_messages_name_the_argument():
    from jdeq.train.batches import check_run_options

    with pytest.raises(ValueError) as e:
        check_run_options(0, {})
    assert str(e.value) == "`batch_size` must be an int >= 1, got 0."
    with pytest.raises(TypeError) as e:
        check_run_options(8, {}, loss_fn="mse")
    assert str(e.value) == "`loss_fn` must be callable as loss_fn(model, batch), got 'mse'."
    with pytest.raises(ValueError, match="`maxiter`"):
        check_run_options(8, {"maxiter": 0})
    check_run_options(8, {"maxiter": 3}, loss_fn=lambda m, b: 0.0)  # good options pass


def test_fit_progress_bar_counts_the_steps(capsys):
    """``progress=True``: a tqdm bar over the run's steps, on stderr."""
    T.fit(_linear(), optax.sgd(0.1), DATA, steps=3, batch_size=8, log_every=3, progress=True)
    err = capsys.readouterr().err
    assert "train" in err and "3/3" in err, err[-500:]


def test_save_checkpoint_names_a_bad_leaf(tmp_path):
    with pytest.raises(TypeError) as e:
        T.save_checkpoint(tmp_path / "ck", 1, {"w": np.zeros(2), "note": "text"})
    assert str(e.value) == "`tree` must be a pytree of arrays, got a leaf of type str."
    assert not (tmp_path / "ck").exists() or T.checkpoint_steps(tmp_path / "ck") == []  # nothing written


def test_checkpoint_quarantine_never_overwrites_an_earlier_one(tmp_path):
    """Each bad checkpoint moved to ``corrupt/`` gets a name of its own, also when an earlier
    one's name is taken out of order (here ``3-1`` is there and ``3-0`` was deleted): no
    quarantined copy is ever replaced."""
    tree = {"w": np.arange(4, dtype=np.float32)}
    like = {"w": np.zeros(4, np.float32)}
    (tmp_path / "corrupt" / "3-1").mkdir(parents=True)
    (tmp_path / "corrupt" / "3-1" / "leftover").write_text("kept")
    names = []
    for attempt in range(2):
        assert T.save_checkpoint(tmp_path, 2, tree) or attempt  # step 2 is the good fallback
        assert T.save_checkpoint(tmp_path, 3, tree)
        (tmp_path / "3" / "meta" / "metadata").write_text("{")
        with pytest.warns(RuntimeWarning, match="checkpoint of step 3 is corrupt"):
            assert T.restore_checkpoint(tmp_path, like).step == 2
        names.append(sorted(p.name for p in (tmp_path / "corrupt").iterdir()))
    # "<step>-<k>": k the number of copies there, or the next name free after it
    assert names == [["3-1", "3-2"], ["3-1", "3-2", "3-3"]], names
    assert (tmp_path / "corrupt" / "3-1" / "leftover").read_text() == "kept"


def test_checkpoint_verdicts_name_their_reason_and_the_quarantined_path(tmp_path):
    """The reason each bad checkpoint is refused, in full: no commit marker (an unfinished
    write), a meta file that does not parse (the reader's exception type and message), an array
    that fails its checksum (its index); and the warning names where the bad one went."""
    import json
    import os

    tree = {"a": jnp.arange(4.0), "b": jnp.ones((2, 3))}
    like = jax.tree.map(jnp.zeros_like, tree)
    for step in (1, 2, 3, 4):
        T.save_checkpoint(tmp_path, step, tree, keep=4)
    os.remove(tmp_path / "4" / "commit_success.txt")
    with pytest.raises(T.CheckpointError) as e:
        T.restore_checkpoint(tmp_path, like, step=4)
    assert str(e.value) == "no commit marker commit_success.txt (unfinished write)"
    (tmp_path / "3" / "meta" / "metadata").write_text("{")
    with pytest.raises(T.CheckpointError) as e:
        T.restore_checkpoint(tmp_path, like, step=3)
    cause = e.value.__cause__
    assert cause is not None and str(e.value) == f"unreadable meta ({type(cause).__name__}: {cause})"
    record = json.loads((tmp_path / "2" / "meta" / "metadata").read_text())
    assert record["step"] == 2 and record["meta"] == {} and len(record["leaves"]) == 2  # the JSON record
    record["leaves"][1]["crc32"] ^= 1  # array 1 ("b") no longer matches its checksum
    (tmp_path / "2" / "meta" / "metadata").write_text(json.dumps(record))
    with pytest.raises(T.CheckpointError) as e:
        T.restore_checkpoint(tmp_path, like, step=2)
    assert str(e.value) == "checksum mismatch in array 1 of 2"
    with pytest.warns(RuntimeWarning) as caught:
        assert T.restore_checkpoint(tmp_path, like).step == 1
    moved = [str(w.message) for w in caught]
    # newest first; each named "<step>-<k>", k the number of copies already there
    for k, (step, reason) in enumerate(((4, "no commit marker"), (3, "unreadable meta"),
                                        (2, "checksum mismatch in array 1 of 2"))):
        dest = os.path.join(str(tmp_path), "corrupt", f"{step}-{k}")
        assert any(f"the checkpoint of step {step} is corrupt ({reason}" in m and f"moved to {dest!r}" in m
                   for m in moved), (step, moved)
        assert os.path.isdir(dest)


def test_checkpoint_restores_into_the_layout_of_like(tmp_path):
    """The restored arrays are jax arrays laid out as ``like``'s leaves (arrays or
    ShapeDtypeStructs with a sharding), whatever the layout they were saved from."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = T.data_mesh()
    whole, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tree = {"a": jnp.arange(4.0), "b": jnp.arange(6.0).reshape(2, 3)}
    T.save_checkpoint(tmp_path, 1, tree)
    like = {"a": jax.device_put(jnp.zeros(4), whole), "b": jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=split)}
    got = T.restore_checkpoint(tmp_path, like).tree
    assert isinstance(got["a"], jax.Array) and isinstance(got["b"], jax.Array)
    assert got["a"].sharding == whole and got["b"].sharding == split
    for k in tree:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(tree[k]))


def test_checkpoint_of_the_older_format_keeps_its_meta(tmp_path):
    """A checkpoint written by fit before save_checkpoint existed (jdeq at 58168c6^: the
    history at the top level of the JSON record, beside "step" and "leaves") restores, its meta
    being that record without those two keys."""
    import orbax.checkpoint as ocp

    from jdeq.train._checksum import fingerprint

    leaves = [jnp.arange(3.0)]
    old = {"train": [{"step": 4, "loss": 0.5}], "eval": [], "elapsed": 1.5, "skips": {"count": 0}, "step": 4,
           "leaves": fingerprint(leaves)}
    manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave({"leaves": leaves}), meta=ocp.args.JsonSave(old)))
    manager.wait_until_finished()
    got = T.restore_checkpoint(tmp_path, [jnp.zeros(3)])
    assert got.step == 4 and got.meta == {"train": [{"step": 4, "loss": 0.5}], "eval": [], "elapsed": 1.5,
                                          "skips": {"count": 0}}
    np.testing.assert_array_equal(np.asarray(got.tree[0]), [0.0, 1.0, 2.0])


def test_checkpoint_found_bad_on_another_process_is_rejected_here_too(tmp_path, monkeypatch):
    """The processes agree on each verdict: a checkpoint this process reads fine but another
    found bad is rejected here as well, with that reason (the other process's side of
    tests/test_multiprocess.py, simulated by the agreement saying no for step 3)."""
    from jdeq.train import checkpoint

    tree = {"w": np.arange(4, dtype=np.float32)}
    for step in (2, 3):
        T.save_checkpoint(tmp_path, step, tree)
    calls = []

    def agree(ok):  # the first verdict asked for (step 3, the newest) is "bad elsewhere"
        calls.append(ok)
        return ok and len(calls) > 1

    monkeypatch.setattr(checkpoint, "_agree", agree)
    with pytest.warns(RuntimeWarning) as caught:
        got = T.restore_checkpoint(tmp_path, {"w": np.zeros(4, np.float32)})
    assert got.step == 2 and calls[0] is True  # this process had found step 3 good
    assert any("checkpoint of step 3 is corrupt (found bad on another process)" in str(w.message) for w in caught)


def test_loss_metrics_average_the_residuals_over_the_finite_examples_only():
    """solver_metrics (the solver columns of every loss's metrics): residual means over the
    finite examples, whatever their number (one here), and 0 when there is none."""
    import jdeq

    def stats(abs_res, rel_res):
        n = len(abs_res)
        bad = ~(np.isfinite(abs_res) & np.isfinite(rel_res))
        return jdeq.SolverStats(nsteps=jnp.full((n,), 3, jnp.int32), abs_residual=jnp.asarray(abs_res),
                                rel_residual=jnp.asarray(rel_res), converged=jnp.asarray(~bad),
                                nonfinite=jnp.asarray(bad), trace=None)

    m = T.solver_metrics(stats(np.array([0.5, np.nan, np.inf, 2.0]), np.array([0.1, np.nan, 0.3, np.nan])))
    np.testing.assert_allclose(m["abs_residual"], 0.5)  # only example 0 is finite in both
    np.testing.assert_allclose(m["rel_residual"], 0.1)
    np.testing.assert_allclose(m["nonfinite"], 0.75)
    np.testing.assert_allclose(m["nsteps"], 3.0)
    none = T.solver_metrics(stats(np.array([np.nan, np.nan]), np.array([np.nan, np.nan])))
    assert float(none["abs_residual"]) == 0.0 and float(none["nonfinite"]) == 1.0
    assert T.solver_metrics(None) == {}


def test_fit_names_a_bad_eval_set_and_restore_needs_its_step(tmp_path):
    """fit checks each eval set as data is checked, naming it; restore_checkpoint(step=k) of a
    directory with no checkpoint is an error (step=None: nothing to restore, None)."""
    bad_eval = {"valid": {"inputs": X[:5], "labels": DATA["labels"][:4]}}
    with pytest.raises(ValueError) as e:
        T.fit(_linear(), optax.sgd(0.1), DATA, steps=1, batch_size=8, eval_data=bad_eval, progress=False)
    assert str(e.value) == "the arrays of `eval_data['valid']` must share a leading axis, got sizes {'inputs': 5, 'labels': 4}."
    like = {"w": np.zeros(2, np.float32)}
    root = tmp_path
    assert T.restore_checkpoint(root / "none", like) is None
    assert not (root / "none").exists()  # reading creates nothing
    with pytest.raises(FileNotFoundError, match="`step`=3"):
        T.restore_checkpoint(root / "other", like, step=3)


def test_classification_loss_names_the_missing_keys_and_count_params_counts_params():
    with pytest.raises(ValueError) as e:
        T.classification_loss(lambda x: x, {"x": X, "labels": DATA["labels"]})
    assert str(e.value) == "classification_loss needs the keys 'inputs' and 'labels' in each batch, got ['labels', 'x']."
    assert T.count_params(nnx.Linear(4, 3, rngs=nnx.Rngs(0))) == 4 * 3 + 3
    # scale and bias only: the running mean and variance (nnx.BatchStat) are not trained
    assert T.count_params(nnx.BatchNorm(5, rngs=nnx.Rngs(0))) == 5 + 5
    with pytest.raises(ValueError) as e:
        T.classification_loss(lambda x: x[:, :3], {"inputs": X[:5], "labels": DATA["labels"][:4]})
    assert str(e.value) == "`labels` must have shape (5,) (one class id per row of the logits (5, 3)), got (4,)."


def test_batch_indices_messages_name_each_argument():
    cases = [
        (dict(n=0, batch_size=1, step=0), "`n` must be an int >= 1, got 0."),
        (dict(n=8, batch_size=4, step=-1), "`step` must be an int >= 0, got -1."),
        (dict(n=8, batch_size=4, step=0, seed=-2), "`seed` must be an int >= 0, got -2."),
        (dict(n=8, batch_size=9, step=0), "`batch_size` must be an int in [1, 8], got 9."),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError) as e:
            T.batch_indices(**kw)
        assert str(e.value) == message


@pytest.mark.parametrize("option", ["eval_every", "checkpoint_every", "max_skipped_steps"])
def test_fit_names_a_bad_period_or_limit(option, tmp_path):
    with pytest.raises(ValueError) as e:
        T.fit(_linear(), optax.sgd(0.1), DATA, steps=1, batch_size=8, progress=False, checkpoint_dir=tmp_path,
              **{option: 0})
    assert str(e.value) == f"`{option}` must be None or an int >= 1, got 0."


def test_checkpoint_messages_name_the_directory_and_keep(tmp_path):
    tree = {"w": np.arange(4, dtype=np.float32)}
    T.save_checkpoint(tmp_path, 1, tree)
    with pytest.raises(ValueError) as e:
        T.restore_checkpoint(tmp_path, {"w": np.zeros(3, np.float32)})
    assert str(e.value) == (
        f"`directory` (fit's `checkpoint_dir`) {str(tmp_path)!r} holds, at step 1, the state of another model or "
        "optimizer (1 arrays of other shapes/dtypes than the 1 of this one): use another directory for this run.")
    with pytest.raises(ValueError) as e:
        T.save_checkpoint(tmp_path, 2, tree, keep=0)
    assert str(e.value) == "`keep` must be an int >= 1, got 0."


# ---- jdeq.train.jacobian: which layers count, the Bernoulli draw, the term's dtype ----------


def _recorded_layer():
    layer = _Equilibrium()
    layer.v, layer.w = nnx.Param(jnp.ones((), jnp.float32)), nnx.Param(jnp.ones((), jnp.float32))
    layer.record_equilibria = True
    layer(jnp.ones((2, 3), jnp.float32))  # sows one (x, z*) record
    return layer


def test_jac_reg_penalty_draws_with_prob_and_keeps_the_states_dtype(x64):
    """prob=1 applies the term at every step, prob=0.1 at about a tenth of them; the term has the
    recorded states' dtype (float32 here, with x64 on: nothing defaults to float64), on both
    sides of the draw; a layer that solved nothing in this pass adds nothing and is no error."""
    from jdeq.train import jacobian as J

    for i in range(16):  # a draw at another probability would skip some of 16 keys
        got = J.penalty(T.JacReg(gamma=0.5), [_recorded_layer(), _Equilibrium()], jax.random.key(i))
        assert got.dtype == jnp.float32 and float(got) == pytest.approx(0.5)
    drawn = [J.penalty(T.JacReg(gamma=0.5, prob=0.1), [_recorded_layer()], jax.random.key(i)) for i in range(64)]
    assert all(d.dtype == jnp.float32 for d in drawn) and {float(d) for d in drawn} == {0.0, 0.5}
    applied = sum(float(d) > 0 for d in drawn)  # Binomial(64, 0.1): 6.4 expected; 32 at prob 0.5
    assert 1 <= applied <= 16, applied
    with pytest.raises(ValueError) as e:
        J.penalty(T.JacReg(gamma=0.5), [_Equilibrium()], jax.random.key(0))
    assert str(e.value) == ("`jac_reg` is set but the model's forward pass solved no equilibrium layer "
                            "(jdeq.nnx.DEQ, jdeq.models.MonDEQ, ...).")


def test_jac_reg_find_deqs_needs_both_members():
    """An equilibrium layer has ``record_equilibria`` and a callable ``jacobian_penalty``: a
    module with only one of the two is not one (and is no error)."""
    from jdeq.train import jacobian as J

    class OnlyFlag(nnx.Module):
        def __init__(self):
            self.record_equilibria = False

    class OnlyPenalty(nnx.Module):
        def jacobian_penalty(self, *a, **k):
            return 0.0

    class Model(nnx.Module):
        def __init__(self):
            self.a, self.b, self.eq = OnlyFlag(), OnlyPenalty(), _Equilibrium()

    model = Model()
    assert J.find_deqs(model) == [model.eq]


def _at_callers_line(filename: str) -> bool:
    """Whether a warning is attributed to this file. Under mutation testing (.ci/mutation.py)
    mutmut's trampoline, outside jdeq, calls each function of the mutated module: there the
    first caller outside jdeq is that trampoline."""
    import sys

    trampoline = sys.modules.get("mutmut.mutation.trampoline")
    return filename == __file__ or (trampoline is not None and filename == trampoline.__file__)


def test_checkpoint_warnings_and_errors_in_full_at_the_callers_line(tmp_path):
    """Each checkpoint warning, in full, is attributed to the line that called jdeq (here this
    file), whether through restore_checkpoint, checkpoint_steps or fit; the errors name the
    directory and the argument's type; a read never creates a directory."""
    import os

    tree, like = {"w": jnp.arange(3.0)}, {"w": jnp.zeros(3)}
    d = str(tmp_path / "ck")
    missing = tmp_path / "missing"
    assert T.restore_checkpoint(missing, like) is None and T.checkpoint_steps(missing) == []
    assert not missing.exists()
    T.save_checkpoint(d, 2, tree)
    T.save_checkpoint(d, 5, tree)
    os.replace(os.path.join(d, "5"), os.path.join(d, "5.orbax-checkpoint-tmp-123"))
    with pytest.warns(RuntimeWarning) as caught:
        assert T.checkpoint_steps(d) == [2]
    assert [str(w.message) for w in caught] == [
        f"checkpoint directory {d!r}: ignoring the unfinished checkpoint of step 5 (5.orbax-checkpoint-tmp-123; "
        "the run was stopped while saving it); it is removed and the previous checkpoint is used."]
    assert _at_callers_line(caught[0].filename)
    with pytest.raises(FileNotFoundError) as e:
        T.restore_checkpoint(d, like, step=3)
    assert str(e.value) == f"`step`=3 is not a checkpoint of {d!r} (steps [2])."
    (tmp_path / "ck" / "2" / "meta" / "metadata").write_text("{")
    with pytest.warns(RuntimeWarning) as caught:
        assert T.restore_checkpoint(d, like) is None
    assert len(caught) == 2 and all(_at_callers_line(w.filename) for w in caught)
    first, last = (str(w.message) for w in caught)
    assert first.startswith(f"checkpoint directory {d!r}: the checkpoint of step 2 is corrupt (unreadable meta (")
    assert first.endswith(f"); moved to {os.path.join(d, 'corrupt', '2-0')!r}, trying the previous one.")
    assert last == (f"checkpoint directory {d!r}: no usable checkpoint (steps [2] were corrupt): training "
                    "starts again from step 0.")
    # through fit: still this file's line
    T.save_checkpoint(d, 4, [np.zeros(1)])
    (tmp_path / "ck" / "4" / "meta" / "metadata").write_text("{")
    data = {"inputs": np.ones((4, 2), np.float32), "labels": np.zeros(4, np.int32)}
    with pytest.warns(RuntimeWarning) as caught:
        T.fit(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), optax.sgd(0.1), data, steps=1, batch_size=2, progress=False,
              checkpoint_dir=d)
    assert len(caught) == 2 and all(_at_callers_line(w.filename) for w in caught), [(w.filename, str(w.message)) for w in caught]
    for bad, kind in ((3, "int"), (None, "NoneType")):
        with pytest.raises(TypeError) as e:
            T.save_checkpoint(bad, 1, tree)
        assert str(e.value) == f"`directory` must be a path (str or os.PathLike), got {kind}."
    with pytest.raises(TypeError) as e:
        T.save_checkpoint(d, 7, tree, meta=[1])
    assert str(e.value) == "`meta` must be None or a dict, got list."
    for call, bad in ((lambda: T.save_checkpoint(d, -1, tree), -1), (lambda: T.restore_checkpoint(d, like, step=1.5), 1.5)):
        with pytest.raises((TypeError, ValueError)) as e:
            call()
        assert str(e.value) == f"`step` must be an int >= 0, got {bad}."
