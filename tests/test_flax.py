"""Flax adapters: jdeq.nnx.DEQ / Unrolled and jdeq.linen.DEQ / Unrolled."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdeq

IN, WIDTH, BATCH = 3, 16, 8


def _data(n=BATCH, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (n, IN))
    y = jnp.sin(2.0 * x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]
    return x, y


class Regressor(nnx.Module):
    def __init__(self, layer_fn, rngs):
        self.body = layer_fn(jdeq.models.MLPCell(IN, WIDTH, rngs=rngs))
        self.head = nnx.Linear(WIDTH, 1, rngs=rngs)

    def __call__(self, x, **kw):
        z, stats = self.body(x, **kw)
        return self.head(z), stats


def _nnx_train(layer_fn, steps=50):
    x, y = _data(32)
    model = Regressor(layer_fn, nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(model):
            pred, _ = model(x)
            return jnp.mean((pred - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(steps)]
    return losses


@pytest.mark.parametrize(
    "layer_fn",
    [
        lambda c: jdeq.nnx.DEQ(c, solver=jdeq.Anderson(tol=1e-5)),
        lambda c: jdeq.nnx.DEQ(c, solver=jdeq.Broyden(tol=1e-5), gradient=jdeq.Phantom(steps=5)),
        lambda c: jdeq.nnx.Unrolled(c, depth=6),
    ],
    ids=["deq-implicit", "deq-phantom", "unrolled"],
)
def test_nnx_training_reduces_loss(layer_fn):
    losses = _nnx_train(layer_fn)
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_nnx_params_receive_gradients_matching_unrolled_autodiff(x64):
    """The adapter passes parameters as arguments: Implicit grads equal backprop through a long
    unrolled solve, for every parameter of the cell."""
    x, y = _data()
    cell = jdeq.models.MLPCell(IN, WIDTH, dtype=jnp.float64, rngs=nnx.Rngs(1))
    tight = jdeq.FixedPointIteration(tol=1e-13, maxiter=200, stop_mode="abs")

    def loss(cell, gradient):
        deq = jdeq.nnx.DEQ(cell, solver=tight, gradient=gradient)
        z, _ = deq(x.astype(jnp.float64))
        return jnp.sum((z[:, :1] - y) ** 2)

    g_imp = nnx.grad(loss)(cell, jdeq.Implicit())
    g_unr = nnx.grad(loss)(cell, jdeq.Unrolled())
    leaves_imp = jax.tree_util.tree_leaves(nnx.state(g_imp))
    leaves_unr = jax.tree_util.tree_leaves(nnx.state(g_unr))
    assert len(leaves_imp) == 3  # W, U kernel, U bias
    for a, b in zip(leaves_imp, leaves_unr):
        assert float(jnp.abs(a).max()) > 0
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-10)


def test_nnx_deq_matches_deep_unrolled():
    x, _ = _data()
    cell = jdeq.models.MLPCell(IN, WIDTH, rngs=nnx.Rngs(2))
    z_deq, stats = jdeq.nnx.DEQ(cell, solver=jdeq.Anderson(tol=1e-6, stop_mode="abs"))(x)
    z_unr, ustats = jdeq.nnx.Unrolled(cell, depth=200)(x)
    assert bool(stats.converged.all())
    np.testing.assert_allclose(z_deq, z_unr, atol=1e-5)
    assert isinstance(ustats, jdeq.SolverStats) and isinstance(stats, jdeq.SolverStats)
    np.testing.assert_array_equal(ustats.nsteps, 200)
    assert float(ustats.abs_residual.max()) < 1e-5


def test_nnx_runtime_maxiter_does_not_recompile():
    x, _ = _data()
    deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(IN, WIDTH, rngs=nnx.Rngs(3)), solver=jdeq.Anderson(tol=1e-5, stop_mode="abs"))
    traces = []

    @nnx.jit
    def run(deq, x, maxiter):
        traces.append(1)
        return deq(x, maxiter=maxiter)[1]

    s2 = run(deq, x, jnp.asarray(2))
    s50 = run(deq, x, jnp.asarray(50))
    assert len(traces) == 1
    assert int(s2.nsteps.max()) == 2 and not bool(s2.converged.any())
    assert bool(s50.converged.all()) and int(s50.nsteps.max()) > 2


def test_explicit_z0_and_missing_init_z():
    class NoInit(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

        def __call__(self, z, x):
            return 0.5 * jnp.tanh(self.lin(z)) + x

    x = jnp.ones((BATCH, WIDTH))
    deq = jdeq.nnx.DEQ(NoInit(nnx.Rngs(0)))
    with pytest.raises(TypeError) as e:
        deq(x)
    assert str(e.value) == (
        "`z0` is None and the cell NoInit has no `init_z(x)` method: pass `z0` explicitly or give the "
        "cell an `init_z(x)` that returns the starting state.")
    z, stats = deq(x, jnp.zeros((BATCH, WIDTH)))
    assert z.shape == (BATCH, WIDTH) and bool(stats.converged.all())
    with pytest.raises(TypeError, match="init_z"):
        jdeq.nnx.Unrolled(NoInit(nnx.Rngs(0)), depth=2)(x)


def _copy_nnx_to_linen(cell):
    return {
        "params": {
            "cell": {
                "w": {"kernel": cell.w.kernel[...]},
                "u": {"kernel": cell.u.kernel[...], "bias": cell.u.bias[...]},
            }
        }
    }


def test_linen_matches_nnx_with_same_weights():
    x, _ = _data()
    cell = jdeq.models.MLPCell(IN, WIDTH, rngs=nnx.Rngs(4))
    solver = jdeq.Anderson(tol=1e-6)
    z_nnx, _ = jdeq.nnx.DEQ(cell, solver=solver)(x)
    deq = jdeq.linen.DEQ(cell=jdeq.models.linen.MLPCell(features=WIDTH), solver=solver)
    variables = deq.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(_copy_nnx_to_linen(cell))
    z_lin, stats = deq.apply(_copy_nnx_to_linen(cell), x)
    assert isinstance(stats, jdeq.SolverStats)
    np.testing.assert_allclose(z_lin, z_nnx, atol=1e-6)
    # and the same through the unrolled baseline
    un = jdeq.linen.Unrolled(cell=jdeq.models.linen.MLPCell(features=WIDTH), depth=5)
    z_un, ustats = un.apply(_copy_nnx_to_linen(cell), x)
    z_un_nnx, _ = jdeq.nnx.Unrolled(cell, depth=5)(x)
    np.testing.assert_allclose(z_un, z_un_nnx, atol=1e-6)
    np.testing.assert_array_equal(ustats.nsteps, 5)


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("kind", ["deq", "unrolled"])
def test_linen_training_reduces_loss(kind, remat):
    x, y = _data(32)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            cell = jdeq.models.linen.MLPCell(features=WIDTH)
            if kind == "deq":
                body = jdeq.linen.DEQ(cell=cell, solver=jdeq.Anderson(tol=1e-5))
            else:
                body = jdeq.linen.Unrolled(cell=cell, depth=6, remat=remat)
            z, _ = body(x)
            return nn.Dense(1)(z)

    model = Model()
    params = model.init(jax.random.PRNGKey(0), x)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, g = jax.value_and_grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)
        updates, opt_state = opt.update(g, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss, g

    params, opt_state, loss0, g = step(params, opt_state)
    cell_grads = g["params"]["MLPCell_0"]  # a cell built in the parent's compact is its child
    assert all(float(jnp.abs(v).sum()) > 0 for v in jax.tree_util.tree_leaves(cell_grads))
    for _ in range(49):
        params, opt_state, loss, _ = step(params, opt_state)
    assert float(loss) < 0.3 * float(loss0)


def test_linen_runtime_maxiter():
    x, _ = _data()
    deq = jdeq.linen.DEQ(cell=jdeq.models.linen.MLPCell(features=WIDTH), solver=jdeq.Anderson(tol=1e-5, stop_mode="abs"))
    variables = deq.init(jax.random.PRNGKey(0), x)
    run = jax.jit(lambda v, m: deq.apply(v, x, maxiter=m)[1])
    assert int(run(variables, 3).nsteps.max()) == 3
    assert bool(run(variables, 60).converged.all())
    assert run._cache_size() == 1

