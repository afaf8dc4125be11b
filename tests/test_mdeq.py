"""Multiscale DEQ (Bai et al. 2020): shapes per scale, convergence at init, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdeq
from jdeq.models import MDEQCell, MDEQClassifier
from jdeq.models import conv_general_dilated, conv_same, flip_transpose
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
    with pytest.raises(ValueError, match="`block`"):
        MDEQCell((4,), block="resnet", rngs=nnx.Rngs(0))
    cell = MDEQCell((4, 8), rngs=nnx.Rngs(0))
    x = (jnp.ones((1, 4, 4, 4)), jnp.ones((1, 2, 2, 8)))
    with pytest.raises(ValueError, match="`z` must hold 2"):
        cell(x[:1], x)
    with pytest.raises(ValueError, match="`x` must hold 2"):
        cell(x, x[:1])
    with pytest.raises(ValueError, match="`maxiter`"):
        MDEQClassifier(1, 10, widths=(4,), depth=2, rngs=nnx.Rngs(0))(jnp.ones((1, 4, 4, 1)), maxiter=3)


@pytest.mark.parametrize("depth", [None, 4])
def test_trains_and_reduces_loss(depth, adam_losses):
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (16, 6, 6, 1))
    y = jax.random.randint(k2, (16,), 0, 3)
    model = MDEQClassifier(1, 3, widths=(4, 4), depth=depth, solver=jdeq.Anderson(tol=1e-3, maxiter=15),
                           rngs=nnx.Rngs(0))
    losses = adam_losses(model, x, y, 10)
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0]


def test_paper_block_shapes_and_fixed_point():
    cell = MDEQCell((4, 4), spatial_dims=1, block="paper", rngs=nnx.Rngs(2))
    x = (jax.random.normal(jax.random.key(0), (2, 10, 4)), jnp.zeros((2, 5, 4)))  # injection at the finest only
    z = cell(cell.init_z(x), x)
    assert [a.shape for a in z] == [(2, 10, 4), (2, 5, 4)]
    assert all(bool(jnp.isfinite(a).all()) for a in z)
    # GN3 closes the block: every output map is normalized per group (zero mean at init).
    assert max(abs(float(a.mean())) for a in z) < 1e-4
    # The paper's block keeps an identity path on z: no contraction is promised (unlike the
    # default block, tested to converge above), but the solve stays finite.
    sol = jdeq.fixed_point(lambda z, a: a[0](z, a[1]), cell.init_z(x), (cell, x),
                           solver=jdeq.Anderson(tol=1e-3, maxiter=10))
    assert all(bool(jnp.isfinite(a).all()) for a in sol.value)


@pytest.mark.parametrize("strides,kernel", [((1, 1), (3, 3, 2, 3)), ((2, 2), (3, 3, 2, 3)), ((1, 1), (1, 1, 2, 3)),
                                            ((2,), (3, 2, 3))])
def test_fast_conv_matches_lax(x64, strides, kernel):
    """Same values and derivatives (fwd, rev, 2nd order) as jax.lax.conv_general_dilated."""
    nd = len(strides)
    sp = "HWD"[:nd]
    dn = ("N" + sp + "C", sp + "IO", "N" + sp + "C")
    x = jax.random.normal(jax.random.key(0), (2,) + (5,) * nd + (2,), jnp.float64)
    k = jax.random.normal(jax.random.key(1), kernel, jnp.float64)
    ref = lambda x, k: jax.lax.conv_general_dilated(x, k, strides, "SAME", dimension_numbers=dn)  # noqa: E731
    fast = lambda x, k: conv_general_dilated(x, k, strides, "SAME", dimension_numbers=dn)  # noqa: E731
    np.testing.assert_allclose(fast(x, k), ref(x, k), rtol=1e-12)
    g = jax.random.normal(jax.random.key(2), ref(x, k).shape, jnp.float64)
    for a, b in zip(jax.vjp(fast, x, k)[1](g), jax.vjp(ref, x, k)[1](g)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    dx = jax.random.normal(jax.random.key(3), x.shape, jnp.float64)
    dk = jax.random.normal(jax.random.key(4), k.shape, jnp.float64)
    _, t1 = jax.jvp(fast, (x, k), (dx, dk))
    _, t2 = jax.jvp(ref, (x, k), (dx, dk))
    np.testing.assert_allclose(t1, t2, rtol=1e-12)
    if strides == (2, 2):  # second order once (slow to trace)
        from jax.test_util import check_grads

        check_grads(fast, (x, k), order=2, modes=("fwd", "rev"))


def test_flip_transpose_is_the_adjoint(x64):
    k = jax.random.normal(jax.random.key(1), (3, 3, 2, 3), jnp.float64)
    x = jax.random.normal(jax.random.key(0), (1, 4, 5, 2), jnp.float64)
    v = jax.random.normal(jax.random.key(2), (1, 4, 5, 3), jnp.float64)
    np.testing.assert_allclose(jnp.vdot(conv_same(x, k), v), jnp.vdot(x, conv_same(v, flip_transpose(k))), rtol=1e-12)
