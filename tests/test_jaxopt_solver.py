"""``jdeq.JaxoptSolver``: jaxopt's fixed-point and root solvers plugged in as forward solvers
(with jaxopt's own, whole-batch semantics), validation, hashing and gradients through them."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq
from _jaxpr import eqns

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="JAXopt is no longer maintained", category=DeprecationWarning)
    import jaxopt


@functools.partial(jax.jit, static_argnums=(0, 3))
def solve(f, z0, args, solver):
    return jdeq.fixed_point(f, z0, args, solver=solver)


def affine(z, p):
    A, b = p
    return z @ A.T + b


def affine_problem(seed=0, n=3, d=6, rho=0.6):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d))
    A = rho * A / np.linalg.norm(A, 2)
    b = rng.normal(size=(n, d))
    return A, b, np.linalg.solve(np.eye(d) - A, b.T).T


SOLVERS = {
    "fpi": jdeq.JaxoptSolver(jaxopt.FixedPointIteration, tol=1e-12, maxiter=300),
    "anderson": jdeq.JaxoptSolver(jaxopt.AndersonAcceleration, tol=1e-12, maxiter=300, history_size=5),
    # jaxopt's Broyden with its default gamma=+1 starts from the wrong-signed inverse Jacobian
    # for g(z) = f(z) - z (whose Jacobian is near -I); gamma=-1 is the right initialization.
    "broyden": jdeq.JaxoptSolver(jaxopt.Broyden, tol=1e-12, maxiter=300, gamma=-1.0),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_affine_fixed_point_reached(x64, name):
    A, b, z_star = affine_problem()
    solver = SOLVERS[name]
    sol = solve(affine, jnp.zeros_like(b), (jnp.asarray(A), jnp.asarray(b)), solver)
    np.testing.assert_allclose(sol.value, z_star, rtol=0, atol=1e-10)
    st = sol.stats
    assert bool(st.converged.all())
    nsteps = np.asarray(st.nsteps)
    # jaxopt solves the batch as one problem: one iteration count for every example.
    assert nsteps.shape == (3,) and (nsteps == nsteps[0]).all()
    assert 1 <= nsteps[0] < 300
    # Per-example residuals of the returned value.
    res = np.linalg.norm(np.asarray(affine(sol.value, (A, b)) - sol.value), axis=1)
    np.testing.assert_allclose(st.abs_residual, res, rtol=1e-6, atol=1e-15)
    fz = np.linalg.norm(np.asarray(affine(sol.value, (A, b))), axis=1)
    np.testing.assert_allclose(st.rel_residual, res / fz, rtol=1e-6, atol=1e-15)  # relative to |f(z)|
    assert st.trace is None


def test_broyden_gamma_sign_matters(x64):
    """The measured reason DESIGN.md gives for gamma=-1: it converges in far fewer steps."""
    A, b, _ = affine_problem()
    args = (jnp.asarray(A), jnp.asarray(b))
    good = solve(affine, jnp.zeros_like(b), args, SOLVERS["broyden"]).stats
    default = solve(affine, jnp.zeros_like(b), args, jdeq.JaxoptSolver(jaxopt.Broyden, tol=1e-12, maxiter=300)).stats
    assert int(good.nsteps[0]) <= 20
    assert int(good.nsteps[0]) < int(default.nsteps[0])


def test_non_convergence_reported_not_raised():
    f = lambda z, a: 0.999 * jnp.sin(z) + a  # noqa: E731
    solver = jdeq.JaxoptSolver(jaxopt.FixedPointIteration, tol=1e-8, maxiter=4)
    st = jdeq.fixed_point(f, jnp.zeros((2, 3)), jnp.ones((2, 3)), solver=solver).stats
    assert not bool(st.converged.any())
    np.testing.assert_array_equal(st.nsteps, 4)


def test_maxiter_override():
    f = lambda z, a: 0.9 * jnp.tanh(z) + a  # noqa: E731
    solver = jdeq.JaxoptSolver(jaxopt.AndersonAcceleration, tol=1e-6, maxiter=200)
    st = jdeq.fixed_point(f, jnp.zeros((2, 3)), jnp.ones((2, 3)), solver=solver, maxiter=3).stats
    assert int(st.nsteps[0]) == 3 and not bool(st.converged.any())


def _exact_grad(A, b):
    """d/db sum(sin(z*)) = (I - A)^{-T} cos(z*), row by row."""
    eye = np.eye(A.shape[0])
    z = np.linalg.solve(eye - A, b.T).T
    return np.linalg.solve((eye - A).T, np.cos(z).T).T


@functools.partial(jax.jit, static_argnums=(2, 3))
def _grad(A, b, solver, gradient):
    loss = lambda b: jnp.sum(jnp.sin(jdeq.fixed_point(affine, jnp.zeros_like(b), (A, b), solver=solver,  # noqa: E731
                                                      gradient=gradient).value))
    return jax.grad(loss)(b)


def test_implicit_gradient_through_jaxopt_forward(x64):
    # Default Implicit(): the backward solve reuses the forward's (jaxopt) algorithm, whose
    # maxiter must stay static.
    A, b, _ = affine_problem()
    g = _grad(jnp.asarray(A), jnp.asarray(b), SOLVERS["anderson"], jdeq.Implicit())
    np.testing.assert_allclose(g, _exact_grad(A, b), rtol=1e-8, atol=1e-10)


def test_jaxopt_solver_as_implicit_backward_solver(x64):
    A, b, _ = affine_problem()
    back = jdeq.Implicit(solver=jdeq.JaxoptSolver(jaxopt.FixedPointIteration, tol=1e-12, maxiter=300))
    g = _grad(jnp.asarray(A), jnp.asarray(b), jdeq.FixedPointIteration(tol=1e-12, maxiter=300), back)
    np.testing.assert_allclose(g, _exact_grad(A, b), rtol=1e-8, atol=1e-10)


def test_run_time_maxiter_bounds_the_backward_of_a_static_budget_solver(x64):
    """jaxopt's Broyden bakes its budget into its options: ``fixed_point(..., maxiter=k)`` runs
    the forward and the default implicit backward (a copy of the forward solver) with ``k``
    iterations, as a solver built with ``maxiter=k`` does; 3 iterations are far from the exact
    gradient here, so a backward that kept the built budget (300) would differ."""
    A, b, _ = affine_problem(seed=2, d=8, rho=0.95)
    A, b = jnp.asarray(A), jnp.asarray(b)

    def grad(solver, maxiter=None):
        loss = lambda b: jnp.sum(jnp.sin(jdeq.fixed_point(affine, jnp.zeros_like(b), (A, b), solver=solver,  # noqa: E731
                                                          maxiter=maxiter).value))
        return np.asarray(jax.grad(loss)(b))

    run_time = grad(SOLVERS["broyden"], maxiter=3)
    built = grad(jdeq.JaxoptSolver(jaxopt.Broyden, tol=1e-12, maxiter=3, gamma=-1.0))
    np.testing.assert_allclose(run_time, built, rtol=1e-12, atol=1e-14)
    exact = grad(SOLVERS["broyden"])
    assert np.max(np.abs(run_time - exact)) > 1e-3 * np.max(np.abs(exact))


# ----------------------------------------------------------------------------- config


def test_tol_and_maxiter_read_the_options_or_jaxopts_defaults():
    """``tol``/``maxiter`` (read by the implicit backward: jaxopt's linear solvers take the
    forward's tol) are the solver's options, else jaxopt's own defaults."""
    s = jdeq.JaxoptSolver(jaxopt.AndersonAcceleration, tol=1e-3, maxiter=7)
    assert (s.tol, s.maxiter) == (1e-3, 7)
    defaults = jaxopt.AndersonAcceleration(fixed_point_fun=lambda z: z)
    bare = jdeq.JaxoptSolver(jaxopt.AndersonAcceleration)
    assert (bare.tol, bare.maxiter) == (defaults.tol, defaults.maxiter)


def test_backward_takes_overrides_but_not_jdeqs_stop_mode():
    """``backward(**overrides)`` (the implicit backward's solver): the overrides replace the
    options, except ``stop_mode``, jdeq's residual kind, which jaxopt has no use for."""
    s = jdeq.JaxoptSolver(jaxopt.AndersonAcceleration, tol=1e-3, maxiter=7)
    assert s.backward(stop_mode="abs", tol=1e-5) == jdeq.JaxoptSolver(jaxopt.AndersonAcceleration, tol=1e-5, maxiter=7)


def test_hashable_and_equal_by_value():
    a = jdeq.JaxoptSolver(jaxopt.AndersonAcceleration, tol=1e-5, history_size=3)
    b = jdeq.JaxoptSolver(jaxopt.AndersonAcceleration, history_size=3, tol=1e-5)
    assert a == b and hash(a) == hash(b)
    assert a != jdeq.JaxoptSolver(jaxopt.AndersonAcceleration, tol=1e-5, history_size=4)
    assert a != jdeq.JaxoptSolver(jaxopt.FixedPointIteration, tol=1e-5)
    assert a.tol == 1e-5 and a.options == {"tol": 1e-5, "history_size": 3}
    assert jdeq.JaxoptSolver(jaxopt.FixedPointIteration).maxiter == 100  # jaxopt's default
    # the repr reads as the call that builds it (options in name order): error messages quote it
    assert repr(a) == "JaxoptSolver(jaxopt.AndersonAcceleration, history_size=3, tol=1e-05)"
    assert repr(jdeq.JaxoptSolver(jaxopt.FixedPointIteration)) == "JaxoptSolver(jaxopt.FixedPointIteration)"

    traces = []

    def run(x, solver):
        traces.append(None)
        return jdeq.fixed_point(lambda z, x: 0.5 * jnp.tanh(z) + x, jnp.zeros((2, 3)), x, solver=solver).value

    run = jax.jit(run, static_argnames="solver")
    run(jnp.ones((2, 3)), solver=a)
    run(jnp.ones((2, 3)), solver=b)
    assert len(traces) == 1


def test_a_pytree_with_no_leaves_that_crosses_jit_as_an_argument():
    """A JaxoptSolver is a pytree (no leaves: every option is static), so it can also be an
    ordinary argument of a jitted function; flattening and rebuilding it gives an equal solver."""
    a = jdeq.JaxoptSolver(jaxopt.AndersonAcceleration, tol=1e-5, history_size=3)
    leaves, treedef = jax.tree_util.tree_flatten(a)
    assert leaves == [] and jax.tree_util.tree_unflatten(treedef, leaves) == a
    f = lambda z, x: 0.5 * jnp.tanh(z) + x  # noqa: E731
    run = jax.jit(lambda x, solver: jdeq.fixed_point(f, jnp.zeros((2, 3)), x, solver=solver).value)
    np.testing.assert_allclose(run(jnp.ones((2, 3)), a), jdeq.fixed_point(f, jnp.zeros((2, 3)), jnp.ones((2, 3)),
                                                                         solver=a).value, rtol=1e-6)


def test_nsteps_is_int32_as_for_every_solver(x64):
    st = jdeq.fixed_point(affine, jnp.zeros((3, 6)), tuple(map(jnp.asarray, affine_problem()[:2])),
                          solver=SOLVERS["anderson"]).stats
    assert st.nsteps.dtype == jnp.int32 and st.nsteps.shape == (3,)


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="unknown option `histroy_size` for jaxopt.AndersonAcceleration"):
        jdeq.JaxoptSolver(jaxopt.AndersonAcceleration, histroy_size=3)


@pytest.mark.parametrize("key", ["fixed_point_fun", "implicit_diff", "unroll", "jit"])
def test_reserved_option(key):
    with pytest.raises(TypeError, match=f"JaxoptSolver sets `{key}` itself"):
        jdeq.JaxoptSolver(jaxopt.FixedPointIteration, **{key: None})


@pytest.mark.parametrize("cls", [jaxopt.GradientDescent, jaxopt.LBFGS, jdeq.Anderson, "broyden"])
def test_not_a_jaxopt_fixed_point_class(cls):
    with pytest.raises(TypeError, match="`jaxopt_class` must be one of jaxopt's"):
        jdeq.JaxoptSolver(cls)


def test_a_float32_state_under_x64_stays_float32(x64):
    """Under x64 jaxopt iterates a float32 state in float32 (AndersonAcceleration in float64, its
    Gram matrix's dtype); the cell always sees, and the value keeps, the state's own dtype."""
    A, b, z_star = affine_problem()
    p = (jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32))
    for name, solver in SOLVERS.items():
        seen = set()

        def f(z, p):
            seen.add(z.dtype)
            return affine(z, p)

        sol = jdeq.fixed_point(f, jnp.zeros((3, 6), jnp.float32), p,
                               solver=solver.backward(tol=1e-5))
        assert sol.value.dtype == jnp.float32 and seen == {jnp.dtype(jnp.float32)}, (name, seen)
        np.testing.assert_allclose(sol.value, z_star, rtol=1e-4, atol=1e-4, err_msg=name)
        # jaxopt's loop carries the iterate in float32 (AndersonAcceleration: float64)
        jaxpr = jax.make_jaxpr(lambda p: jdeq.fixed_point(affine, jnp.zeros((3, 6), jnp.float32), p,
                                                          solver=solver.backward(tol=1e-5)).value)(p)
        carried = {str(v.aval.dtype) for e in eqns(jaxpr.jaxpr) if e.primitive.name == "while"
                   for v in e.outvars if v.aval.shape == (3, 6)}
        assert carried == {"float64" if name == "anderson" else "float32"}, (name, carried)


def test_a_float32_solve_without_x64_warns_nothing():
    """Without x64 every class runs in float32 with no dtype warning (asking jax for float64
    there would warn that it is not available, and silently give float32)."""
    A, b, z_star = affine_problem()
    p = (jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32))
    for name, solver in SOLVERS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sol = jdeq.fixed_point(affine, jnp.zeros((3, 6), jnp.float32), p, solver=solver.backward(tol=1e-5))
        np.testing.assert_allclose(sol.value, z_star, rtol=1e-4, atol=1e-4, err_msg=name)


def test_an_exact_fixed_point_meets_tol_zero():
    """``converged`` is jaxopt's own stopping test, ``error <= tol``: a map that reaches its
    fixed point exactly (a constant) converges even at ``tol=0``."""
    f = lambda z, c: jnp.broadcast_to(c, z.shape)  # noqa: E731
    for name in ("fpi", "anderson"):
        st = jdeq.fixed_point(f, jnp.zeros((2, 4)), jnp.ones((2, 4)), solver=SOLVERS[name].backward(tol=0.0)).stats
        assert bool(st.converged.all()) and int(st.nsteps[0]) < 300, name
        np.testing.assert_array_equal(st.abs_residual, 0.0)


def test_a_state_whose_norm_overflows_is_nonfinite_as_in_jdeqs_loop():
    """An iterate at 1e20 per entry: ``z - f(z)`` is 0 but ``||f(z)||`` overflows float32, so
    the relative residual is NaN. jdeq's loop flags such an example non-finite (not
    converged); JaxoptSolver must agree rather than report it converged."""
    f = lambda z, c: jnp.broadcast_to(c, z.shape)  # noqa: E731
    c = jnp.array([[1.0], [1e20]]) * jnp.ones((2, 4))
    own = jdeq.fixed_point(f, jnp.zeros((2, 4)), c, solver=jdeq.FixedPointIteration(tol=1e-3)).stats
    np.testing.assert_array_equal(own.nonfinite, [False, True])
    for name in ("fpi", "anderson"):
        st = jdeq.fixed_point(f, jnp.zeros((2, 4)), c, solver=SOLVERS[name].backward(tol=1e-3)).stats
        np.testing.assert_array_equal(st.nonfinite, own.nonfinite, err_msg=name)
        np.testing.assert_array_equal(st.converged, own.converged, err_msg=name)
        # each residual re-measured at the fallback z0 as jdeq's loop reports it: abs inf, rel NaN
        np.testing.assert_array_equal(st.abs_residual, own.abs_residual, err_msg=name)
        assert np.isnan(own.rel_residual[1]) and np.isfinite(own.rel_residual[0])
        np.testing.assert_allclose(st.rel_residual, own.rel_residual, rtol=0, atol=0, equal_nan=True, err_msg=name)


def test_only_jaxopts_unmaintained_warning_is_filtered(tmp_path, monkeypatch):
    """jdeq filters jaxopt's one "no longer maintained" warning at import, by message: any other
    warning the import raises still reaches the user. (A stand-in jaxopt package raises both.)"""
    import sys

    from jdeq._jaxopt import jaxopt as import_jaxopt

    pkg = tmp_path / "jaxopt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import warnings\n"
        "warnings.warn('JAXopt is no longer maintained. See ...', DeprecationWarning)\n"
        "warnings.warn('some other deprecation', DeprecationWarning)\n"
        "warnings.warn('JAXopt is no longer maintained, as a UserWarning', UserWarning)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "jaxopt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = import_jaxopt()
    assert module.__file__ == str(pkg / "__init__.py")
    # the filter is that one DeprecationWarning: the same words in another category still show
    assert [str(w.message) for w in caught] == ["some other deprecation",
                                                "JAXopt is no longer maintained, as a UserWarning"]


@pytest.mark.parametrize("name", ["fpi", "anderson"])
def test_a_traced_budget_and_a_loop_that_stops_at_convergence(name):
    """jaxopt's loop runs as a while loop: a run-time ``maxiter`` may be traced (jit over the
    budget), and a solve that converges early stops there (jaxopt's default here, a scan of
    ``maxiter`` guarded steps, needed a static budget: a traced one raised JAX's internal
    "Non-hashable static arguments" error)."""
    f = lambda z, a: 0.5 * jnp.tanh(z) + a  # noqa: E731
    z0, a = jnp.zeros((2, 3)), jnp.ones((2, 3))
    solver = SOLVERS[name].backward(tol=1e-6)
    run = jax.jit(lambda m: jdeq.fixed_point(f, z0, a, solver=solver, maxiter=m).stats.nsteps)
    np.testing.assert_array_equal(run(5), 5)
    np.testing.assert_array_equal(run(7), 7)  # the same program, another budget
    assert run._cache_size() == 1
    jaxpr = str(jax.make_jaxpr(lambda a: jdeq.fixed_point(f, z0, a, solver=solver).value)(a))
    assert "while" in jaxpr and " scan" not in jaxpr


def test_jaxopt_broyden_needs_a_static_budget_and_says_so():
    f = lambda z, a: 0.5 * jnp.tanh(z) + a  # noqa: E731
    run = jax.jit(lambda m: jdeq.fixed_point(f, jnp.zeros((2, 3)), jnp.ones((2, 3)), solver=SOLVERS["broyden"],
                                             maxiter=m).value)
    with pytest.raises(ValueError) as e:
        run(5)
    assert str(e.value) == ("`maxiter` must be a Python int with JaxoptSolver(jaxopt.Broyden) (jaxopt sizes its "
                            "history by it), not a traced value.")
    st = jdeq.fixed_point(f, jnp.zeros((2, 3)), jnp.ones((2, 3)), solver=SOLVERS["broyden"], maxiter=4).stats
    assert int(st.nsteps.max()) <= 4


@pytest.mark.parametrize("name", ["bicgstab", "normal_cg"])  # (gmres: one restart cycle of 20 > dim 8 is exact)
def test_implicit_tol_reaches_jaxopts_linear_solver(x64, name):
    """``Implicit(solver=<jaxopt linear solver>, tol=...)``: the tolerance is the linear solve's
    (a loose one gives a visibly less accurate gradient than a tight one, which matches the
    exact implicit gradient)."""
    A, b, _ = affine_problem(seed=2, d=8, rho=0.95)
    A, b = jnp.asarray(A), jnp.asarray(b)
    fwd = jdeq.Anderson(tol=1e-12, maxiter=400)

    def grad(tol, maxiter=None):
        loss = lambda A: jnp.sum(jdeq.fixed_point(  # noqa: E731
            affine, jnp.zeros_like(b), (A, b), solver=fwd,
            gradient=jdeq.Implicit(solver=name, tol=tol, maxiter=maxiter)).value ** 2)
        return jax.grad(loss)(A)

    z = np.linalg.solve(np.eye(8) - np.asarray(A), np.asarray(b).T).T
    u = np.linalg.solve(np.eye(8) - np.asarray(A).T, 2 * z.T).T  # adjoint: u = (I - A^T)^{-1} dL/dz
    exact = u.T @ z  # dL/dA = sum_n u_n z_n^T
    tight, loose = np.asarray(grad(1e-12)), np.asarray(grad(0.3))
    np.testing.assert_allclose(tight, exact, rtol=1e-7, atol=1e-9)
    assert np.max(np.abs(loose - exact)) > 1e-6 * np.max(np.abs(exact))
    # and Implicit's maxiter is the linear solve's budget: one iteration is visibly inexact
    short = np.asarray(grad(1e-12, maxiter=1))
    assert np.max(np.abs(short - exact)) > 1e-6 * np.max(np.abs(exact))
