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

# (module constants in numpy: a test module must not start JAX at import, see tests/conftest.py)
W_SLOW = 0.95 * np.eye(4, dtype=np.float32)  # plain iteration contracts by 0.95 per step: many steps


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


@pytest.mark.parametrize("steps, damping", [(3, 0.5), (6, 0.8)])
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
    update = jax.jit(solver.update, static_argnums=1)
    z2, state = update(state, 1, z1, f(z1))
    z3, _ = update(state, 2, z2, f(z2))
    g = np.stack([np.asarray(f(z1) - z1)[0], np.asarray(f(z2) - z2)[0]])
    G = g @ g.T
    a = np.linalg.solve(G + ridge * np.diag(np.diag(G)), np.ones(2))
    a = a / a.sum()
    xs = np.stack([np.asarray(z1)[0], np.asarray(z2)[0]])
    np.testing.assert_allclose(np.asarray(z3)[0], a @ (xs + g), rtol=1e-7)


def test_broyden_steps_are_the_documented_good_broyden_updates(x64):
    """The docstring's method: ``B0 = -I``, a plain first step, then ``z <- z - B g`` with the
    Sherman-Morrison update ``B += (dz - B dg) dz^T B / (dz^T B dg)`` after every step from the
    second on. Checked against a dense float64 implementation over six steps."""
    W = jnp.array([[0.2, -0.6, 0.1], [0.3, 0.1, -0.4], [0.5, 0.2, 0.3]])
    c = jnp.array([[1.0, -0.5, 2.0]])
    f = lambda z: jnp.tanh(z @ W) + c  # noqa: E731
    solver = jdeq.Broyden(memory=10)
    update = jax.jit(solver.update, static_argnums=1)
    z = jnp.array([[0.1, 0.2, -0.3]])
    state = solver.init(z)
    got = []
    for k in range(1, 7):
        z, state = update(state, k, z, f(z))
        got.append(np.asarray(z)[0])

    def g(z):
        return np.asarray(f(jnp.asarray(z)[None]))[0] - z

    B, zr = -np.eye(3), np.array([0.1, 0.2, -0.3])
    z_prev = g_prev = None
    want = []
    for _ in range(6):
        gz = g(zr)
        if z_prev is not None:
            dz, dg = zr - z_prev, gz - g_prev
            B = B + np.outer(dz - B @ dg, dz @ B) / (dz @ B @ dg)
        z_prev, g_prev = zr, gz
        zr = zr - B @ gz
        want.append(zr)
    np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=1e-9, atol=1e-12)


def test_broyden_limited_memory_keeps_the_latest_terms(x64):
    """``memory``: the ``memory`` latest rank-one terms (plus the newest, not yet stored) make
    ``B``; once the ring buffer wraps, the oldest term is dropped. Checked against a dense
    float64 implementation of exactly that over twelve steps with memory 2 (the buffer wraps
    from the fourth step on), on a two-example batch whose rows must not mix."""
    W = jnp.array([[0.2, -0.6, 0.1], [0.3, 0.1, -0.4], [0.5, 0.2, 0.3]])
    c = jnp.array([[1.0, -0.5, 2.0], [-0.3, 0.8, 0.1]])
    f = lambda z: jnp.tanh(z @ W) + c  # noqa: E731
    solver = jdeq.Broyden(memory=2)
    update = jax.jit(solver.update, static_argnums=1)
    z = jnp.array([[0.1, 0.2, -0.3], [0.0, -0.1, 0.4]])
    state = solver.init(z)
    got = []
    for k in range(1, 13):
        z, state = update(state, k, z, f(z))
        got.append(np.asarray(z))

    for row in range(2):
        def g(zr, row=row):
            return np.asarray(f(jnp.asarray(np.stack([zr, zr]))))[row] - zr

        zr = np.array([[0.1, 0.2, -0.3], [0.0, -0.1, 0.4]])[row]
        terms, new, z_prev, g_prev, want = [], None, None, None, []
        for _ in range(12):
            gz = g(zr)
            if new is not None:
                terms = (terms + [new])[-2:]  # the buffer: the two latest stored terms
            B = -np.eye(3) + sum((np.outer(u, v) for u, v in terms), np.zeros((3, 3)))
            new = None
            if z_prev is not None:
                dz, dg = zr - z_prev, gz - g_prev
                new = ((dz - B @ dg) / (dz @ B @ dg), dz @ B)
                B = B + np.outer(*new)
            z_prev, g_prev = zr, gz
            zr = zr - B @ gz
            want.append(zr)
        np.testing.assert_allclose(np.stack(got)[:, row], np.stack(want), rtol=1e-9, atol=1e-12)


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


D = np.array([[0.5, -1.0, 2.0, 0.25]], np.float32)
EXACT = float(np.mean(D ** 2))


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


# ---- HyperAnderson: learned_steps and safeguard ----------------------------------------------


def _hyper_problem():
    c = jnp.linspace(-1.0, 1.0, 12).reshape(2, 6)
    return (lambda z, c: 0.8 * jnp.tanh(z) + c), c


def _trained_mixer():
    """A mixer whose output layer is not zero (an untrained one reproduces Anderson exactly)."""
    mixer = jdeq.init_mixer(jax.random.key(0), memory=3)
    k1, k2 = jax.random.split(jax.random.key(1))
    return {**mixer, "w2": 0.5 * jax.random.normal(k1, mixer["w2"].shape),
            "b2": 0.5 * jax.random.normal(k2, mixer["b2"].shape)}


@pytest.mark.parametrize("learned_steps", [0, 1])
def test_hyper_anderson_learned_steps_bounds_the_learned_iterations(learned_steps):
    """``learned_steps``: learned mixing for the first ``learned_steps`` iterations only; with 0
    the first step is Anderson's, with 1 it is the mixer's."""
    f, c = _hyper_problem()
    solver = jdeq.HyperAnderson(params=_trained_mixer(), memory=3, learned_steps=learned_steps)
    z = jnp.full_like(c, 0.3)
    new, _ = jax.jit(lambda z: solver.update(solver.init(z), 1, z, f(z, c)))(z)
    plain = jdeq.Anderson(memory=3)
    want, _ = jax.jit(lambda z: plain.update(plain.init(z), 1, z, f(z, c)))(z)
    if learned_steps == 0:
        np.testing.assert_allclose(new, want, rtol=1e-6)
    else:
        assert not np.allclose(new, want, rtol=1e-4)


@pytest.mark.parametrize("safeguard", [True, False])
def test_hyper_anderson_safeguard_switches_to_plain_anderson_after_a_bad_learned_step(safeguard):
    """``safeguard``: after a learned step that did not lower the residual, plain Anderson. The
    state says the last step was learned and the previous residual was 0 (so it rose)."""
    f, c = _hyper_problem()
    solver = jdeq.HyperAnderson(params=_trained_mixer(), memory=3, safeguard=safeguard)
    z = jnp.full_like(c, 0.3)
    xs, gs, gram, _, learn, _ = solver.init(z)
    state = (xs, gs, gram, jnp.zeros(2), jnp.ones(2, bool), jnp.ones(2, bool))
    new, _ = jax.jit(solver.update, static_argnums=1)(state, 1, z, f(z, c))
    plain = jdeq.Anderson(memory=3)
    want, _ = jax.jit(lambda z: plain.update(plain.init(z), 1, z, f(z, c)))(z)
    if safeguard:
        np.testing.assert_allclose(new, want, rtol=1e-6)
    else:
        assert not np.allclose(new, want, rtol=1e-4)


# ---- splittings: "alpha: step a" ---------------------------------------------------------------


def _monotone():
    A = 0.4 * jax.random.normal(jax.random.key(3), (4, 4))
    W = 0.8 * jnp.eye(4) - A.T @ A  # I - W = 0.2 I + A^T A: m = 0.2
    problem = jdeq.MonotoneProblem(linear=lambda z, w: z @ w.T, monotonicity=0.2,
                                   lipschitz=lambda w: jnp.linalg.norm(jnp.eye(4) - w, 2))
    return problem, W


@pytest.mark.parametrize("alpha", [0.05, 0.3])
def test_forward_backward_alpha_is_the_step(alpha):
    """One evaluation (``maxiter=1``) returns ``T(z0) = relu((1 - a) z0 + a (W z0 + c))``."""
    problem, W = _monotone()
    z0 = jnp.array([[0.5, -0.2, 0.1, 0.3], [1.0, 0.0, -1.0, 0.2]])
    c = jnp.array([[0.3, -0.4, 0.2, 0.1], [-0.2, 0.5, 0.1, -0.3]])
    sol = jdeq.monotone_fixed_point(problem, c, z0, W, splitting=jdeq.ForwardBackward(alpha=alpha),
                                    solver=jdeq.FixedPointIteration(tol=1e-12, maxiter=1))
    np.testing.assert_allclose(sol.value, jax.nn.relu((1 - alpha) * z0 + alpha * (z0 @ W.T + c)), rtol=1e-6)


def test_peaceman_rachford_alpha_changes_the_path_not_the_fixed_point():
    problem, W = _monotone()
    setup = lambda a, w: jnp.linalg.inv((1 + a) * jnp.eye(4) - a * w)  # noqa: E731
    problem = jdeq.MonotoneProblem(linear=problem.linear, monotonicity=0.2, lipschitz=problem.lipschitz,
                                   resolvent=(setup, lambda v, inv: v @ inv.T))
    c = jnp.array([[0.3, -0.4, 0.2, 0.1], [-0.2, 0.5, 0.1, -0.3]])
    solve = lambda alpha: jdeq.monotone_fixed_point(  # noqa: E731
        problem, c, jnp.zeros_like(c), W, splitting=jdeq.PeacemanRachford(alpha=alpha),
        solver=jdeq.FixedPointIteration(tol=1e-6, maxiter=2000))
    a, b = solve(0.02), solve(None)
    assert bool(a.stats.converged.all()) and bool(b.stats.converged.all())
    np.testing.assert_allclose(a.value, b.value, atol=1e-4)
    assert int(a.stats.nsteps.min()) > 2 * int(b.stats.nsteps.max()), (a.stats.nsteps, b.stats.nsteps)


# ---- correction_loss(gamma=...) and fixed_point_states(throw=True) ------------------------------


def test_correction_loss_gamma_reaches_the_exp_weights():
    states = (jnp.zeros(3), jnp.ones(3), 2 * jnp.ones(3))
    total, losses = jdeq.correction_loss(lambda z: jnp.sum(z), states, gamma=0.5)
    np.testing.assert_allclose(losses, [0.0, 3.0, 6.0])
    assert float(total) == pytest.approx(0.25 * 0 + 0.5 * 3 + 6)


def test_fixed_point_states_throw_raises():
    f = lambda z, a: 0.99 * z + a  # noqa: E731  far from converged in 3 steps
    z0, a = jnp.zeros((2, 3)), jnp.ones((2, 3))
    with pytest.raises(RuntimeError, match="did not converge"):
        jax.block_until_ready(jdeq.fixed_point_states(
            f, z0, a, states=2, solver=jdeq.FixedPointIteration(maxiter=3), throw=True).value)
    jdeq.fixed_point_states(f, z0, a, states=2, solver=jdeq.FixedPointIteration(maxiter=3))


# ---- Solver: stop_mode and trace ("rel" tests ||f(z)-z|| / ||f(z)||, "abs" ||f(z)-z||) ----------


def _halving(z, c):
    return 0.5 * z + c  # from 0: residual of the k-th iterate ||c|| 0.5^k, ||f(z_k)|| ~ 2||c||


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_solver_trace_records_the_residual_of_its_stop_mode(stop_mode):
    c = jnp.full((2, 3), 10.0)
    sol = jdeq.fixed_point(_halving, jnp.zeros_like(c), c,
                           solver=jdeq.FixedPointIteration(tol=1e-30, maxiter=6, stop_mode=stop_mode, trace=True))
    k = np.arange(6)
    abs_res = np.sqrt(3) * 10.0 * 0.5 ** k
    f_norm = np.sqrt(3) * 10.0 * (2 - 0.5 ** k)  # ||f(z_k)|| = ||z_{k+1}||, z_k = 2c(1 - 0.5^k)
    want = abs_res if stop_mode == "abs" else abs_res / f_norm
    np.testing.assert_allclose(np.asarray(sol.stats.trace), np.broadcast_to(want, (2, 6)), rtol=1e-5)
    assert jdeq.fixed_point(_halving, jnp.zeros_like(c), c, solver=jdeq.FixedPointIteration(
        tol=1e-30, maxiter=6, stop_mode=stop_mode)).stats.trace is None


def test_solver_stop_mode_decides_when_an_example_stops():
    c = jnp.full((2, 3), 1e4)  # large values: rel 1e-3 is reached long before abs 1e-3
    run = lambda mode: jdeq.fixed_point(_halving, jnp.zeros_like(c), c, solver=jdeq.FixedPointIteration(  # noqa: E731
        tol=1e-3, maxiter=200, stop_mode=mode)).stats
    rel, absolute = run("rel"), run("abs")
    assert bool(rel.converged.all()) and bool(absolute.converged.all())
    assert float(rel.rel_residual.max()) < 1e-3 and float(rel.abs_residual.min()) > 1e-3
    assert float(absolute.abs_residual.max()) < 1e-3
    assert int(absolute.nsteps.min()) > int(rel.nsteps.max()) + 10


# ---- ReversibleIteration(beta): "y <- (1 - beta) y + beta f(z), z <- (1 - beta) z + beta f(y)" --


@pytest.mark.parametrize("gradient", [jdeq.Reversible(), jdeq.Implicit()], ids=["reversible", "implicit"])
@pytest.mark.parametrize("beta", [0.3, 0.8])
def test_reversible_iteration_follows_the_documented_coupled_step(beta, gradient):
    f = lambda z, a: 0.5 * jnp.tanh(z) + a  # noqa: E731
    a = jnp.array([[1.0, -0.5, 0.2]])
    # maxiter=5 evaluations: f(z0), then two steps of two evaluations each
    sol = jdeq.fixed_point(f, jnp.zeros_like(a), a, gradient=gradient,
                           solver=jdeq.ReversibleIteration(beta=beta, tol=1e-30, maxiter=5))
    y = z = jnp.zeros_like(a)
    for _ in range(2):
        y = (1 - beta) * y + beta * f(z, a)
        z = (1 - beta) * z + beta * f(y, a)
    np.testing.assert_array_equal(sol.stats.nsteps, 5)
    np.testing.assert_allclose(sol.value, f(z, a), rtol=1e-6)  # f at the last (best) iterate


# ---- initial_states: "normal" is N(0, scale^2); "mixed" draws the first ceil(batch / 2) ------------


@pytest.mark.parametrize("scale", [3.0])
def test_initial_states_scale_is_the_standard_deviation(scale):
    z = jdeq.initial_states("normal", jnp.zeros((2000, 8)), jax.random.key(0), scale=scale)
    assert float(jnp.std(z)) == pytest.approx(scale, rel=0.03)
    mixed = jdeq.initial_states("mixed", jnp.zeros((5, 400)), jax.random.key(1), scale=scale)
    assert bool((mixed[3:] == 0).all()) and bool((mixed[:3] != 0).all())
    assert float(jnp.std(mixed[:3])) == pytest.approx(scale, rel=0.05)


# ---- fixed_point's value: "maxiter=L plain iterations apply f exactly L times" -------------------


@pytest.mark.parametrize("gradient", [jdeq.Implicit(), jdeq.Unrolled()], ids=["while_loop", "scan"])
def test_maxiter_plain_iterations_apply_f_exactly_that_many_times(gradient):
    c = jnp.array([[1.0, -2.0, 0.5]])
    z = jnp.array([[0.3, 0.1, -0.4]])
    sol = jdeq.fixed_point(_halving, z, c, solver=jdeq.FixedPointIteration(tol=1e-30, maxiter=4), gradient=gradient)
    for _ in range(4):
        z = _halving(z, c)
    np.testing.assert_array_equal(sol.stats.nsteps, 4)
    np.testing.assert_allclose(sol.value, z, rtol=1e-6)


def _constant_mixer(out, memory=3):
    """A mixer whose output is ``out`` whatever its features (zero hidden layer, bias ``out``)."""
    mixer = jdeq.init_mixer(jax.random.key(0), memory=memory)
    return {**mixer, "w1": jnp.zeros_like(mixer["w1"]), "b2": jnp.asarray(out, mixer["b2"].dtype)}


def test_hyper_anderson_update_is_the_documented_correction_of_andersons_weights():
    """``z_{k+1} = sum_i (alpha_i + delta_i) f_i`` (damping 1, step logit 0), ``delta`` the
    mixer's first ``m`` outputs through tanh, newest slot first, minus their mean over the filled
    slots. With a constant mixer output and the same history, the update minus plain Anderson's
    is ``sum_i delta_i f_i``, slot by slot."""
    f, c = _hyper_problem()
    out = jnp.array([0.6, -0.2, 0.3, 0.0])  # (newest, middle, oldest) corrections, step logit
    hyper = jdeq.HyperAnderson(params=_constant_mixer(out), memory=3, safeguard=False)
    plain = jdeq.Anderson(memory=3)
    zs = [jnp.full_like(c, 0.3), jnp.full_like(c, -0.1), jnp.full_like(c, 0.2)]
    sh, sp = hyper.init(zs[0]), plain.init(zs[0])
    for k, z in enumerate(zs, start=1):  # the same three iterates into both histories
        new_h, sh = jax.jit(hyper.update, static_argnums=1)(sh, k, z, f(z, c))
        new_p, sp = jax.jit(plain.update, static_argnums=1)(sp, k, z, f(z, c))
    xs, gs = sh[0], sh[1]  # ring slots (batch, m, dim); iterate k sits in slot k - 1
    d_age = jnp.tanh(out[:3]) - jnp.mean(jnp.tanh(out[:3]))
    delta = d_age[::-1]  # slots 0, 1, 2 hold the oldest, middle, newest iterate
    want = new_p + jnp.einsum("m,bmd->bd", delta, xs + gs)
    np.testing.assert_allclose(new_h, want, rtol=1e-5, atol=1e-6)


def test_hyper_anderson_safeguard_counts_an_equal_residual_as_not_lowered():
    """"Once a learned step does not lower the residual": a residual equal to the previous one
    (exactly 5 here: g = (3, 4, 0, ...)) already switches the example to plain Anderson."""
    solver = jdeq.HyperAnderson(params=_trained_mixer(), memory=3)
    z = jnp.zeros((2, 6))
    fz = jnp.zeros((2, 6)).at[:, 0].set(3.0).at[:, 1].set(4.0)
    xs, gs, gram, _, _, _ = solver.init(z)
    state = (xs, gs, gram, jnp.full((2,), 5.0), jnp.ones(2, bool), jnp.ones(2, bool))
    new, _ = jax.jit(solver.update, static_argnums=1)(state, 1, z, fz)
    plain = jdeq.Anderson(memory=3)
    want, _ = jax.jit(plain.update, static_argnums=1)(plain.init(z), 1, z, fz)
    np.testing.assert_allclose(new, want, rtol=1e-6)


# ---- splittings: a prox that uses its step; the guaranteed rate, where it is tight -------------


def _soft_threshold_problem(lam=0.3):
    """``g = lam * ||z||_1`` (its prox is soft-thresholding by ``alpha * lam``: it uses the step),
    ``W = 0.5 I + S`` with ``S`` skew, so ``<(I - W) v, v> = 0.5 ||v||^2``."""
    b = jax.random.normal(jax.random.key(5), (4, 4), jnp.float64)
    W = 0.5 * jnp.eye(4) + 0.3 * (b - b.T)
    prox = lambda v, alpha: jnp.sign(v) * jnp.maximum(jnp.abs(v) - alpha * lam, 0.0)  # noqa: E731
    problem = jdeq.MonotoneProblem(
        linear=lambda z, w: z @ w.T, monotonicity=0.5, prox=prox,
        lipschitz=lambda w: jnp.linalg.norm(jnp.eye(4) - w, 2),
        resolvent=(lambda alpha, w: jnp.linalg.inv((1 + alpha) * jnp.eye(4) - alpha * w),
                   lambda v, aux: v @ aux.T))
    return problem, W, prox


@pytest.mark.parametrize("splitting", [jdeq.ForwardBackward(), jdeq.PeacemanRachford()],
                         ids=["forward_backward", "peaceman_rachford"])
def test_splittings_pass_their_step_to_the_prox(x64, splitting):
    """The prox is called as ``prox(v, alpha)`` with the splitting's step: with an l1 term
    (soft-thresholding by ``alpha * lam``) both splittings reach the solution of
    ``0 in (I - W) z - c + lam d||z||_1``, checked as the fixed point of one forward-backward
    step of another size (0.37)."""
    problem, W, prox = _soft_threshold_problem()
    c = jnp.array([[1.0, -0.2, 0.05, -1.5], [0.3, 0.8, -0.6, 0.0]])
    sol = jdeq.monotone_fixed_point(problem, c, jnp.zeros_like(c), W, splitting=splitting,
                                    solver=jdeq.FixedPointIteration(tol=1e-13, maxiter=5000, stop_mode="abs"))
    z = sol.value
    a = 0.37
    np.testing.assert_allclose(z, prox(z - a * (z - z @ W.T - c), a), atol=1e-10)
    assert 0 < int(jnp.sum(z == 0)) < z.size  # the threshold is active somewhere, not everywhere


def test_forward_backward_contraction_is_tight_on_a_scaled_identity(x64):
    """``sqrt(1 - 2 a m + a^2 L^2)`` is the exact rate when ``I - W = m I`` (then ``L = m`` and
    the step is ``z <- (1 - a m) z + a c`` where the ReLU is inactive): the residual shrinks by
    exactly ``1 - a m`` per step."""
    m, a = 0.5, 0.5
    problem = jdeq.MonotoneProblem(linear=lambda z, w: z @ w.T, monotonicity=m, lipschitz=lambda w: m)
    W = (1 - m) * jnp.eye(3)
    splitting = jdeq.ForwardBackward(alpha=a)
    rate = float(splitting.contraction(problem, a, m))
    np.testing.assert_allclose(rate, 1 - a * m, rtol=1e-12)
    c = jnp.array([[1.0, 2.0, 3.0]])  # z* = c / m > 0: the ReLU never clips from z0 = c
    sol = jdeq.monotone_fixed_point(problem, c, c, W, splitting=splitting,
                                    solver=jdeq.FixedPointIteration(tol=1e-300, maxiter=8, stop_mode="abs", trace=True))
    tr = np.asarray(sol.stats.trace)[0]
    np.testing.assert_allclose(tr[1:] / tr[:-1], rate, rtol=1e-9)


def test_hyper_anderson_safeguard_keeps_learning_while_the_residual_falls():
    """The safeguard only acts on a learned step that did *not* lower the residual: after one
    that did (the previous residual was larger), the next step is learned again."""
    f, c = _hyper_problem()
    solver = jdeq.HyperAnderson(params=_trained_mixer(), memory=3, safeguard=True)
    z = jnp.full_like(c, 0.3)
    xs, gs, gram, _, _, _ = solver.init(z)
    fell = (xs, gs, gram, jnp.full(2, 1e9), jnp.ones(2, bool), jnp.ones(2, bool))
    new, state = jax.jit(solver.update, static_argnums=1)(fell, 1, z, f(z, c))
    plain = jdeq.Anderson(memory=3)
    want, _ = jax.jit(lambda z: plain.update(plain.init(z), 1, z, f(z, c)))(z)
    assert not np.allclose(new, want, rtol=1e-4)
    assert bool(state[-1].all())  # (and the state records a learned step)
