"""Divergence and non-finite values (issue 9, part 3).

Forward: an exploding cell or a NaN met at a known iteration gives ``converged=False``,
``nonfinite=True`` and the lowest-residual *finite* iterate, for every solver; ``throw=True``
says "non-finite" vs "did not converge" under jit. Backward: examples whose forward or adjoint
solve went non-finite get an exact zero cotangent, the others their exact gradient, in the same
batch. Training: ``fit`` skips a non-finite step (parameters unchanged), counts it, and raises
after ``max_skipped_steps`` consecutive ones.
"""

import jax
import jax.numpy as jnp
import jaxopt
import numpy as np
import optax
import pytest
from flax import nnx

import jdeq
from jdeq import train as T

SOLVERS = {
    "fpi": jdeq.FixedPointIteration(tol=1e-6, maxiter=60),
    "anderson": jdeq.Anderson(tol=1e-6, maxiter=60),
    "broyden": jdeq.Broyden(tol=1e-6, maxiter=60),
    "jaxopt_fpi": jdeq.JaxoptSolver(jaxopt.FixedPointIteration, tol=1e-6, maxiter=60),
    "jaxopt_anderson": jdeq.JaxoptSolver(jaxopt.AndersonAcceleration, tol=1e-6, maxiter=60),
}
JDEQ_SOLVERS = ("fpi", "anderson", "broyden")


def affine(z, a):
    """``a * z + 1``: converges to ``1 / (1 - a)`` for ``|a| < 1``, explodes for ``a > 1``."""
    return a * z + 1.0


def nan_above(z, args):
    """``0.5 z + 1`` (fixed point 2) that turns NaN wherever ``z > thr`` (per example)."""
    a, thr = args
    return jnp.where(z > thr, jnp.nan, a * z + 1.0)


def _rows(values, dim=3):
    return jnp.repeat(jnp.asarray(values, jnp.float32)[:, None], dim, axis=1)


def _residual(f, z, args):
    return np.linalg.norm(np.asarray(f(z, args) - z), axis=1)


# ----------------------------------------------------------------------------- forward stats


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_exploding_cell_is_flagged_and_returns_a_finite_iterate(stop_mode):
    a = _rows([0.5, 2.0])  # row 1: z_k = 2^k - 1; its residual norm overflows after ~64 steps
    solver = jdeq.FixedPointIteration(maxiter=200, tol=1e-6, stop_mode=stop_mode)
    sol = jdeq.fixed_point(affine, jnp.zeros((2, 3)), a, solver=solver)
    st = sol.stats
    np.testing.assert_array_equal(st.converged, [True, False])
    np.testing.assert_array_equal(st.nonfinite, [False, True])
    assert st.nonfinite.shape == (2,) and st.nonfinite.dtype == jnp.bool_
    assert np.isfinite(np.asarray(sol.value)).all()
    assert 60 < int(st.nsteps[1]) < 200  # stopped where it went non-finite, not at the budget
    # Row 0 (converged): the value is f(z_b), so rel = abs / ||f(z_b)|| = abs / ||value||.
    # Row 1 (flagged): the value is z_b itself, the lowest-residual finite iterate.
    np.testing.assert_allclose(
        st.rel_residual[0], st.abs_residual[0] / (np.linalg.norm(sol.value[0]) + 1e-8), rtol=1e-5
    )
    np.testing.assert_allclose(st.abs_residual[1], _residual(affine, sol.value, a)[1], rtol=1e-5)
    if stop_mode == "abs":  # |f(z) - z| = z + 1 grows: z0 is the lowest-residual iterate
        np.testing.assert_array_equal(sol.value[1], 0.0)


def test_exponential_growth_to_inf():
    f = lambda z, a: jnp.exp(z) + a  # noqa: E731  0 -> 2 -> 8.4 -> 4.4e3 -> inf
    sol = jdeq.fixed_point(f, jnp.zeros((1, 2)), jnp.ones((1, 2)),
                           solver=jdeq.FixedPointIteration(maxiter=20, stop_mode="abs"))
    assert bool(sol.stats.nonfinite[0]) and not bool(sol.stats.converged[0])
    assert int(sol.stats.nsteps[0]) == 4
    np.testing.assert_array_equal(sol.value, 0.0)  # non-finite: z_b = z0 (residual 2), not f(z0)


def test_nan_at_a_known_iteration_fpi_with_trace():
    # Row 0 meets NaN at its 4th evaluation: 0 -> 1 -> 1.5 -> 1.75 (> 1.5: NaN).
    args = (_rows([0.5, 0.5]), _rows([1.5, 10.0]))
    solver = jdeq.FixedPointIteration(maxiter=40, tol=1e-6, trace=True)
    sol = jdeq.fixed_point(nan_above, jnp.zeros((2, 3)), args, solver=solver)
    st = sol.stats
    np.testing.assert_array_equal(st.nonfinite, [True, False])
    np.testing.assert_array_equal(st.converged, [False, True])
    assert int(st.nsteps[0]) == 4
    np.testing.assert_allclose(sol.value[0], 1.5)  # the best finite iterate (residual 0.25)
    np.testing.assert_allclose(st.abs_residual[0], 0.25 * np.sqrt(3), rtol=1e-6)
    np.testing.assert_allclose(sol.value[1], 2.0, rtol=1e-5)
    trace = np.asarray(st.trace[0])
    assert np.isfinite(trace[:3]).all() and np.isnan(trace[3:]).all()


@pytest.mark.parametrize("name", list(SOLVERS))
def test_nan_injection_every_solver(name):
    args = (_rows([0.5, 0.5, 0.5]), _rows([1.5, 10.0, -1.0]))  # row 2: NaN at z0 already
    sol = jdeq.fixed_point(nan_above, jnp.zeros((3, 3)), args, solver=SOLVERS[name])
    st, value = sol.stats, np.asarray(sol.value)
    nonfinite = np.asarray(st.nonfinite)
    assert np.isfinite(value).all()
    assert nonfinite[2] and not bool(st.converged[2])
    np.testing.assert_array_equal(value[2], 0.0)  # no finite iterate at all: z0
    # Every example: the stats describe z_b, the lowest-residual finite iterate; the value is
    # z_b itself for a flagged example (f finite there), else f(z_b) (rel = abs / ||f(z_b)||).
    res = _residual(nan_above, sol.value, args)
    assert np.isfinite(res[:2]).all() and not nonfinite[1]
    if nonfinite[0]:
        np.testing.assert_allclose(np.asarray(st.abs_residual)[0], res[0], rtol=1e-5)
    if name in JDEQ_SOLVERS:
        np.testing.assert_allclose(
            np.asarray(st.rel_residual)[1], np.asarray(st.abs_residual)[1] / (np.linalg.norm(value[1]) + 1e-8),
            rtol=1e-5,
        )
    else:  # jaxopt returns its own last iterate, which the stats describe
        np.testing.assert_allclose(np.asarray(st.abs_residual)[:2], res[:2], rtol=1e-5)
    if name in JDEQ_SOLVERS:  # per example: row 0 meets its NaN, row 1 is untouched by both
        assert nonfinite[0] and not bool(st.converged[0])
        assert (value[0] <= 1.5).all()  # a finite iterate of row 0 (f is NaN above 1.5)
        assert bool(st.converged[1])
        np.testing.assert_allclose(value[1], 2.0, rtol=1e-4)
    else:  # jaxopt: one global problem; row 2's NaN error ends its loop at once for all rows
        assert not nonfinite[0] and not bool(st.converged.any())


def test_unroll_flags_nonfinite():
    sol = jdeq.unroll(affine, jnp.zeros((2, 3)), _rows([0.5, 1e30]), depth=4)
    np.testing.assert_array_equal(sol.stats.nonfinite, [False, True])
    np.testing.assert_array_equal(sol.stats.converged, [False, False])


def test_solver_metrics_report_the_nonfinite_fraction():
    sol = jdeq.fixed_point(nan_above, jnp.zeros((4, 3)), (_rows([0.5] * 4), _rows([1.5, 10, 10, 10])),
                           solver=SOLVERS["fpi"])
    m = T.solver_metrics(sol.stats)
    assert float(m["nonfinite"]) == 0.25 and float(m["converged"]) == 0.75
    assert np.isfinite(float(m["abs_residual"])) and np.isfinite(float(m["rel_residual"]))


# ----------------------------------------------------------------------------- throw


def _jit_throw(f, args, solver):
    run = jax.jit(lambda a: jdeq.fixed_point(f, jnp.zeros((2, 3)), a, solver=solver, throw=True).value)
    return jax.block_until_ready(run(args))


def test_throw_says_non_finite_under_jit():
    args = (_rows([0.5, 0.5]), _rows([1.5, 10.0]))  # the best iterate is finite, the solve was not
    with pytest.raises(Exception, match=r"non-finite residual in 1 of 2 examples \(first: example 0\)"):
        _jit_throw(nan_above, args, SOLVERS["anderson"])


def test_throw_says_not_converged_when_finite():
    with pytest.raises(Exception, match=r"did not converge \(all values finite\)"):
        _jit_throw(affine, _rows([0.99, 0.99]), jdeq.FixedPointIteration(maxiter=3))


# ----------------------------------------------------------------------------- backward


def _grad(solver, gradient, f, z0, args):
    """Gradient of ``sum(z*^2)`` w.r.t. ``args`` (its first entry if a tuple), jitted."""

    def loss(args):
        return jnp.sum(jdeq.fixed_point(f, z0, args, solver=solver, gradient=gradient).value ** 2)

    g = jax.jit(jax.grad(loss))(args)
    return np.asarray(g[0] if isinstance(args, tuple) else g)


CASES = [  # (forward solver, gradient): each solver, each gradient mode, one jaxopt linear solve
    ("fpi", jdeq.Implicit()),
    ("anderson", jdeq.Implicit()),
    ("broyden", jdeq.Implicit()),
    ("anderson", jdeq.Implicit(solver="gmres", tol=1e-7)),
    ("fpi", jdeq.Phantom(steps=5, damping=0.8)),
    ("broyden", jdeq.JacobianFree()),
    ("anderson", jdeq.Unrolled()),
]


@pytest.mark.parametrize("solver,gradient", CASES, ids=lambda c: c if isinstance(c, str) else repr(c)[:24])
def test_backward_zeroes_bad_examples_and_keeps_good_ones_exact(solver, gradient):
    solver = SOLVERS[solver]
    a, thr = _rows([0.5, 0.5, 0.3, 0.5]), _rows([10.0, 1.5, 10.0, -1.0])  # rows 1, 3 go NaN
    good = np.array([0, 2])
    g = _grad(solver, gradient, nan_above, jnp.zeros((4, 3)), (a, thr))
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g[[1, 3]], 0.0)
    if isinstance(gradient, jdeq.Implicit):  # d(sum z*^2)/da = 2 z* / (1 - a)^2, z* = 1 / (1 - a)
        za = 1.0 / (1.0 - np.asarray(a[good]))
        np.testing.assert_allclose(g[good], 2 * za**3, rtol=1e-3)
    else:  # the same as for a batch of the good examples alone
        ref = _grad(solver, gradient, nan_above, jnp.zeros((2, 3)), (a[good], thr[good]))
        np.testing.assert_allclose(g[good], ref, rtol=1e-5, atol=1e-7)


def test_backward_of_an_exploding_solve_and_its_stats():
    seen = []
    gradient = jdeq.Implicit(callback=seen.append)
    a = _rows([0.5, 1e3])  # FPI: row 1 overflows to inf in ~13 steps
    g = _grad(SOLVERS["fpi"], gradient, affine, jnp.zeros((2, 3)), a)
    np.testing.assert_allclose(g[0], 2 * 2.0**3, rtol=1e-3)
    np.testing.assert_array_equal(g[1], 0.0)
    (bwd,) = seen
    np.testing.assert_array_equal(bwd.nonfinite, [False, True])  # zeroed: forward non-finite
    np.testing.assert_array_equal(bwd.converged, [True, False])


def test_backward_solve_going_non_finite_is_zeroed_and_reported():
    # Anderson solves the expansive affine map (z* = -1/999); plain iteration on the adjoint
    # u = 1e3 u + g explodes: that example's cotangent is zeroed and flagged.
    seen = []
    gradient = jdeq.Implicit(solver=jdeq.FixedPointIteration(maxiter=50), callback=seen.append)
    a = _rows([0.5, 1e3])
    sol = jdeq.fixed_point(affine, jnp.zeros((2, 3)), a, solver=SOLVERS["anderson"])
    assert not bool(sol.stats.nonfinite.any())
    g = _grad(SOLVERS["anderson"], gradient, affine, jnp.zeros((2, 3)), a)
    np.testing.assert_allclose(g[0], 2 * 2.0**3, rtol=1e-3)
    np.testing.assert_array_equal(g[1], 0.0)
    np.testing.assert_array_equal(seen[0].nonfinite, [False, True])


def test_forward_mode_tangent_is_zeroed_too():
    args = (_rows([0.5, 0.5]), _rows([10.0, 1.5]))
    f = lambda a: jdeq.fixed_point(nan_above, jnp.zeros((2, 3)), (a, args[1]),  # noqa: E731
                                   solver=SOLVERS["fpi"]).value
    _, t = jax.jvp(f, (args[0],), (jnp.ones_like(args[0]),))
    np.testing.assert_allclose(t[0], 4.0, rtol=1e-3)
    np.testing.assert_array_equal(t[1], 0.0)


# ----------------------------------------------------------------------------- training


def _mse_loss(model, batch):
    err = model(batch["inputs"]) - batch["targets"]
    poison = jnp.where(jnp.any(batch["poison"] > 0), jnp.nan, 1.0)  # NaN loss and gradients
    loss = jnp.mean(err**2) * poison
    return loss, {"loss": loss}


def _zero_grad_loss(model, batch):  # reference: a poisoned batch makes a zero SGD step
    err = model(batch["inputs"]) - batch["targets"]
    keep = jnp.where(jnp.any(batch["poison"] > 0), 0.0, 1.0)
    return jnp.mean(err**2) * keep, {}


def _data(n=32, poisoned=(3, 17)):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    poison = np.zeros((n,), np.float32)
    poison[list(poisoned)] = 1.0
    return {"inputs": x, "targets": x @ np.ones((4, 1), np.float32), "poison": poison}


def _params(model):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))]


def test_fit_skips_non_finite_steps_and_counts_them():
    data, steps, bs = _data(), 12, 8
    expected = sum(bool(data["poison"][T.batch_indices(32, bs, k, seed=0)].any()) for k in range(steps))
    assert 0 < expected < steps  # some steps poisoned, some not
    flags = []
    model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    hist = T.fit(model, optax.sgd(0.05), data, steps=steps, batch_size=bs, loss_fn=_mse_loss,
                 log_every=4, progress=False, callback=lambda k, m: flags.append(float(m["skipped"])))
    assert hist.train[-1]["skipped"] == expected and sum(flags) == expected
    assert [r["skipped"] for r in hist.train] == sorted(r["skipped"] for r in hist.train)
    assert all(np.isfinite(p).all() for p in _params(model))
    ref = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    T.fit(ref, optax.sgd(0.05), data, steps=steps, batch_size=bs, loss_fn=_zero_grad_loss,
          progress=False)
    for p, q in zip(_params(model), _params(ref)):  # a skipped step changed nothing
        np.testing.assert_allclose(p, q, rtol=1e-6)


def test_fit_raises_after_consecutive_skips_and_keeps_finite_params():
    data = _data(poisoned=range(32))  # every step non-finite
    model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    before = _params(model)
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps were skipped \(steps 1\.\.3\)"):
        T.fit(model, optax.adam(1e-2), data, steps=50, batch_size=8, loss_fn=_mse_loss,
              max_skipped_steps=3, progress=False)
    for p, q in zip(_params(model), before):
        np.testing.assert_array_equal(p, q)
    with pytest.raises(ValueError, match="`max_skipped_steps` must be None or an int >= 1"):
        T.fit(model, optax.sgd(0.1), data, steps=1, batch_size=8, loss_fn=_mse_loss, max_skipped_steps=0)


def test_skip_counts_survive_a_resume(tmp_path):
    """Stopped at step 7 (checkpoint at 7, last log at 4) and resumed: the skip count of the
    finished run equals the uninterrupted one's (the checkpoint carries the counter)."""
    data, steps, bs = _data(), 12, 8

    class Stop(Exception):
        pass

    def stop_at_7(k, _):
        if k == 7:
            raise Stop

    run = dict(steps=steps, batch_size=bs, loss_fn=_mse_loss, log_every=4, progress=False)
    full = T.fit(nnx.Linear(4, 1, rngs=nnx.Rngs(0)), optax.sgd(0.05), data, **run)
    with pytest.raises(Stop):
        T.fit(nnx.Linear(4, 1, rngs=nnx.Rngs(0)), optax.sgd(0.05), data, checkpoint_dir=tmp_path,
              checkpoint_every=7, callback=stop_at_7, **run)
    resumed = T.fit(nnx.Linear(4, 1, rngs=nnx.Rngs(0)), optax.sgd(0.05), data, checkpoint_dir=tmp_path, **run)
    assert resumed.resumed_from == 7
    assert [r["skipped"] for r in resumed.train] == [r["skipped"] for r in full.train]
