"""Multiscale DEQ (Bai et al. 2020): shapes per scale, convergence at init, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdeq
from jdeq.models import MDEQCell, MDEQClassifier
from jdeq.models.mdeq import scale_shapes


def test_scale_shapes():
    assert scale_shapes((8, 8), 3) == [(8, 8), (4, 4), (2, 2)]
    assert scale_shapes((40,), 3) == [(40,), (20,), (10,)]
    assert scale_shapes((7, 5), 3) == [(7, 5), (4, 3), (2, 2)]


@pytest.mark.parametrize("nd,spatial", [(2, (7, 5)), (1, (12,))])
def test_state_shapes_per_scale_and_convergence_at_init(nd, spatial):
    widths = (4, 4, 4)  # equal widths: fewer distinct kernel shapes to compile at init
    model = MDEQClassifier(1, 10, widths=widths, spatial_dims=nd,
                           solver=jdeq.Anderson(tol=1e-4, maxiter=40), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, *spatial, 1))

    z, stats = nnx.jit(lambda model, x: model.features(x))(model, x)
    want = [(3, *s, w) for s, w in zip(scale_shapes(spatial, 3), widths)]
    assert [a.shape for a in z] == want
    assert nnx.eval_shape(lambda model, x: model(x)[0], model, x).shape == (3, 10)
    assert bool(stats.converged.all()), stats.rel_residual
    assert all(bool(jnp.isfinite(a).all()) for a in z)


def test_cell_fixed_point_of_all_scales():
    cell = MDEQCell((4, 4), rngs=nnx.Rngs(1))
    x = (jax.random.normal(jax.random.key(0), (2, 6, 6, 4)), jax.random.normal(jax.random.key(1), (2, 3, 3, 4)))
    solve = jax.jit(lambda x, cell: jdeq.fixed_point(lambda z, a: a[0](z, a[1]), cell.init_z(x), (cell, x),
                                                     solver=jdeq.Anderson(tol=1e-5, maxiter=60)))
    sol = solve(x, cell)
    assert bool(sol.stats.converged.all())
    fz = cell(sol.value, x)
    for a, b in zip(fz, sol.value):
        np.testing.assert_allclose(a, b, atol=1e-3)


def test_errors():
    with pytest.raises(ValueError, match="`widths`"):
        MDEQCell((), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`spatial_dims`"):
        MDEQCell((4,), spatial_dims=4, rngs=nnx.Rngs(0))
    cell = MDEQCell((4, 8), rngs=nnx.Rngs(0))
    x = (jnp.ones((1, 4, 4, 4)), jnp.ones((1, 2, 2, 8)))
    with pytest.raises(ValueError, match="`z` must hold 2"):
        cell(x[:1], x)
    with pytest.raises(ValueError, match="`x` must hold 2"):
        cell(x, x[:1])
    with pytest.raises(ValueError, match="`maxiter`"):
        MDEQClassifier(1, 10, widths=(4,), depth=2, rngs=nnx.Rngs(0))(jnp.ones((1, 4, 4, 1)), maxiter=3)


@pytest.mark.parametrize("depth", [None, 4])
def test_trains_and_reduces_loss(depth):
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (16, 6, 6, 1))
    y = jax.random.randint(k2, (16,), 0, 3)
    model = MDEQClassifier(1, 3, widths=(4, 4), depth=depth, solver=jdeq.Anderson(tol=1e-3, maxiter=15),
                           rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(model):
            logits, _ = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(10)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0]
