"""Gradient modes: Implicit against finite differences and against autodiff of a long unrolled
solve (every backward solver), Phantom approaching Implicit, JacobianFree = Phantom(1, 1),
Unrolled = autodiff of the hand-written loop, composition with jit / vmap / grad / jvp, and
Implicit's backward-stats callback."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jdeq

N, D, IN = 3, 4, 2


def cell(z, p):
    """A small tanh cell with input injection; contractive (||W|| = 0.5)."""
    return jnp.tanh(z @ p["W"].T + p["x"] @ p["U"].T + p["c"])


def make_params(seed=0, dtype=np.float64, w_norm=0.5):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(D, D))
    W = w_norm * W / np.linalg.norm(W, 2)
    p = {
        "W": W,
        "U": rng.normal(size=(D, IN)),
        "c": 0.3 * rng.normal(size=(D,)),
        "x": rng.normal(size=(N, IN)),
    }
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), p)


def readout(z, seed=1):
    w = jnp.asarray(np.random.default_rng(seed).normal(size=(N, D)), z.dtype)
    return jnp.sum(jnp.sin(z) * w)


# Plain iteration: by far the cheapest solver to compile, which keeps this file fast.
TIGHT = jdeq.FixedPointIteration(tol=1e-13, maxiter=300, stop_mode="abs")


@functools.partial(jax.jit, static_argnums=(1, 2))
def loss(p, gradient, solver=TIGHT):
    z = jdeq.fixed_point(cell, jnp.zeros((N, D), p["W"].dtype), p, solver=solver, gradient=gradient).value
    return readout(z)


def _flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(tree)])


def _rel_err(a, b):
    a, b = _flat(a), _flat(b)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def unrolled_grad():
    """Reference: reverse-mode autodiff through 120 plain iterations (float64)."""
    with jax.enable_x64(True):
        p = make_params()
        ref = jdeq.FixedPointIteration(tol=1e-15, maxiter=120, stop_mode="abs")
        g = jax.grad(loss)(p, jdeq.Unrolled(), ref)
        return jax.tree_util.tree_map(np.asarray, g)


# ----------------------------------------------------------------------------- implicit


def test_implicit_matches_finite_differences(x64):
    p = make_params()
    grad_fn = functools.partial(loss, gradient=jdeq.Implicit())
    check_grads(grad_fn, (p,), order=2, modes=("fwd", "rev"), eps=1e-5, atol=1e-6, rtol=1e-6)


BACKWARD = {
    "forward-algorithm": jdeq.Implicit(),
    "broyden": jdeq.Implicit(solver=jdeq.Broyden(tol=1e-13, maxiter=100, stop_mode="abs")),
    "gmres": jdeq.Implicit(solver="gmres", tol=1e-13),
    "bicgstab": jdeq.Implicit(solver="bicgstab", tol=1e-13),
    "normal_cg": jdeq.Implicit(solver="normal_cg", tol=1e-13),
}


@pytest.mark.parametrize("name", sorted(BACKWARD))
def test_implicit_matches_unrolled_for_every_backward_solver(x64, unrolled_grad, name):
    p = make_params()
    g = jax.grad(loss)(p, BACKWARD[name])
    err = _rel_err(g, unrolled_grad)
    assert err < 1e-11, (name, err)
    # The unrolled reference really differs from a wrong (e.g. one-step) gradient.
    assert _rel_err(jax.grad(loss)(p, jdeq.JacobianFree()), unrolled_grad) > 1e-2


def test_phantom_approaches_implicit_as_steps_grow(x64, unrolled_grad):
    p = make_params()
    errs = [_rel_err(jax.grad(loss)(p, jdeq.Phantom(steps=k)), unrolled_grad) for k in (1, 3, 10, 30)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 1e-1 and errs[-1] < 1e-10, errs


def test_damped_phantom_approaches_implicit(x64, unrolled_grad):
    p = make_params()
    err = _rel_err(jax.grad(loss)(p, jdeq.Phantom(steps=20, damping=0.6)), unrolled_grad)
    assert err < 1e-5, err


def test_jacobian_free_equals_one_undamped_phantom_step(x64):
    p = make_params()
    g1 = jax.grad(loss)(p, jdeq.JacobianFree())
    g2 = jax.grad(loss)(p, jdeq.Phantom(steps=1, damping=1.0))
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)
    # ... which is the gradient of one application of the cell at z* (treated as a constant).
    z_star = jdeq.fixed_point(cell, jnp.zeros((N, D)), p, solver=TIGHT).value
    g3 = jax.grad(lambda p: readout(cell(z_star, p)))(p)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g3)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("gradient", [jdeq.Implicit(), jdeq.Phantom(steps=3), jdeq.JacobianFree(), jdeq.Unrolled()],
                         ids=["implicit", "phantom", "jfb", "unrolled"])
def test_value_is_z_star_for_every_gradient(x64, gradient):
    p = make_params()
    solver = jdeq.FixedPointIteration(tol=1e-12, maxiter=60, stop_mode="abs")
    ref = jdeq.fixed_point(cell, jnp.zeros((N, D)), p, solver=solver).value
    sol = jdeq.fixed_point(cell, jnp.zeros((N, D)), p, solver=solver, gradient=gradient)
    np.testing.assert_allclose(sol.value, ref, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- unrolled


@pytest.mark.parametrize("damping", [1.0, 0.7])
def test_unrolled_equals_autodiff_of_the_handwritten_loop(x64, unrolled_grad, damping):
    p = make_params()
    maxiter = 8
    # tol so small that no example ever stops early: all maxiter evaluations happen and, the
    # map being contractive, the last iterate is the lowest-residual one.
    solver = jdeq.FixedPointIteration(tol=1e-300, maxiter=maxiter, damping=damping, stop_mode="abs")

    def by_jdeq(p):
        sol = jdeq.fixed_point(cell, jnp.zeros((N, D)), p, solver=solver, gradient=jdeq.Unrolled())
        return readout(sol.value), sol.stats

    def by_hand(p):
        z = jnp.zeros((N, D))
        for _ in range(maxiter - 1):  # the first evaluation is at z0; maxiter in all
            z = z + damping * (cell(z, p) - z)
        return readout(cell(z, p))  # the value is f at the last (lowest-residual) iterate

    (v1, stats), g1 = jax.value_and_grad(by_jdeq, has_aux=True)(p)
    v2, g2 = jax.value_and_grad(by_hand)(p)
    np.testing.assert_array_equal(stats.nsteps, maxiter)
    np.testing.assert_allclose(v1, v2, rtol=1e-13)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)
    # Not yet converged after 8 steps: the unrolled gradient differs from the implicit one.
    assert _rel_err(g1, unrolled_grad) > 1e-4


def test_unrolled_anderson_matches_implicit_when_converged(x64, unrolled_grad):
    p = make_params()
    g = jax.grad(loss)(p, jdeq.Unrolled(), jdeq.Anderson(tol=1e-14, maxiter=40, stop_mode="abs", memory=2))
    assert _rel_err(g, unrolled_grad) < 1e-10


# ----------------------------------------------------------------------------- composition


def test_jvp_through_implicit_matches_finite_differences(x64):
    p = make_params()
    t = jax.tree_util.tree_map(lambda a: jnp.asarray(np.random.default_rng(7).normal(size=a.shape)), p)
    gradient = jdeq.Implicit()

    @jax.jit
    def z_of(p):
        return jdeq.fixed_point(cell, jnp.zeros((N, D)), p, solver=TIGHT, gradient=gradient).value

    z, dz = jax.jvp(z_of, (p,), (t,))
    eps = 1e-6
    shift = lambda s: jax.tree_util.tree_map(lambda a, b: a + s * b, p, t)  # noqa: E731
    fd = (z_of(shift(eps)) - z_of(shift(-eps))) / (2 * eps)
    np.testing.assert_allclose(dz, fd, rtol=1e-6, atol=1e-8)
    assert np.abs(np.asarray(dz)).max() > 1e-2
    # jvp and vjp agree (the linear solve is transposed, not re-derived).
    _, vjp = jax.vjp(z_of, p)
    w = jnp.asarray(np.random.default_rng(8).normal(size=(N, D)))
    lhs = jnp.vdot(w, dz)
    rhs = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(vjp(w)[0]), jax.tree_util.tree_leaves(t)))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10)


def test_hessian_vector_product_matches_finite_differences(x64):
    p = make_params()
    g_fn = jax.grad(lambda p: loss(p, jdeq.Implicit()))
    t = jax.tree_util.tree_map(lambda a: jnp.asarray(np.random.default_rng(9).normal(size=a.shape)), p)
    _, hvp = jax.jvp(g_fn, (p,), (t,))  # forward-over-reverse
    eps = 1e-5
    shift = lambda s: jax.tree_util.tree_map(lambda a, b: a + s * b, p, t)  # noqa: E731
    fd = jax.tree_util.tree_map(lambda a, b: (a - b) / (2 * eps), g_fn(shift(eps)), g_fn(shift(-eps)))
    assert _rel_err(hvp, fd) < 1e-6


def test_vmap_jit_grad_compose(x64):
    gradient = jdeq.Implicit()
    ps = [make_params(seed) for seed in range(3)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ps)

    def loss_p(p):
        return loss(p, gradient)

    # vmap over an extra leading axis of args: same as solving each problem separately.
    vals = jax.vmap(loss_p)(stacked)
    np.testing.assert_allclose(vals, [loss_p(p) for p in ps], rtol=1e-12)
    # jit(grad(...)) and grad(vmap(...)) give the per-problem gradients.
    g_each = [jax.jit(jax.grad(loss_p))(p) for p in ps]
    g_vmap = jax.grad(lambda s: jnp.sum(jax.vmap(loss_p)(s)))(stacked)
    for i, g in enumerate(g_each):
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_vmap)):
            np.testing.assert_allclose(b[i], a, rtol=1e-10, atol=1e-13)


def test_vmap_keeps_per_example_stats(x64):
    ps = [make_params(seed, w_norm=w) for seed, w in [(0, 0.2), (1, 0.9)]]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ps)
    solver = jdeq.FixedPointIteration(tol=1e-10, maxiter=500, stop_mode="abs")
    run = jax.jit(lambda p: jdeq.fixed_point(cell, jnp.zeros((N, D)), p, solver=solver))
    batched = jax.jit(jax.vmap(run))(stacked)
    for i, p in enumerate(ps):
        alone = run(p)
        np.testing.assert_array_equal(batched.stats.nsteps[i], alone.stats.nsteps)
        np.testing.assert_allclose(batched.value[i], alone.value, rtol=1e-13, atol=1e-15)


def test_gradient_of_dict_state(x64):
    p = make_params()

    def f_dict(t, p):
        z = cell(jnp.concatenate([t["a"], t["b"].reshape(N, -1)], axis=1), p)
        return {"a": z[:, :1], "b": z[:, 1:].reshape(N, 3, 1)}

    def loss_dict(p):
        z0 = {"a": jnp.zeros((N, 1)), "b": jnp.zeros((N, 3, 1))}
        t = jdeq.fixed_point(f_dict, z0, p, solver=TIGHT).value
        return readout(jnp.concatenate([t["a"], t["b"].reshape(N, -1)], axis=1))

    g1, g2 = jax.grad(loss_dict)(p), jax.grad(loss)(p, jdeq.Implicit())
    assert _rel_err(g1, g2) < 1e-10


def test_float32_gradients_run_and_roughly_agree():
    p = make_params(dtype=np.float32)
    solver = jdeq.FixedPointIteration(tol=1e-6, maxiter=100)
    g_imp = jax.grad(loss)(p, jdeq.Implicit(), solver)
    g_unr = jax.grad(loss)(p, jdeq.Unrolled(), jdeq.FixedPointIteration(tol=1e-7, maxiter=60))
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(g_imp))
    assert _rel_err(g_imp, g_unr) < 1e-4


def test_no_gradient_reaches_z0(x64):
    p = make_params()

    def from_z0(z0):
        return readout(jdeq.fixed_point(cell, z0, p, solver=TIGHT).value)

    g = jax.grad(from_z0)(jnp.ones((N, D)))
    np.testing.assert_array_equal(g, 0.0)


# ----------------------------------------------------------------------------- callback


def test_implicit_callback_reports_backward_stats(x64):
    seen = []
    gradient = jdeq.Implicit(tol=1e-10, stop_mode="abs", callback=seen.append)
    p = make_params()
    g = jax.jit(jax.grad(loss, argnums=0), static_argnums=1)(p, gradient)
    jax.block_until_ready(g)
    assert len(seen) == 1
    st = seen[0]
    assert np.asarray(st.nsteps).shape == (N,)
    assert (np.asarray(st.nsteps) >= 1).all()
    assert (np.asarray(st.abs_residual) < 1e-10).all()
    assert bool(np.asarray(st.converged).all())
    # A second backward pass calls it once more.
    jax.block_until_ready(jax.jit(jax.grad(loss, argnums=0), static_argnums=1)(p, gradient))
    assert len(seen) == 2


@pytest.mark.parametrize("backward", [None, "bicgstab"])
def test_implicit_callback_shows_non_converged_backward(x64, backward):
    seen = []
    gradient = jdeq.Implicit(solver=backward, maxiter=2, tol=1e-12, callback=seen.append)
    p = make_params(w_norm=0.95)
    jax.block_until_ready(jax.grad(loss)(p, gradient))
    assert len(seen) == 1
    assert not bool(np.asarray(seen[0].converged).any())
    assert not bool(np.asarray(seen[0].nonfinite).any())  # not converged, yet finite
    if backward is None:
        np.testing.assert_array_equal(seen[0].nsteps, 2)


@pytest.mark.parametrize("backward", ["gmres", "bicgstab"])
def test_implicit_callback_rel_residual_is_relative_to_the_cotangent(x64, backward):
    """With jaxopt's linear solvers, the callback's ``rel_residual`` is ``abs_residual / ||b||``
    per example, ``b`` the cotangent of ``z*`` (here ``c``, rows of very different norms, as
    ``loss = sum(c * z*)`` gives). (jdeq's own solvers report their fixed-point residual
    relative to ``||f(u)||``, as in the forward solve.)"""
    seen = []
    gradient = jdeq.Implicit(solver=backward, maxiter=3, tol=1e-12, callback=seen.append)
    p = make_params(w_norm=0.95)
    c = jnp.asarray(np.random.default_rng(3).normal(size=(N, D))) * jnp.array([1e-3, 1.0, 1e3])[:N, None]

    def weighted(p):
        z = jdeq.fixed_point(cell, jnp.zeros((N, D)), p, gradient=gradient).value
        return jnp.sum(c * z)

    jax.block_until_ready(jax.grad(weighted)(p))
    (st,) = seen
    np.testing.assert_allclose(st.rel_residual, st.abs_residual / np.linalg.norm(c, axis=1), rtol=1e-6)


def test_unrolled_runs_the_run_time_budget():
    """``fixed_point(..., gradient=jdeq.Unrolled(), maxiter=4)`` unrolls 4 evaluations, not the
    solver's 50: the same value and stats as the while loop with that budget."""
    f = lambda z, a: 0.5 * jnp.tanh(z) + a  # noqa: E731
    a = jnp.linspace(-1.0, 1.0, N * D).reshape(N, D)
    solver = jdeq.FixedPointIteration(tol=1e-30, maxiter=50)
    run = lambda g: jdeq.fixed_point(f, jnp.zeros_like(a), a, solver=solver, gradient=g, maxiter=4)  # noqa: E731
    unrolled, loop = run(jdeq.Unrolled()), run(jdeq.Implicit())
    np.testing.assert_array_equal(unrolled.stats.nsteps, 4)
    np.testing.assert_allclose(unrolled.value, loop.value, rtol=1e-6)


@pytest.mark.parametrize("backward", ["bicgstab"])  # (gmres: maxiter counts restarts of 20
def test_a_linear_solvers_tol_is_implicits_own_else_the_forward_solvers(x64, backward):  # steps: exact here)
    """With a jaxopt linear solver, ``converged`` in the callback is ``rel_residual <= tol``
    for ``Implicit(tol=...)``'s tol, or the forward solver's when unset. One iteration
    (``maxiter=1``) leaves a relative residual well between 1e-12 and 0.9, so a tol of 1e-12
    reports every example unconverged and 0.9 every example converged, wherever it is set."""
    p = make_params()

    def converged(gradient, forward_tol):
        seen = []
        solver = jdeq.FixedPointIteration(tol=forward_tol, maxiter=200)
        gradient = dataclasses.replace(gradient, callback=seen.append, maxiter=1)
        jax.block_until_ready(jax.grad(loss)(p, gradient, solver))
        rel = np.asarray(seen[-1].rel_residual)
        assert (1e-10 < rel).all() and (rel < 0.5).all(), rel
        return np.asarray(seen[-1].converged)

    np.testing.assert_array_equal(converged(jdeq.Implicit(solver=backward, tol=1e-12), 0.9), False)
    np.testing.assert_array_equal(converged(jdeq.Implicit(solver=backward), 0.9), True)
    np.testing.assert_array_equal(converged(jdeq.Implicit(solver=backward), 1e-12), False)
    np.testing.assert_array_equal(converged(jdeq.Implicit(solver=backward, tol=0.9), 1e-12), True)


def test_a_linear_solvers_converged_holds_at_a_residual_equal_to_tol(x64):
    """``converged`` is ``rel_residual <= tol``: with one bicgstab iteration (whose result does
    not depend on a tol below its first residual), a tol equal to an example's residual counts
    that example converged, and one just below it does not."""
    p = make_params()

    def run(tol):
        seen = []
        gradient = jdeq.Implicit(solver="bicgstab", tol=tol, maxiter=1, callback=seen.append)
        jax.block_until_ready(jax.grad(loss)(p, gradient))
        return np.asarray(seen[-1].rel_residual), np.asarray(seen[-1].converged)

    rel, _ = run(1e-12)
    tie = float(rel.max())
    for tol, expected in [(tie, np.ones(N, bool)), (np.nextafter(tie, 0), rel < tie)]:
        rel_at, conv = run(tol)
        np.testing.assert_array_equal(rel_at, rel)  # (the same iterate: the tol did not change it)
        np.testing.assert_array_equal(conv, expected)


def test_an_unknown_linear_solver_name_is_refused_at_construction():
    with pytest.raises(ValueError) as e:
        jdeq.Implicit(solver="gmress")
    assert str(e.value) == ("`solver` must be None, a jdeq solver or one of ['bicgstab', 'gmres', "
                            "'normal_cg']; got 'gmress'.")


@pytest.mark.parametrize("gradient", [jdeq.Implicit(), jdeq.Phantom(steps=3), jdeq.JacobianFree()],
                         ids=["implicit", "phantom", "jfb"])
def test_attach_without_stats_takes_every_example_as_finite(x64, gradient):
    """``Gradient.attach`` with no forward stats (its default): every example keeps its
    gradient, the one ``fixed_point`` gives with that mode."""
    p = make_params()
    z_star = jax.lax.stop_gradient(jdeq.fixed_point(cell, jnp.zeros((N, D)), p, solver=TIGHT).value)
    attached = jax.grad(lambda p: readout(gradient.attach(cell, z_star, p, solver=TIGHT, maxiter=TIGHT.maxiter)))(p)
    np.testing.assert_allclose(_flat(attached), _flat(jax.grad(loss)(p, gradient)), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backward", ["gmres", "bicgstab"])
def test_a_linear_solvers_callback_stats_per_example(x64, backward):
    """With a jaxopt linear solver the callback gets one entry per example: ``nsteps`` is -1
    (jaxopt does not report it), and ``rel_residual`` keeps its 1e-30 floor positive for a
    cotangent of size ~1e-33."""
    p = make_params()
    seen = []
    gradient = jdeq.Implicit(solver=backward, callback=seen.append)
    jax.block_until_ready(jax.grad(lambda p: 1e-33 * loss(p, gradient))(p))
    (st,) = seen
    assert np.asarray(st.nsteps).shape == (N,) and st.nsteps.dtype == jnp.int32
    np.testing.assert_array_equal(st.nsteps, -1)
    assert (np.asarray(st.rel_residual) >= 0).all() and (np.asarray(st.abs_residual) > 0).any()


@pytest.mark.parametrize("backward", ["gmres", "bicgstab"])
def test_a_linear_solvers_callback_flags_the_examples_whose_forward_went_non_finite(x64, backward):
    """An example whose forward solve overflowed (``1e200 * z + 1`` from 0: 1, 1e200, inf) gets
    ``b = 0`` and ``x = 0`` in the backward solve (finite), and the callback still flags it
    non-finite and not converged; the other examples are finite and converged."""
    big = jnp.arange(N) == 0

    def f(z, p):
        return jnp.where(big[:, None], 1e200 * z + 1, cell(z, p))

    p = make_params()
    seen = []
    gradient = jdeq.Implicit(solver=backward, tol=1e-8, callback=seen.append)
    sol = jdeq.fixed_point(f, jnp.zeros((N, D)), p, solver=TIGHT)
    np.testing.assert_array_equal(sol.stats.nonfinite, big)
    g = jax.grad(lambda p: readout(jdeq.fixed_point(f, jnp.zeros((N, D)), p, solver=TIGHT, gradient=gradient).value))(p)
    (st,) = seen
    assert st.nonfinite.shape == (N,)
    np.testing.assert_array_equal(st.nonfinite, big)
    np.testing.assert_array_equal(st.converged, ~big)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g))


def test_a_non_finite_adjoint_of_jaxopts_solvers_zeroes_every_example(x64):
    """The documented limit: jaxopt's linear solvers treat the batch as one system, so one
    example with a singular adjoint system (``f = z + a``: ``I - J = 0``; its forward stays
    finite within the budget) makes GMRES's solution non-finite for every example. Every
    example is then flagged and gets a zero cotangent: a finite, zero gradient."""
    row0 = jnp.arange(N) == 0
    w = 0.1 * jnp.asarray(np.random.default_rng(0).normal(size=(D, D)))

    def f(z, a):
        return jnp.where(row0[:, None], z + a, jnp.tanh(z @ w) + a)

    seen = []
    gradient = jdeq.Implicit(solver="gmres", tol=1e-8, callback=seen.append)
    solver = jdeq.FixedPointIteration(maxiter=5, tol=1e-8)
    run = lambda a: jdeq.fixed_point(f, jnp.zeros((N, D)), a, solver=solver, gradient=gradient)  # noqa: E731
    a = jnp.ones((N, D))
    assert not bool(run(a).stats.nonfinite.any())
    g = jax.grad(lambda a: run(a).value.sum())(a)
    (st,) = seen
    np.testing.assert_array_equal(st.nonfinite, True)
    np.testing.assert_array_equal(st.converged, False)
    np.testing.assert_array_equal(g, 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlagsTheFirstExample(jdeq.FixedPointIteration):
    """A user's solver whose stats flag example 0 non-finite as an int32 0/1 array (its
    values stay finite)."""

    def solve(self, F, z0, maxiter=None, **kw):
        zm, stats, *rest = super().solve(F, z0, maxiter, **kw)
        flag = (jnp.arange(zm.shape[0]) == 0).astype(jnp.int32)
        return (zm, dataclasses.replace(stats, nonfinite=flag), *rest)


@pytest.mark.parametrize("gradient", [jdeq.Implicit(), jdeq.Phantom(steps=3)], ids=["implicit", "phantom"])
def test_an_example_the_solver_flags_non_finite_adds_nothing_whatever_the_flags_dtype(x64, gradient):
    """An example whose forward stats say ``nonfinite`` (here a user's solver reporting it as
    int32 0/1) gets a zero cotangent: its own input's gradient is exactly zero, and the others'
    are what they are without the flag."""
    w = 0.3 * jnp.asarray(np.random.default_rng(1).normal(size=(D, D)))
    f = lambda z, a: jnp.tanh(z @ w) + a  # noqa: E731
    a = jnp.asarray(np.random.default_rng(2).normal(size=(N, D)))

    def grad(solver):
        return jax.grad(lambda a: jnp.sum(jdeq.fixed_point(f, jnp.zeros((N, D)), a, solver=solver,
                                                           gradient=gradient).value ** 2))(a)

    flagged, plain = grad(FlagsTheFirstExample(tol=1e-12, maxiter=200)), grad(jdeq.FixedPointIteration(tol=1e-12, maxiter=200))
    np.testing.assert_array_equal(flagged[0], 0.0)
    assert bool((plain[0] != 0).all())
    np.testing.assert_allclose(flagged[1:], plain[1:], rtol=1e-10)


@pytest.mark.parametrize("gradient", [jdeq.Implicit(), jdeq.Phantom(steps=3), jdeq.JacobianFree()],
                         ids=["implicit", "phantom", "jfb"])
def test_values_the_cell_closes_over_get_the_gradient_they_get_as_arguments(x64, gradient):
    """A cell that closes over traced weights (``W``, ``U``, ``c`` under ``jax.grad``, only the
    input ``x`` passed as ``args``) gets, for those weights, the gradient it gets when they are
    passed as arguments: the mode hoists closed-over tracers into its own parameters."""
    p = make_params()

    def via_closure(p):
        f = lambda z, x: cell(z, {**p, "x": x})  # noqa: E731
        return readout(jdeq.fixed_point(f, jnp.zeros((N, D)), p["x"], solver=TIGHT, gradient=gradient).value)

    closed, passed = jax.grad(via_closure)(p), jax.grad(loss)(p, gradient)
    for k in ("W", "U", "c", "x"):
        assert bool(jnp.any(passed[k] != 0)), k
        np.testing.assert_allclose(closed[k], passed[k], rtol=1e-10, atol=1e-14, err_msg=k)


@pytest.mark.parametrize("solver", ["anderson", "jaxopt"])
def test_per_example_code_closing_over_its_weights_under_vmap_and_grad(x64, solver):
    """The common JAX pattern: per-example code whose cell closes over the weights and the
    example (``lambda z, _: tanh(W @ z + x)``), ``jax.vmap``-ed and differentiated: the same
    gradient as with both passed as ``args``, for jdeq's and jaxopt's forward solvers."""
    import jaxopt

    solver = (jdeq.Anderson(tol=1e-12, maxiter=100) if solver == "anderson"
              else jdeq.JaxoptSolver(jaxopt.AndersonAcceleration, tol=1e-12, maxiter=100))
    w = 0.3 * jnp.asarray(np.random.default_rng(0).normal(size=(D, D)))
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(N, D)))

    def closing(w, x):
        f = lambda z, _: jnp.tanh(w @ z + x)  # noqa: E731
        return jdeq.fixed_point(f, jnp.zeros(D), None, solver=solver, batched=False).value.sum()

    def passing(w, x):
        f = lambda z, a: jnp.tanh(a[0] @ z + a[1])  # noqa: E731
        return jdeq.fixed_point(f, jnp.zeros(D), (w, x), solver=solver, batched=False).value.sum()

    grads = [jax.grad(lambda w: jax.vmap(lambda x: run(w, x))(xs).sum())(w) for run in (closing, passing)]
    assert bool(jnp.any(grads[1] != 0))
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-10, atol=1e-14)


def test_an_example_whose_forward_went_non_finite_costs_the_backward_loop_nothing(x64):
    """jdeq's own backward solve gives an example whose forward solve overflowed the system
    ``b = 0``, solved by ``u = 0`` from the start: its callback row shows a zero residual and
    the fewest steps of the batch (a nonzero ``b`` would iterate ``u = b + 1e200 u`` into an
    overflow), and it is flagged non-finite and not converged."""
    big = jnp.arange(N) == 0

    def f(z, p):
        return jnp.where(big[:, None], 1e200 * z + 1, cell(z, p))

    p = make_params()
    seen = []
    gradient = jdeq.Implicit(tol=1e-8, callback=seen.append)
    jax.block_until_ready(jax.grad(lambda p: readout(
        jdeq.fixed_point(f, jnp.zeros((N, D)), p, solver=TIGHT, gradient=gradient).value))(p))
    (st,) = seen
    np.testing.assert_array_equal(st.nonfinite, big)
    np.testing.assert_array_equal(st.converged, ~big)
    assert float(st.abs_residual[0]) == 0.0, st.abs_residual
    assert int(st.nsteps[0]) <= int(np.min(st.nsteps[1:])), st.nsteps
