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
from jdeq.nnx import variable_value

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
            records = tuple(variable_value(previous)) if previous is not None else ()
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
    with pytest.raises(FloatingPointError, match=r"5 consecutive steps were skipped \(steps 1\.\.5\)"):
        T.fit(_linear(), optax.sgd(0.1), DATA, steps=12, max_skipped_steps=5, **kw)


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
