"""``stop_fraction``: the batch stops once that fraction of its examples has stopped; the rest
are returned unconverged with their true residuals. The default (1) is the per-example contract.

The problem: ``z -> a (Q z + 0.05 sin z) + b`` row by row (``Q`` orthogonal), seven fast rows
(``a = 0.3``) and one slow row (``a = 0.98``): at ``tol = 1e-5`` every solver needs ~11
evaluations for a fast row and 10-80 times that for the slow one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq
from jdeq._loop import keep_going

D = 16
_rng = np.random.default_rng(0)
Q = np.linalg.qr(_rng.normal(size=(D, D)))[0].astype(np.float32)
A = np.array([0.3] * 7 + [0.98], np.float32)[:, None]
B = _rng.normal(size=(8, D)).astype(np.float32)
SLOW = 7
SOLVERS = {
    "fpi": lambda **kw: jdeq.FixedPointIteration(tol=1e-5, maxiter=1000, **kw),
    "anderson": lambda **kw: jdeq.Anderson(tol=1e-5, maxiter=1000, **kw),
    "broyden": lambda **kw: jdeq.Broyden(tol=1e-5, maxiter=1000, **kw),
    "reversible": lambda **kw: jdeq.ReversibleIteration(beta=0.8, tol=1e-5, maxiter=2001, **kw),
}


def cell(z, a, b):
    return a * (z @ Q.T + 0.05 * jnp.sin(z)) + b


def f(z, b):
    return cell(z, A, b)


def grad_mode(name):
    return jdeq.Reversible() if name == "reversible" else jdeq.Implicit()


@functools.partial(jax.jit, static_argnums=(1,))
def solve_and_grad(b, solver):
    gradient = grad_mode("reversible" if isinstance(solver, jdeq.ReversibleIteration) else "x")

    def loss(b):
        sol = jdeq.fixed_point(f, jnp.zeros_like(b), b, solver=solver, gradient=gradient)
        return jnp.sum(sol.value**2), sol

    (_, sol), g = jax.value_and_grad(loss, has_aux=True)(b)
    return sol, g


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_batch_stops_when_the_fraction_has_converged(name):
    full, gfull = solve_and_grad(B, SOLVERS[name]())
    cut, gcut = solve_and_grad(B, SOLVERS[name](stop_fraction=7 / 8))
    fast = np.arange(8) != SLOW
    # the default: the slow example runs for far more evaluations than the others
    assert bool(full.stats.converged[fast].all())
    assert int(full.stats.nsteps[SLOW]) > 5 * int(full.stats.nsteps[fast].max())
    # 7 of 8 stopped: the loop ends with them; the slow row is reported as it is
    assert bool(cut.stats.converged[fast].all()) and not bool(cut.stats.converged[SLOW])
    assert int(cut.stats.nsteps.max()) <= int(full.stats.nsteps[fast].max()) + 2
    assert not bool(cut.stats.nonfinite.any())
    # its residual is reported truly: the returned value F(z_b) is one contraction step past z_b
    z_slow = cut.value[SLOW:]
    fz = cell(z_slow, A[SLOW:], B[SLOW:])
    true_res = float(jnp.linalg.norm(fz - z_slow) / jnp.linalg.norm(fz))
    assert float(cut.stats.rel_residual[SLOW]) > 1e-5
    assert true_res <= float(cut.stats.rel_residual[SLOW]) * 1.01
    # rows are independent problems: the fast rows and their gradients are exactly the default's
    np.testing.assert_array_equal(np.asarray(cut.value[fast]), np.asarray(full.value[fast]))
    np.testing.assert_array_equal(np.asarray(cut.stats.nsteps[fast]), np.asarray(full.stats.nsteps[fast]))
    np.testing.assert_allclose(np.asarray(gcut[fast]), np.asarray(gfull[fast]), rtol=1e-5)


@pytest.mark.parametrize("frac, stops_after", [(1.0, 8), (0.9, 8), (0.875, 7), (0.5, 4), (0.01, 1)])
def test_keep_going_counts_stopped_rows(frac, stops_after):
    for stopped in range(9):
        active = jnp.arange(8) >= stopped
        assert bool(keep_going(active, frac)) == (stopped < stops_after), (frac, stopped)


def test_vmap_of_per_example_code_cuts_over_the_mapped_examples():
    solver = SOLVERS["anderson"](stop_fraction=7 / 8)
    batched = jdeq.fixed_point(f, jnp.zeros_like(B), B, solver=solver)

    def one(a, b):
        return jdeq.fixed_point(lambda z, p: cell(z, *p), jnp.zeros(D), (a, b), solver=solver, batched=False)

    per_example = jax.jit(jax.vmap(one))(jnp.asarray(A), jnp.asarray(B))
    np.testing.assert_allclose(np.asarray(per_example.value), np.asarray(batched.value), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(per_example.stats.nsteps), np.asarray(batched.stats.nsteps))
    assert not bool(per_example.stats.converged[SLOW])


def test_default_is_the_per_example_contract():
    assert jdeq.Anderson().stop_fraction == 1.0
    assert jdeq.JaxoptSolver.stop_fraction == 1.0  # jaxopt: one global test, never a fraction
