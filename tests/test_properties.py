"""Property tests (hypothesis): on random contractive affine / tanh maps of random small shapes
and batch sizes, the reported residuals are those of the returned value, ``converged`` means
below ``tol``, and the solve is per example (invariant to permuting the batch)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jdeq

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SOLVERS = [
    jdeq.FixedPointIteration(tol=1e-9, maxiter=60, stop_mode="abs"),
    jdeq.Anderson(tol=1e-9, maxiter=60, stop_mode="rel", memory=3),
    jdeq.Broyden(tol=1e-9, maxiter=60, stop_mode="abs", memory=8),
    jdeq.FixedPointIteration(tol=1e-6, maxiter=8, stop_mode="rel", damping=0.7),  # budget-limited
]


def cell(z, p):
    """Affine (kind 0) or tanh (kind 1) map with a per-example bias: A z + b or tanh(A z + b)."""
    y = z @ p["A"].T + p["b"]
    return jnp.where(p["kind"] == 1, jnp.tanh(y), y)


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 5))
    dim = draw(st.integers(1, 6))
    rho = draw(st.floats(0.0, 0.95))
    kind = draw(st.integers(0, 1))
    seed = draw(st.integers(0, 2**31 - 1))
    solver = draw(st.sampled_from(SOLVERS))
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(dim, dim))
    A = rho * A / max(np.linalg.norm(A, 2), 1e-12)
    b = rng.normal(size=(batch, dim)) * draw(st.sampled_from([1e-2, 1.0, 1e2]))
    z0 = rng.normal(size=(batch, dim))
    perm = rng.permutation(batch)
    return {"A": A, "b": b, "kind": np.int32(kind)}, z0, solver, perm


@functools.partial(jax.jit, static_argnums=2)
def solve(z0, p, solver):
    """Jitted with the solver static: a permuted batch (same shapes) reuses the compilation."""
    return jdeq.fixed_point(cell, z0, p, solver=solver)


@jax.jit
def _residual(value, p):
    return jnp.linalg.norm(cell(value, p) - value, axis=1)


def _check_residuals(sol, p, solver):
    stats = sol.stats
    res = np.asarray(_residual(sol.value, p))
    np.testing.assert_allclose(stats.abs_residual, res, rtol=1e-7, atol=1e-13)
    fz_norm = np.linalg.norm(np.asarray(cell(sol.value, p)), axis=1)  # eager, tiny
    np.testing.assert_allclose(stats.rel_residual, res / (fz_norm + 1e-8), rtol=1e-7, atol=1e-13)
    metric = np.asarray(stats.abs_residual if solver.stop_mode == "abs" else stats.rel_residual)
    conv = np.asarray(stats.converged)
    np.testing.assert_array_equal(conv, metric < solver.tol)
    nsteps = np.asarray(stats.nsteps)
    assert ((nsteps >= 1) & (nsteps <= solver.maxiter)).all()
    assert (nsteps[~conv] == solver.maxiter).all()  # only converged examples stop early


def _check_permutation(sol, sol_perm, perm):
    np.testing.assert_array_equal(sol_perm.stats.nsteps, np.asarray(sol.stats.nsteps)[perm])
    np.testing.assert_array_equal(sol_perm.stats.converged, np.asarray(sol.stats.converged)[perm])
    np.testing.assert_allclose(sol_perm.value, np.asarray(sol.value)[perm], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        sol_perm.stats.abs_residual, np.asarray(sol.stats.abs_residual)[perm], rtol=1e-6, atol=1e-13
    )


# One test for both properties, so each drawn problem costs one compilation (the permuted batch
# has the same shapes and reuses it).
@SETTINGS
@given(problems())
def test_residuals_converged_and_batch_permutation(problem):
    p, z0, solver, perm = problem
    with jax.enable_x64(True):
        p = jax.tree_util.tree_map(jnp.asarray, p)
        sol = solve(jnp.asarray(z0), p, solver)
        # The reported residuals are those of the returned value; converged <=> below tol.
        _check_residuals(sol, p, solver)
        # Per-example independence: permuting the batch permutes value and stats.
        sol_perm = solve(jnp.asarray(z0[perm]), dict(p, b=p["b"][perm]), solver)
        _check_permutation(sol, sol_perm, perm)
