"""Promises of the core's docstrings (solvers, gradient modes, ``unroll``, the regularizers),
each held by a test that fails when the option is ignored (issue 18: mutation testing found
options accepted, validated and then unchecked). Each test names the docstring it holds to;
tests/test_promises.py holds the first batch (damping, run-time maxiter, throw, remat, ...)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq

W_SLOW = 0.95 * jnp.eye(4)  # plain iteration contracts by 0.95 per step: many steps


def _slow(z, x):
    return z @ W_SLOW + 0.05 * jnp.tanh(x)


def _backward_stats(gradient, *, solver=None, scale=1.0):
    """The ``SolverStats`` that ``gradient``'s callback saw in one reverse pass."""
    seen = []
    gradient = type(gradient)(**{**{k: getattr(gradient, k) for k in gradient.__dataclass_fields__},
                                 "callback": seen.append})
    solver = solver or jdeq.FixedPointIteration(tol=1e-2, maxiter=300)

    def loss(x):
        return scale * jnp.sum(jdeq.fixed_point(_slow, jnp.zeros((2, 4)), x, solver=solver,
                                                gradient=gradient).value)

    jax.block_until_ready(jax.grad(loss)(jnp.ones((2, 4))))
    jax.effects_barrier()
    assert len(seen) == 1, seen
    return jax.tree.map(np.asarray, seen[0])


# ---- Implicit's options: "tol, maxiter, stop_mode: override the chosen solver's options" ----


def test_implicit_tol_overrides_the_backward_tolerance():
    inherited = _backward_stats(jdeq.Implicit())  # the forward's tol 1e-2
    tight = _backward_stats(jdeq.Implicit(tol=1e-5))
    assert inherited.rel_residual.max() > 1e-4, inherited
    assert tight.rel_residual.max() <= 1e-5 and tight.converged.all(), tight
    assert tight.nsteps.min() > inherited.nsteps.max()


def test_implicit_stop_mode_overrides_the_backward_stop_rule():
    """A cotangent of size 1e-6 is below an absolute tol 1e-3 at the zero start: ``abs`` stops
    at once, the inherited ``rel`` iterates."""
    rel = _backward_stats(jdeq.Implicit(), scale=1e-6)
    absolute = _backward_stats(jdeq.Implicit(stop_mode="abs"), scale=1e-6)
    assert rel.nsteps.min() > 10, rel
    assert absolute.nsteps.max() <= 2 and absolute.converged.all(), absolute


def test_implicit_maxiter_and_solver_maxiter_bound_the_backward():
    """``maxiter`` overrides; without it a solver instance's own ``maxiter`` is the budget (not
    the forward's 300)."""
    assert _backward_stats(jdeq.Implicit(maxiter=4)).nsteps.max() == 4
    own = _backward_stats(jdeq.Implicit(solver=jdeq.FixedPointIteration(tol=1e-9, maxiter=3)))
    assert own.nsteps.max() == 3


def test_implicit_solver_instance_is_the_backward_iteration():
    """``Implicit(solver=jdeq.Anderson(...))``: Anderson on the (linear) adjoint system takes a
    handful of steps where the forward's plain iteration takes ~100; same gradient."""
    def grads(gradient):
        return jax.grad(lambda x: jnp.sum(jdeq.fixed_point(
            _slow, jnp.zeros((2, 4)), x, solver=jdeq.FixedPointIteration(tol=1e-6, maxiter=500),
            gradient=gradient).value))(jnp.ones((2, 4)))

    plain = _backward_stats(jdeq.Implicit(tol=1e-5), solver=jdeq.FixedPointIteration(tol=1e-6, maxiter=500))
    anderson = _backward_stats(jdeq.Implicit(solver=jdeq.Anderson(tol=1e-5, maxiter=50)),
                               solver=jdeq.FixedPointIteration(tol=1e-6, maxiter=500))
    assert anderson.nsteps.max() * 5 < plain.nsteps.min(), (anderson.nsteps, plain.nsteps)
    exact = 0.05 * (1 - jnp.tanh(1.0) ** 2) / (1 - 0.95)
    np.testing.assert_allclose(grads(jdeq.Implicit(solver=jdeq.Anderson(tol=1e-6, maxiter=50))), exact, rtol=1e-3)


@pytest.mark.parametrize("shine_tol, accepted", [(1e6, True), (1e-9, False)])
def test_shine_tol_is_the_fallback_threshold(shine_tol, accepted):
    """``shine_tol``: examples at most this residual keep the estimate (1 matvec), the others
    run the full backward solve."""
    st = _backward_stats(jdeq.Implicit(shine="fallback", shine_tol=shine_tol, tol=1e-6),
                         solver=jdeq.Broyden(tol=1e-4, maxiter=60))
    if accepted:
        np.testing.assert_array_equal(st.nsteps, 1)
    else:
        assert st.nsteps.min() > 1, st.nsteps


# ---- Phantom: "the gradient of k damped steps started at stop_gradient(z*)" -----------------


@pytest.mark.parametrize("steps, damping", [(1, 1.0), (3, 0.5), (6, 0.8)])
def test_phantom_gradient_is_that_of_k_damped_steps(steps, damping):
    W = jnp.array([[0.3, -0.2, 0.1], [0.05, 0.4, -0.3], [0.2, 0.1, 0.25]])
    f = lambda z, x: jnp.tanh(z @ W + x)  # noqa: E731
    x = jnp.array([[0.5, -1.0, 0.3], [1.2, 0.1, -0.4]])
    solver = jdeq.FixedPointIteration(tol=1e-7, maxiter=200)
    z_star = jdeq.fixed_point(f, jnp.zeros_like(x), x, solver=solver).value

    def k_steps(x):
        z = jax.lax.stop_gradient(z_star)
        for _ in range(steps):
            z = (1 - damping) * z + damping * f(z, x)
        return jnp.sum(jnp.sin(z))

    phantom = jax.grad(lambda x: jnp.sum(jnp.sin(jdeq.fixed_point(
        f, jnp.zeros_like(x), x, solver=solver, gradient=jdeq.Phantom(steps=steps, damping=damping)).value)))(x)
    np.testing.assert_allclose(phantom, jax.grad(k_steps)(x), rtol=1e-5, atol=1e-6)


# ---- solver options: Anderson's memory and ridge, Broyden's memory ---------------------------


def _lin(z, c):
    A = jnp.diag(jnp.linspace(-0.9, 0.9, z.shape[-1]))
    return z @ A + c


def test_anderson_with_memory_one_is_plain_iteration():
    """``memory``: the number of past iterates mixed; with one, the mix is the plain step."""
    c = jnp.ones((2, 8))
    fpi = jdeq.fixed_point(_lin, jnp.zeros_like(c), c, solver=jdeq.FixedPointIteration(tol=1e-5, maxiter=300))
    one = jdeq.fixed_point(_lin, jnp.zeros_like(c), c, solver=jdeq.Anderson(memory=1, tol=1e-5, maxiter=300))
    five = jdeq.fixed_point(_lin, jnp.zeros_like(c), c, solver=jdeq.Anderson(memory=5, tol=1e-5, maxiter=300))
    np.testing.assert_array_equal(one.stats.nsteps, fpi.stats.nsteps)
    np.testing.assert_allclose(one.value, fpi.value, rtol=1e-6)
    assert int(five.stats.nsteps.max()) * 3 < int(fpi.stats.nsteps.min())


@pytest.mark.parametrize("ridge", [0.0, 10.0])
def test_anderson_ridge_is_the_documented_tikhonov_term(ridge, x64):
    """``ridge``: Tikhonov term relative to each stored squared residual, i.e. the weights
    minimize ``||sum a_i g_i||^2 + ridge sum a_i^2 ||g_i||^2`` subject to ``sum a_i = 1``."""
    c = jnp.array([[1.0, -0.5, 2.0]])
    f = lambda z: jnp.tanh(z @ jnp.array([[0.2, -0.6, 0.1], [0.3, 0.1, -0.4], [0.5, 0.2, 0.3]])) + c  # noqa: E731
    solver = jdeq.Anderson(memory=2, ridge=ridge)
    z1 = jnp.array([[0.1, 0.2, -0.3]])
    state = solver.init(z1)
    z2, state = solver.update(state, 1, z1, f(z1))
    z3, _ = solver.update(state, 2, z2, f(z2))
    g = np.stack([np.asarray(f(z1) - z1)[0], np.asarray(f(z2) - z2)[0]])
    G = g @ g.T
    a = np.linalg.solve(G + ridge * np.diag(np.diag(G)), np.ones(2))
    a = a / a.sum()
    xs = np.stack([np.asarray(z1)[0], np.asarray(z2)[0]])
    np.testing.assert_allclose(np.asarray(z3)[0], a @ (xs + g), rtol=1e-7)


def test_broyden_memory_bounds_the_rank_of_its_estimate():
    """``memory``: rank-one updates kept. On a linear map of dim 8, a full-memory Broyden
    terminates within ~2*dim steps; memory 1 cannot and takes far longer."""
    c = jnp.ones((2, 8))
    full = jdeq.fixed_point(_lin, jnp.zeros_like(c), c, solver=jdeq.Broyden(memory=20, tol=1e-5, maxiter=300))
    one = jdeq.fixed_point(_lin, jnp.zeros_like(c), c, solver=jdeq.Broyden(memory=1, tol=1e-5, maxiter=300))
    assert bool(full.stats.converged.all()) and int(full.stats.nsteps.max()) <= 2 * 8 + 2
    assert int(one.stats.nsteps.min()) > int(full.stats.nsteps.max()) + 5, (one.stats.nsteps, full.stats.nsteps)


# ---- unroll: "converged compares that residual (of kind stop_mode) with tol" -----------------


def test_unroll_stats_follow_tol_and_stop_mode():
    c = jnp.full((2, 3), 1e4)
    f = lambda z, c: 0.5 * z + c  # noqa: E731  z_L - z_{L-1} = c 0.5^(L-1)
    depth = 12
    abs_res = float(np.linalg.norm(np.full(3, 1e4 * 0.5 ** (depth - 1))))  # ~8.5
    rel = jdeq.unroll(f, jnp.zeros_like(c), c, depth=depth, tol=1e-3, stop_mode="rel")
    absolute = jdeq.unroll(f, jnp.zeros_like(c), c, depth=depth, tol=1e-3, stop_mode="abs")
    loose = jdeq.unroll(f, jnp.zeros_like(c), c, depth=depth, tol=10.0, stop_mode="abs")
    np.testing.assert_allclose(absolute.stats.abs_residual, abs_res, rtol=1e-5)
    np.testing.assert_array_equal(rel.stats.nsteps, depth)
    assert bool(rel.stats.converged.all())
    assert not bool(absolute.stats.converged.any())
    assert bool(loose.stats.converged.all())


# ---- jacobian_penalty: prob, num_samples, noise ----------------------------------------------


def _diag_cell(z, d):
    return z * d  # J = diag(d): ||J||_F^2 / dim = mean(d^2)


D = jnp.array([[0.5, -1.0, 2.0, 0.25]])
EXACT = float(jnp.mean(D ** 2))


def test_jacobian_penalty_prob_is_the_fraction_of_calls_that_compute_it():
    keys = jax.random.split(jax.random.key(0), 400)
    vals = jax.vmap(lambda k: jdeq.jacobian_penalty(_diag_cell, jnp.ones((1, 4)), D, k, gamma=1.0, prob=0.25,
                                                    noise="rademacher"))(keys)
    on = np.asarray(vals) != 0
    assert 0.15 < on.mean() < 0.35, on.mean()
    np.testing.assert_allclose(np.asarray(vals)[on], EXACT, rtol=1e-6)


def test_jacobian_penalty_noise_rademacher_is_exact_on_a_diagonal_jacobian():
    """Hutchinson with +-1 probes is exact for a diagonal ``J``; Gaussian probes are not."""
    keys = jax.random.split(jax.random.key(1), 8)
    pen = lambda noise: jax.vmap(lambda k: jdeq.jacobian_penalty(  # noqa: E731
        _diag_cell, jnp.ones((1, 4)), D, k, gamma=2.0, noise=noise))(keys)
    np.testing.assert_allclose(pen("rademacher"), 2.0 * EXACT, rtol=1e-6)
    assert float(jnp.max(jnp.abs(pen("normal") - 2.0 * EXACT))) > 0.05


def test_jacobian_penalty_num_samples_lowers_the_variance():
    keys = jax.random.split(jax.random.key(2), 64)
    spread = lambda n: float(jnp.std(jax.vmap(lambda k: jdeq.jacobian_penalty(  # noqa: E731
        _diag_cell, jnp.ones((1, 4)), D, k, gamma=1.0, num_samples=n))(keys)))
    assert spread(32) * 3 < spread(1), (spread(32), spread(1))
