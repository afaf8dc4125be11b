"""Unrolled pre-training: ``jdeq.nnx.DEQ.unrolled_depth`` and ``fit(..., pretrain=Pretrain(...))``.

The references are independent of the code under test: ``jdeq.nnx.Unrolled`` (the explicit
weight-tied net) for the layer, and a loop of the public step over two loss functions (the
unrolled net, then the DEQ) for ``fit``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdeq
from jdeq import train as T


class _Net(nnx.Module):
    """MLP-cell DEQ + head; ``depth=L`` runs the same cell as ``jdeq.nnx.Unrolled`` instead."""

    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(4, 8, w_scale=0.9, rngs=rngs),
                                solver=jdeq.FixedPointIteration(tol=1e-4, maxiter=30), gradient=jdeq.Implicit())
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x, depth=None):
        if depth is None:
            z, stats = self.deq(x)
        else:
            z, stats = jdeq.nnx.Unrolled(self.deq.cell, depth=depth)(x)
        return self.head(z), stats


@pytest.fixture(scope="module")
def data(vec_data):
    return vec_data


def _params(model):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))]


def _loss(model, batch, depth=None):
    logits, _ = model(batch["inputs"], depth=depth)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return loss, {"loss": loss}


def test_unrolled_depth_is_the_weight_tied_net_in_value_and_gradient(data):
    """With ``unrolled_depth=L`` the layer equals ``jdeq.nnx.Unrolled(cell, depth=L)``: the same
    value (not the equilibrium: L=3 is far from it) and the same parameter gradient."""
    x = jnp.asarray(data["inputs"][:16])
    net = _Net()
    net.deq.unrolled_depth = 3

    def grads(depth):
        def f(model):
            logits, _ = model(x, depth=depth)
            return jnp.sum(jnp.sin(logits))
        return nnx.grad(f)(net)

    z3, stats = net.deq(x)
    ref, _ = jdeq.nnx.Unrolled(net.deq.cell, depth=3)(x)
    np.testing.assert_allclose(z3, ref, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(stats.nsteps) == 3) and not np.any(np.asarray(stats.converged))
    star, _ = jdeq.nnx.DEQ(net.deq.cell, solver=jdeq.FixedPointIteration(tol=1e-5, maxiter=200))(x)
    assert float(jnp.max(jnp.abs(z3 - star))) > 1e-2  # so the check above tells the two apart
    for a, b in zip(jax.tree_util.tree_leaves(grads(None)), jax.tree_util.tree_leaves(grads(3))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    net.deq.unrolled_depth = None  # back to the equilibrium
    z, _ = net.deq(x)
    np.testing.assert_allclose(z, jdeq.nnx.DEQ(net.deq.cell, solver=net.deq.solver)(x)[0], rtol=1e-6, atol=1e-6)


def test_fit_pretrains_then_solves_and_carries_the_optimizer_state(data):
    """``fit(pretrain=Pretrain(steps=2, depth=3), steps=5)`` = the public step on the unrolled
    loss for steps 0-1 and on the DEQ's loss for steps 2-4, one optimizer state throughout
    (a cosine schedule, so a restarted optimizer would differ)."""
    opt = optax.adam(optax.cosine_decay_schedule(3e-2, 5))
    kw = dict(steps=5, batch_size=32, seed=3)
    fitted = _Net()
    hist = T.fit(fitted, opt, data, pretrain=T.Pretrain(steps=2, depth=3), loss_fn=_loss, log_every=1,
                 progress=False, **kw)
    assert fitted.deq.unrolled_depth is None  # the user's model keeps its own setting

    model = _Net()
    state = T.TrainState.create(model, opt)
    steps = [jax.jit(T.make_train_step(functools.partial(_loss, depth=3), opt)),
             jax.jit(T.make_train_step(_loss, opt))]
    losses = []
    for k in range(kw["steps"]):
        idx = T.batch_indices(96, kw["batch_size"], k, seed=kw["seed"])
        state, metrics = steps[k >= 2](state, {name: v[idx] for name, v in data.items()})
        losses.append(float(metrics["loss"]))
    nnx.update(model, state.params)
    np.testing.assert_allclose([r["loss"] for r in hist.train], losses, rtol=1e-5)
    for a, b in zip(_params(fitted), _params(model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # and the phases differ: without pre-training the same run ends elsewhere
    plain = _Net()
    T.fit(plain, opt, data, loss_fn=_loss, progress=False, **kw)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(_params(plain), _params(fitted))) > 1e-3


def test_resume_inside_the_pretraining_phase_equals_uninterrupted(tmp_path, data):
    """A run stopped at step 1 (still unrolled) and resumed to step 4 ends as a run of 4."""
    opt, kw = optax.adam(1e-2), dict(batch_size=32, seed=2, pretrain=T.Pretrain(steps=2, depth=3), progress=False)
    whole = _Net()
    T.fit(whole, opt, data, steps=4, **kw)
    parts = _Net()
    T.fit(parts, opt, data, steps=1, checkpoint_dir=tmp_path / "ck", **kw)
    hist = T.fit(_Net(seed=7), opt, data, steps=4, checkpoint_dir=tmp_path / "ck", **kw)
    assert hist.resumed_from == 1
    resumed = _Net(seed=7)
    T.fit(resumed, opt, data, steps=4, checkpoint_dir=tmp_path / "ck", **kw)  # restores step 4: no step left
    for a, b in zip(_params(whole), _params(resumed)):
        np.testing.assert_array_equal(a, b)


def test_pretrain_on_a_mesh_runs_both_phases(data):
    """The sharded branch of fit compiles each phase with its own graph in the shardings."""
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    net = _Net()
    hist = T.fit(net, optax.adam(1e-2), data, steps=4, batch_size=32, mesh=mesh, log_every=1,
                 pretrain=T.Pretrain(steps=2, depth=3), progress=False)
    assert [r["nsteps"] for r in hist.train[:2]] == [3.0, 3.0] and hist.train[3]["nsteps"] != 3.0


class _RankFree(nnx.Module):
    """``tanh(W z + x)`` for one example or a batch (MLPCell insists on a batch axis)."""

    def __init__(self, rngs):
        self.w = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, z, x):
        return jnp.tanh(self.w(z) + x)

    def init_z(self, x):
        return jnp.zeros_like(x)


def test_unrolled_depth_under_vmap_of_per_example_code(data):
    """A per-example layer (``batched=False``) mapped with ``jax.vmap`` unrolls like the batched one."""
    x = jnp.asarray(data["inputs"][:8])
    cell = _RankFree(nnx.Rngs(0))
    one = jdeq.nnx.DEQ(cell, batched=False)
    one.unrolled_depth = 3
    graphdef, state = nnx.split(one)
    z, stats = jax.vmap(lambda xi: nnx.merge(graphdef, state)(xi))(x)
    ref, _ = jdeq.nnx.Unrolled(cell, depth=3)(x)
    np.testing.assert_allclose(z, ref, rtol=1e-6, atol=1e-6)
    assert stats.nsteps.shape == (8,) and np.all(np.asarray(stats.nsteps) == 3)
