"""Fixed-point correction: every state equals jdeq.fixed_point with the state's budget (value,
and gradient through its phantom steps), budgets evenly spaced or explicit, traced maxiter under
jit, and the weights of the correction loss as documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq

N, D = 4, 6


def cell(z, p):
    return jnp.tanh(z @ p["W"] + p["x"])


def make_params(seed=0, scale=0.95):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(D, D))
    return {
        "W": jnp.asarray(scale * W / np.linalg.norm(W, 2), jnp.float32),
        "x": jnp.asarray(rng.normal(size=(N, D)), jnp.float32),
    }


def reference(solver, gradient=jdeq.Implicit()):
    """jdeq.fixed_point with a run-time budget, compiled once for every budget."""
    return jax.jit(lambda p, m: jdeq.fixed_point(
        cell, jnp.zeros((N, D)), p, solver=solver, gradient=gradient, maxiter=m))


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # one program vs another: rounding


@pytest.mark.parametrize("solver", [jdeq.Anderson(tol=1e-7, maxiter=12),
                                    jdeq.FixedPointIteration(tol=1e-7, maxiter=12)])
def test_states_equal_fixed_point_with_each_budget(solver):
    p = make_params()
    z0 = jnp.zeros((N, D))
    sol = jax.jit(lambda p: jdeq.fixed_point_states(cell, z0, p, states=3, solver=solver))(p)
    assert len(sol.value) == 3
    ref = reference(solver)
    for state, budget in zip(sol.value, (4, 8, 12)):  # ceil(j * 12 / 3)
        close(state, ref(p, budget).value)
    full = ref(p, 12)
    np.testing.assert_array_equal(sol.stats.nsteps, full.stats.nsteps)
    close(sol.stats.abs_residual, full.stats.abs_residual)
    # later budgets never have a larger residual
    res = [jnp.linalg.norm(cell(s, p) - s, axis=1) for s in sol.value]
    assert bool(jnp.all(res[2] <= res[0]))


def test_explicit_budgets_uneven_spacing_and_past_convergence():
    p = make_params()
    z0 = jnp.zeros((N, D))
    solver = jdeq.Anderson(tol=1e-3, maxiter=30)
    sol = jax.jit(lambda p: jdeq.fixed_point_states(cell, z0, p, states=(1, 3, 30),
                                                    solver=solver))(p)
    np.testing.assert_array_equal(sol.value[0], cell(z0, p))  # budget 1: f at the start
    ref = reference(solver)
    close(sol.value[1], ref(p, 3).value)
    final = ref(p, 30)
    assert int(final.stats.nsteps.max()) < 30  # converged earlier: last state is that iterate
    close(sol.value[2], final.value)


def test_budgets_may_be_integer_scalar_arrays():
    """``states`` as a sequence accepts integer scalar arrays (e.g. from ``jnp.arange``) as well
    as Python ints: the same snapshots."""
    p = make_params()
    z0 = jnp.zeros((N, D))
    solver = jdeq.FixedPointIteration(tol=1e-6, maxiter=12)
    ints = jdeq.fixed_point_states(cell, z0, p, states=[2, 5, 12], solver=solver)
    arrays = jdeq.fixed_point_states(cell, z0, p, states=[jnp.int32(2), np.int64(5), jnp.asarray(12)],
                                     solver=solver)
    np.testing.assert_array_equal(arrays.value, ints.value)


def test_traced_maxiter_under_jit_and_pytree_state():
    p = make_params()

    def f(z, p):
        return {"a": cell(z["a"], p), "b": 0.5 * z["b"] + 1.0}

    z0 = {"a": jnp.zeros((N, D)), "b": jnp.zeros((N, 2))}
    run = jax.jit(lambda m: jdeq.fixed_point_states(f, z0, p, states=2, maxiter=m).value)
    ref_fn = jax.jit(lambda m: jdeq.fixed_point(f, z0, p, maxiter=m).value)
    for m in (6, 10):
        states = run(m)
        ref = ref_fn((m + 1) // 2)  # ceil(m / 2)
        for a, b in zip(jax.tree_util.tree_leaves(states[0]), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # jit vs eager rounding


def test_each_state_carries_its_phantom_gradient():
    p = make_params()
    z0 = jnp.zeros((N, D))
    solver = jdeq.Anderson(tol=1e-7, maxiter=10)
    grad_mode = jdeq.Phantom(steps=3, damping=0.7)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(N, D)), jnp.float32)
    # d/dp of sum_j w_j-weighted states, against the same through fixed_point(maxiter=n_j)
    g_states = jax.jit(jax.jacrev(lambda p: jnp.stack([jnp.sum(w * s) for s in
                       jdeq.fixed_point_states(cell, z0, p, states=2, solver=solver,
                                               gradient=grad_mode).value])))(p)
    ref = reference(solver, grad_mode)
    g_ref = jax.jit(jax.grad(lambda p, m: jnp.sum(w * ref(p, m).value)))
    for j, budget in enumerate((5, 10)):
        for a, b in zip(jax.tree_util.tree_leaves(g_states), jax.tree_util.tree_leaves(g_ref(p, budget))):
            np.testing.assert_allclose(a[j], b, rtol=1e-5, atol=1e-6)


def test_each_state_carries_the_implicit_gradient_of_its_solver():
    """gradient=jdeq.Implicit(): each state's backward is the forward solver's (its tol and
    iteration, as in jdeq.fixed_point), at that state."""
    p = make_params(scale=0.8)
    z0 = jnp.zeros((N, D))
    solver = jdeq.Anderson(tol=1e-6, maxiter=40)
    w = jnp.asarray(np.random.default_rng(2).normal(size=(N, D)), jnp.float32)
    g_states = jax.jit(jax.jacrev(lambda p: jnp.stack([jnp.sum(w * s) for s in
                       jdeq.fixed_point_states(cell, z0, p, states=[20, 40], solver=solver,
                                               gradient=jdeq.Implicit()).value])))(p)
    g_ref = jax.jit(jax.grad(lambda p, m: jnp.sum(w * reference(solver)(p, m).value)))
    for j, budget in enumerate((20, 40)):
        for a, b in zip(jax.tree_util.tree_leaves(g_states), jax.tree_util.tree_leaves(g_ref(p, budget))):
            np.testing.assert_allclose(a[j], b, rtol=1e-5, atol=1e-6)


def test_correction_weights_as_documented():
    np.testing.assert_allclose(jdeq.correction_weights(4, "exp", gamma=0.5), [0.125, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(jdeq.correction_weights(4, "linear"), [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(jdeq.correction_weights(3, "const"), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(jdeq.correction_weights(1, "exp"), [1.0])


@pytest.mark.parametrize("kind", ["exp", "linear", "const"])
def test_correction_weights_are_float32_under_x64_too(x64, kind):
    """The documented ``(k,)`` float32 array, whatever the default dtypes are."""
    w = jdeq.correction_weights(4, kind)
    assert w.dtype == jnp.float32 and w.shape == (4,), (kind, w.dtype)


def test_correction_loss_is_the_weighted_sum_and_trains():
    p = make_params()
    y = jnp.ones((N, D)) * 0.3
    loss_fn = lambda z, y: jnp.mean((z - y) ** 2)

    states = jax.jit(lambda p: jdeq.fixed_point_states(
        cell, jnp.zeros((N, D)), p, states=3, solver=jdeq.Anderson(maxiter=9)).value)

    tot, losses = jdeq.correction_loss(loss_fn, states(p), y, weights="exp", gamma=0.8)
    assert losses.shape == (3,)
    np.testing.assert_allclose(tot, 0.64 * losses[0] + 0.8 * losses[1] + losses[2], rtol=1e-6)
    tot, losses = jdeq.correction_loss(loss_fn, states(p), y, weights=[0.0, 0.0, 2.0])
    np.testing.assert_allclose(tot, 2 * losses[2], rtol=1e-6)
    g = jax.jit(jax.grad(lambda p: jdeq.correction_loss(loss_fn, states(p), y, weights="linear")[0]))(p)
    assert all(bool(jnp.isfinite(x).all()) and float(jnp.abs(x).sum()) > 0
               for x in jax.tree_util.tree_leaves(g))


def test_bad_inputs_raise():
    p = make_params()
    z0 = jnp.zeros((N, D))
    with pytest.raises(ValueError, match="states"):
        jdeq.fixed_point_states(cell, z0, p, states=0)
    with pytest.raises(ValueError, match="strictly increasing"):
        jdeq.fixed_point_states(cell, z0, p, states=(4, 2))
    with pytest.raises(TypeError, match="states"):
        jdeq.fixed_point_states(cell, z0, p, states="two")
    with pytest.raises(TypeError, match="gradient"):
        jdeq.fixed_point_states(cell, z0, p, gradient=jdeq.Unrolled())
    with pytest.raises(TypeError) as e:
        jdeq.fixed_point_states(cell, z0, p, solver="anderson")
    assert str(e.value) == ("`solver` must be a jdeq.Solver run in jdeq's own loop (FixedPointIteration, Anderson, "
                            "Broyden or a subclass) for fixed_point_states, got 'anderson'.")
    with pytest.raises(ValueError, match="kind"):
        jdeq.correction_weights(3, "cosine")
    with pytest.raises(ValueError, match="gamma"):
        jdeq.correction_weights(3, "exp", gamma=1.5)
    with pytest.raises(ValueError, match="num_states"):
        jdeq.correction_weights(0)
    with pytest.raises(ValueError, match="one entry per state"):
        jdeq.correction_loss(lambda z: jnp.sum(z), (z0, z0), weights=[1.0])
    with pytest.raises(ValueError, match="at least one"):
        jdeq.correction_loss(lambda z: jnp.sum(z), ())


@pytest.mark.parametrize("states,maxiter,budgets", [
    (3, 10, (4, 7, 10)),  # ceil(j * 10 / 3): 10 / 3 leaves 1, where rounding up matters
    (4, 9, (3, 5, 7, 9)),
    (1, 10, (10,)),  # one state: the ordinary z* after the whole budget
])
def test_evenly_spaced_budgets_round_up(states, maxiter, budgets):
    p = make_params()
    z0 = jnp.zeros((N, D))
    solver = jdeq.FixedPointIteration(tol=1e-7, maxiter=40)
    sol = jdeq.fixed_point_states(cell, z0, p, states=states, solver=solver, maxiter=maxiter)
    ref = reference(solver)
    assert len(sol.value) == states
    for state, budget in zip(sol.value, budgets):
        close(state, ref(p, budget).value)


def test_default_is_two_states_and_a_maxiter_override_bounds_the_solve():
    """``states`` defaults to 2, and a run-time ``maxiter`` is the budget of the whole solve
    (not only of the last snapshot): its stats are those of fixed_point(maxiter=...)."""
    p = make_params()
    z0 = jnp.zeros((N, D))
    solver = jdeq.FixedPointIteration(tol=1e-7, maxiter=40)
    sol = jdeq.fixed_point_states(cell, z0, p, solver=solver, maxiter=7)
    assert len(sol.value) == 2
    full = reference(solver)(p, 7)
    np.testing.assert_array_equal(sol.stats.nsteps, [7] * N)
    np.testing.assert_array_equal(sol.stats.nsteps, full.stats.nsteps)
    close(sol.stats.abs_residual, full.stats.abs_residual)
    close(sol.value[0], reference(solver)(p, 4).value)  # ceil(7 / 2)


@pytest.mark.parametrize("solver", [jdeq.FixedPointIteration(tol=1e-6, maxiter=30),
                                    jdeq.Anderson(tol=1e-6, maxiter=30),
                                    jdeq.Broyden(tol=1e-6, maxiter=30)])
def test_an_example_that_meets_nan_matches_fixed_point_and_gets_a_zero_gradient(solver):
    """Row 0 meets NaN in the solve (f is NaN past z = 1.5). Each state is still what
    jdeq.fixed_point returns with its budget: before the NaN, f(z_b); after it, z_b itself
    (FixedPointIteration: 0, 1, 1.5, 1.75, then NaN: budget 3 gives 1.75, budget 4 gives 1.5).
    Every state's phantom gradient gives row 0 an exact zero, row 1 keeps its gradient. One
    phantom step from row 0's last state (1.5) stays finite (f(1.5) = 1.75), so only the
    forward solve's flag can zero it."""

    def nan_above(z, args):  # 0.5 z + a, NaN wherever z > thr
        a, thr = args
        return jnp.where(z > thr, jnp.nan, 0.5 * z + a)

    thr = jnp.asarray([[1.5] * 3, [10.0] * 3])
    z0, a = jnp.zeros((2, 3)), jnp.ones((2, 3))
    budgets = (3, 4, 30)

    def total(a):
        sol = jdeq.fixed_point_states(nan_above, z0, (a, thr), states=budgets, solver=solver,
                                      gradient=jdeq.Phantom(steps=1))
        return sum(jnp.sum(s) for s in sol.value), sol

    (_, sol), g = jax.value_and_grad(total, has_aux=True)(a)
    np.testing.assert_array_equal(sol.stats.nonfinite, [True, False])
    for state, budget in zip(sol.value, budgets):
        ref = jdeq.fixed_point(nan_above, z0, (a, thr), solver=solver, maxiter=budget).value
        np.testing.assert_array_equal(state[0], ref[0])
        close(state[1], ref[1])
    if isinstance(solver, jdeq.FixedPointIteration):
        np.testing.assert_array_equal(sol.value[0][0], 1.75)
        np.testing.assert_array_equal(sol.value[1][0], 1.5)
    np.testing.assert_array_equal(g[0], 0.0)
    assert np.isfinite(g[1]).all() and float(jnp.abs(g[1]).min()) > 0.1


@pytest.mark.parametrize("kind,expected", [("linear", [1 / 3, 2 / 3, 1.0]), ("const", [1.0, 1.0, 1.0])])
def test_correction_loss_uses_the_named_weights(kind, expected):
    losses = jnp.asarray([1.0, 2.0, 4.0])
    total, out = jdeq.correction_loss(lambda s: s, tuple(losses), weights=kind)
    np.testing.assert_array_equal(out, losses)
    np.testing.assert_allclose(total, np.dot(expected, [1.0, 2.0, 4.0]), rtol=1e-6)


def test_correction_loss_keeps_the_losses_dtype():
    """float16 losses give a float16 total; under x64, float64 losses are weighted by the
    explicit weights as given (0.1 not rounded to float32's 0.100000001)."""
    states = (jnp.asarray(1.0, jnp.float16), jnp.asarray(3.0, jnp.float16))
    total, losses = jdeq.correction_loss(lambda s: s, states)
    assert total.dtype == losses.dtype == jnp.float16
    np.testing.assert_allclose(float(total), 0.8 * 1.0 + 3.0, rtol=1e-3)  # float16 rounding
    with jax.enable_x64(True):
        states = (jnp.asarray(1.0, jnp.float64), jnp.asarray(3.0, jnp.float64))
        total, _ = jdeq.correction_loss(lambda s: s, states, weights=[0.1, 1.0])
        assert total.dtype == jnp.float64
        assert float(total) == 0.1 + 3.0


@pytest.mark.parametrize("gamma", [0.5, np.float64(0.5)])
def test_exp_weights_are_float32_whatever_gamma_is(x64, gamma):
    """gamma as a Python float or a numpy float64 (x64 on): still float32."""
    w = jdeq.correction_weights(3, "exp", gamma=gamma)
    assert w.dtype == jnp.float32
    np.testing.assert_array_equal(w, [0.25, 0.5, 1.0])


def test_states_of_a_cell_closing_over_its_weights_get_their_gradient(x64):
    """``fixed_point_states`` with a cell that closes over traced weights: each state's
    gradient is the one it gets with the weights passed as ``args``."""
    w = 0.3 * jnp.asarray(np.random.default_rng(0).normal(size=(3, 3)))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3)))
    solver = jdeq.FixedPointIteration(tol=1e-12, maxiter=60)

    def total(states):
        return sum(jnp.sum(jnp.sin(s)) for s in states.value)

    def closing(w):
        return total(jdeq.fixed_point_states(lambda z, x: jnp.tanh(z @ w + x), jnp.zeros_like(x), x,
                                             states=3, solver=solver))

    def passing(w):
        return total(jdeq.fixed_point_states(lambda z, a: jnp.tanh(z @ a[0] + a[1]), jnp.zeros_like(x), (w, x),
                                             states=3, solver=solver))

    g_closing, g_passing = jax.grad(closing)(w), jax.grad(passing)(w)
    assert bool(jnp.any(g_passing != 0))
    np.testing.assert_allclose(g_closing, g_passing, rtol=1e-10, atol=1e-14)
