"""Forward solvers: accuracy on known fixed points, iteration counts, per-example semantics,
lowest-residual iterate, traces, stop modes, ``throw=True``, pytree states and dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq
from _jaxpr import eqns

JDEQ_SOLVERS = {
    "fpi": jdeq.FixedPointIteration,
    "anderson": jdeq.Anderson,
    "broyden": jdeq.Broyden,
}


@functools.partial(jax.jit, static_argnums=(0, 3))
def solve(f, z0, args, solver):
    """``jdeq.fixed_point`` jitted with ``f`` and ``solver`` static, so tests sharing a
    configuration and shapes share one compilation."""
    return jdeq.fixed_point(f, z0, args, solver=solver)


def affine(z, p):
    """z -> A z + b, row by row (A shared, b per example)."""
    A, b = p
    return z @ A.T + b


def affine_problem(seed, n=3, d=6, rho=0.6, symmetric=False):
    """Random A with spectral norm ``rho`` (or a symmetric one with spectral radius ``rho``),
    per-example b, and the exact fixed points ``(I - A)^{-1} b`` (float64 numpy)."""
    rng = np.random.default_rng(seed)
    if symmetric:
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        eig = rng.uniform(-rho, rho, size=d)
        eig[0] = rho
        A = (q * eig) @ q.T
    else:
        A = rng.normal(size=(d, d))
        A = rho * A / np.linalg.norm(A, 2)
    b = rng.normal(size=(n, d))
    z_star = np.linalg.solve(np.eye(d) - A, b.T).T
    return A, b, z_star


def tanh_map(z, p):
    W, x = p
    return jnp.tanh(z @ W.T + x)


def tanh_problem(seed, n=4, d=8, rho=0.9):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(d, d))
    W = rho * W / np.linalg.norm(W, 2)
    x = rng.normal(size=(n, d))
    return W, x


# ----------------------------------------------------------------------------- affine: exact z*


@pytest.mark.parametrize("name", sorted(JDEQ_SOLVERS))
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_affine_fixed_point_reached(x64, name, stop_mode):
    A, b, z_star = affine_problem(0)
    solver = JDEQ_SOLVERS[name](tol=1e-11, maxiter=300, stop_mode=stop_mode)
    sol = solve(affine, jnp.zeros_like(b), (jnp.asarray(A), jnp.asarray(b)), solver)
    assert sol.value.dtype == jnp.float64
    np.testing.assert_allclose(sol.value, z_star, rtol=0, atol=1e-9)
    assert bool(sol.stats.converged.all())
    nsteps = np.asarray(sol.stats.nsteps)
    assert nsteps.shape == (3,) and nsteps.dtype == np.int32
    assert (nsteps > 1).all() and (nsteps < 300).all()
    # The value is f(z_b) at the lowest-residual iterate z_b, whose residuals the stats report:
    # rel = abs / ||f(z_b)|| exactly, and the value's own residual is smaller by the
    # contraction ||A|| = 0.6 at least.
    res = np.linalg.norm(affine(sol.value, (A, b)) - sol.value, axis=1)
    assert (res <= 0.6 * np.asarray(sol.stats.abs_residual) + 1e-15).all()
    np.testing.assert_allclose(
        sol.stats.rel_residual, sol.stats.abs_residual / (np.linalg.norm(sol.value, axis=1) + 1e-8),
        rtol=1e-9,
    )
    metric = sol.stats.abs_residual if stop_mode == "abs" else sol.stats.rel_residual
    assert (np.asarray(metric) < 1e-11).all()
    # Plain iteration contracts the residual by ||A|| = 0.6 per step at least, which bounds its
    # count; the accelerated solvers need fewer on a 6-dimensional linear problem.
    g0 = np.linalg.norm(b, axis=1)
    bound = np.ceil(np.log(1e-11 * (1 if stop_mode == "abs" else 0.1) / g0) / np.log(0.6)) + 1
    if name == "fpi":
        assert (nsteps <= bound).all(), (nsteps, bound)
        assert nsteps.min() >= 10
    else:
        assert nsteps.max() <= 16, nsteps


def test_affine_damped_fixed_point_iteration(x64):
    A, b, z_star = affine_problem(1)
    solver = jdeq.FixedPointIteration(tol=1e-11, maxiter=500, damping=0.5)
    sol = solve(affine, jnp.zeros_like(b), (jnp.asarray(A), jnp.asarray(b)), solver)
    np.testing.assert_allclose(sol.value, z_star, atol=1e-9)
    assert bool(sol.stats.converged.all())


# ----------------------------------------------------------------------------- Anderson vs FPI


def _maps():
    """(name, f, args, z0) contractive problems in float32."""
    out = []
    for seed in range(3):
        A, b, _ = affine_problem(seed, n=4, d=8, rho=0.9)
        out.append((f"linear-{seed}", affine, (A, b)))
    for seed, rho in [(0, 0.9), (1, 0.99), (2, 0.99)]:
        A, b, _ = affine_problem(seed, n=4, d=8, rho=rho, symmetric=True)
        out.append((f"sym-{rho}-{seed}", affine, (A, b)))
    for seed, rho in [(0, 0.9), (1, 0.95), (2, 0.5)]:
        out.append((f"tanh-{rho}-{seed}", tanh_map, tanh_problem(seed, rho=rho)))
    return out


MAPS = _maps()


@pytest.mark.parametrize("case", MAPS, ids=[m[0] for m in MAPS])
def test_anderson_never_slower_than_fixed_point_iteration(case):
    _, f, p = case
    p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p)
    z0 = jnp.zeros_like(p[1])
    kw = dict(tol=1e-4, maxiter=3000)
    fpi = solve(f, z0, p, jdeq.FixedPointIteration(**kw)).stats
    aa = solve(f, z0, p, jdeq.Anderson(**kw)).stats
    br = solve(f, z0, p, jdeq.Broyden(**kw)).stats
    for stats in (fpi, aa, br):
        assert bool(stats.converged.all())
        assert stats.trace is None
    fpi_n, aa_n = np.asarray(fpi.nsteps), np.asarray(aa.nsteps)
    assert aa_n.max() <= fpi_n.max(), (aa_n, fpi_n)
    assert (aa_n <= fpi_n).all(), (aa_n, fpi_n)


# ----------------------------------------------------------------------------- per example


def scaled_affine(z, p):
    """z -> c * (A z) + b with a per-example contraction factor c."""
    A, b, c = p
    return c[:, None] * (z @ A.T) + b


@pytest.mark.parametrize("name", sorted(JDEQ_SOLVERS))
def test_batch_members_match_solving_alone(x64, name):
    A, b, _ = affine_problem(3, n=4, d=6, rho=1.0)
    c = np.array([0.3, 0.97, 0.5, 0.4])  # example 1 converges slowly
    args = (jnp.asarray(A), jnp.asarray(b), jnp.asarray(c))
    solver = JDEQ_SOLVERS[name](tol=1e-10, maxiter=400, stop_mode="abs")
    z0 = jnp.zeros_like(args[1])
    batch = solve(scaled_affine, z0, args, solver)
    assert bool(batch.stats.converged.all())
    # The slow example really is slower, so the batch loop ran on after the others froze.
    nsteps = np.asarray(batch.stats.nsteps)
    assert nsteps[1] > nsteps[[0, 2, 3]].max()
    for i in (0, 2, 3):
        one = solve(scaled_affine, z0[i : i + 1], (args[0], args[1][i : i + 1], args[2][i : i + 1]), solver)
        assert int(one.stats.nsteps[0]) == int(batch.stats.nsteps[i])
        np.testing.assert_allclose(one.value[0], batch.value[i], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(one.stats.abs_residual[0], batch.stats.abs_residual[i], rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(one.stats.rel_residual[0], batch.stats.rel_residual[i], rtol=1e-9, atol=1e-15)


def test_lowest_residual_iterate_is_returned(x64):
    # A = diag(0.3, ..., 1.05): the residual g_k = A^k g_0 first shrinks (contracting
    # directions dominate) and then grows (the expanding direction takes over), so the last
    # iterate is far from the best one.
    d = 4
    diag = np.array([0.3, 0.3, 0.3, 1.05])
    A = np.diag(diag)
    b = np.zeros((2, d))
    z0 = np.array([[1.0, -1.0, 0.5, 1e-3], [0.5, 1.0, -1.0, 2e-3]])
    maxiter = 60
    solver = jdeq.FixedPointIteration(tol=1e-9, maxiter=maxiter, stop_mode="abs", trace=True)
    sol = solve(affine, jnp.asarray(z0), (jnp.asarray(A), jnp.asarray(b)), solver)
    st = sol.stats
    assert not bool(st.converged.any())
    np.testing.assert_array_equal(st.nsteps, [maxiter, maxiter])
    trace = np.asarray(st.trace)
    assert trace.shape == (2, maxiter) and np.isfinite(trace).all()
    # Exact iterates z_k = A^k z0 (fixed point 0) and residuals ||(A - I) A^k z0||.
    ks = np.arange(maxiter)
    iters = z0[:, None, :] * diag[None, None, :] ** ks[None, :, None]
    exact = np.linalg.norm(iters * (diag - 1.0), axis=2)
    np.testing.assert_allclose(trace, exact, rtol=1e-10)
    best = exact.argmin(axis=1)
    assert (best > 0).all() and (best < maxiter - 10).all()
    assert (trace[:, -1] > 5 * trace.min(axis=1)).all()
    np.testing.assert_allclose(st.abs_residual, trace.min(axis=1), rtol=1e-12)
    # the value is f at that iterate, i.e. the next plain iterate
    np.testing.assert_allclose(sol.value, iters[[0, 1], best + 1], rtol=1e-10, atol=1e-15)
    value_res = np.linalg.norm(affine(sol.value, (A, b)) - sol.value, axis=1)
    # (not contractive: that next iterate's residual is a little above the lowest one)
    exact_next = np.linalg.norm(iters[[0, 1], best + 1] * (diag - 1.0), axis=1)
    np.testing.assert_allclose(value_res, exact_next, rtol=1e-10)


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_lowest_residual_ties_keep_the_first_iterate(stop_mode):
    # f(z) = -z from z0: the iterates alternate z0, -z0, z0, ... and every residual is
    # exactly the same (2 |z0|), so each later iterate ties with the first: the first is
    # kept, and the value is f(z0) = -z0 whatever the budget's parity
    z0 = jnp.asarray([[1.0, -2.0, 0.5], [0.25, 4.0, -1.0]])
    A, b = -jnp.eye(3), jnp.zeros((2, 3))
    for maxiter in (4, 5):
        solver = jdeq.FixedPointIteration(tol=1e-6, maxiter=maxiter, stop_mode=stop_mode, trace=True)
        sol = solve(affine, z0, (A, b), solver)
        trace = np.asarray(sol.stats.trace)
        assert (trace == trace[:, :1]).all() and not bool(sol.stats.converged.any())
        np.testing.assert_array_equal(sol.value, -z0)


@pytest.mark.parametrize("name", sorted(JDEQ_SOLVERS))
def test_trace_matches_nsteps_and_residuals(name):
    # Example 2: I - A has eigenvalues spread over [0.001, 2] in 30 dimensions, far too
    # ill-conditioned for any of the solvers to reach tol in 20 evaluations.
    A, b, _ = affine_problem(4, n=3, d=30, rho=1.0, symmetric=True)
    c = np.array([0.2, 0.6, 0.999], np.float32)
    args = tuple(jnp.asarray(a, jnp.float32) for a in (A, b, c))
    maxiter, tol = 20, 1e-5
    solver = JDEQ_SOLVERS[name](tol=tol, maxiter=maxiter, trace=True)
    st = solve(scaled_affine, jnp.zeros_like(args[1]), args, solver).stats
    trace, nsteps = np.asarray(st.trace), np.asarray(st.nsteps)
    assert trace.shape == (3, maxiter)
    np.testing.assert_array_equal((~np.isnan(trace)).sum(axis=1), nsteps)
    for i in range(3):
        n = nsteps[i]
        assert np.isfinite(trace[i, :n]).all() and np.isnan(trace[i, n:]).all()
        # Every iterate before the last one failed the (rel) test.
        assert (trace[i, : n - 1] >= tol).all()
        # The reported rel residual is the best one seen.
        np.testing.assert_allclose(st.rel_residual[i], trace[i, :n].min(), rtol=1e-6)
        if bool(st.converged[i]):
            assert trace[i, n - 1] < tol
        else:
            assert n == maxiter
    assert bool(st.converged[0]) and not bool(st.converged[2])
    assert nsteps[0] < nsteps[2]


def test_already_converged_start_takes_one_evaluation(x64):
    A, b, z_star = affine_problem(0)
    solver = jdeq.Anderson(tol=1e-11, maxiter=300, stop_mode="rel")
    sol = solve(affine, jnp.asarray(z_star), (jnp.asarray(A), jnp.asarray(b)), solver)
    np.testing.assert_array_equal(sol.stats.nsteps, 1)
    np.testing.assert_allclose(sol.value, z_star, atol=1e-14)


# ----------------------------------------------------------------------------- stop modes


def test_a_residual_equal_to_tol_has_not_converged():
    """"Stop once the residual is below tol": a residual exactly at tol (here a constant 0.5:
    plain steps of 0.5 are exact in float32) is neither converged nor non-finite, and the solve
    runs its budget."""
    shift = lambda z, a: z + a  # noqa: E731  (no fixed point: the residual stays |a|)
    solver = jdeq.FixedPointIteration(tol=0.5, stop_mode="abs", maxiter=5)
    st = jdeq.fixed_point(shift, jnp.zeros((3, 1)), jnp.full((3, 1), 0.5), solver=solver).stats
    np.testing.assert_array_equal(st.abs_residual, 0.5)
    assert not st.converged.any() and not st.nonfinite.any()
    np.testing.assert_array_equal(st.nsteps, 5)


@pytest.mark.parametrize("name", sorted(JDEQ_SOLVERS))
def test_a_start_whose_residual_equals_tol_is_iterated(name):
    """The same rule at the start: z0 = 0 for the constant map z -> a has residual |a| = tol, so
    every solver takes a step (to z = a, exactly: residual 0)."""
    solver = JDEQ_SOLVERS[name](tol=0.5, stop_mode="abs", maxiter=5)
    st = jdeq.fixed_point(lambda z, a: a, jnp.zeros((3, 1)), jnp.full((3, 1), 0.5), solver=solver).stats
    np.testing.assert_array_equal(st.nsteps, 2)
    assert st.converged.all() and not st.nonfinite.any()


@pytest.mark.parametrize("name", sorted(JDEQ_SOLVERS))
def test_rel_stop_mode_is_scale_free_abs_is_not(x64, name):
    A, b, _ = affine_problem(5, n=3, d=6, rho=0.8)
    A = jnp.asarray(A)

    def nsteps(scale, mode):
        solver = JDEQ_SOLVERS[name](tol=1e-6, maxiter=500, stop_mode=mode)
        bs = jnp.asarray(scale * b)
        sol = solve(affine, jnp.zeros_like(bs), (A, bs), solver)
        assert bool(sol.stats.converged.all())
        # converged is read off the stop mode's own residual (at scale 1e-3 in "abs" mode the
        # relative residual is still far above tol)
        residual = sol.stats.abs_residual if mode == "abs" else sol.stats.rel_residual
        assert bool((residual < 1e-6).all())
        return np.asarray(sol.stats.nsteps)

    np.testing.assert_array_equal(nsteps(1.0, "rel"), nsteps(1000.0, "rel"))
    tiny, small, big = nsteps(1e-3, "abs"), nsteps(1.0, "abs"), nsteps(1000.0, "abs")
    assert (big > small).all() and (small > tiny).all(), (tiny, small, big)


# ----------------------------------------------------------------------------- throw


def _throwing(f, solver, a):
    g = jax.jit(lambda a: jdeq.fixed_point(f, jnp.zeros((2, 3)), a, solver=solver, throw=True).value)
    return jax.block_until_ready(g(a))


def test_throw_on_non_convergence_under_jit():
    f = lambda z, a: 0.999 * jnp.sin(z) + a  # noqa: E731  (very slow)
    with pytest.raises(Exception, match="did not converge"):
        _throwing(f, jdeq.FixedPointIteration(maxiter=5, tol=1e-6), jnp.ones((2, 3)))


def test_throw_on_non_finite_under_jit():
    f = lambda z, a: jnp.log(z - 1.0) + a  # noqa: E731  (NaN at z0 = 0)
    with pytest.raises(Exception, match="non-finite"):
        _throwing(f, jdeq.FixedPointIteration(), jnp.ones((2, 3)))


def test_throw_quiet_when_converged():
    f = lambda z, a: 0.5 * jnp.tanh(z) + a  # noqa: E731
    out = _throwing(f, jdeq.FixedPointIteration(tol=1e-5), jnp.ones((2, 3)))
    assert np.isfinite(np.asarray(out)).all()


def test_non_finite_without_throw_is_reported_in_stats():
    f = lambda z, a: jnp.log(z - 1.0) + a  # noqa: E731
    st = jdeq.fixed_point(f, jnp.zeros((2, 3)), jnp.ones((2, 3)), solver=jdeq.FixedPointIteration()).stats
    assert not bool(st.converged.any())


# ----------------------------------------------------------------------------- pytrees, dtypes


def test_dict_state_matches_flat_solve(x64):
    A, b, _ = affine_problem(6, n=3, d=10, rho=0.7)
    A, b = jnp.asarray(A), jnp.asarray(b)

    def to_dict(z):  # three leaves of different sizes: each one's slice of the flat rows counts
        return {"a": z[:, :6].reshape(3, 2, 3), "b": z[:, 6:7], "c": z[:, 7:]}

    def to_flat(t):
        return jnp.concatenate([t["a"].reshape(3, 6), t["b"], t["c"]], axis=1)

    f_flat = lambda z, p: jnp.tanh(affine(z, p))  # noqa: E731
    f_dict = lambda t, p: to_dict(f_flat(to_flat(t), p))  # noqa: E731
    # Flattening happens before the solver: one (cheap) solver is enough here.
    for solver in (jdeq.FixedPointIteration(tol=1e-10, maxiter=200),):
        flat = jdeq.fixed_point(f_flat, jnp.zeros((3, 10)), (A, b), solver=solver)
        tree = jdeq.fixed_point(f_dict, to_dict(jnp.zeros((3, 10))), (A, b), solver=solver)
        assert set(tree.value) == {"a", "b", "c"}
        assert tree.value["a"].shape == (3, 2, 3) and tree.value["b"].shape == (3, 1)
        np.testing.assert_allclose(to_flat(tree.value), flat.value, rtol=1e-12, atol=1e-13)
        np.testing.assert_array_equal(tree.stats.nsteps, flat.stats.nsteps)
        np.testing.assert_allclose(tree.stats.abs_residual, flat.stats.abs_residual, rtol=1e-8, atol=1e-16)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float32 under x64"])
def test_value_has_z0_structure_shapes_dtypes(dtype):
    # (under x64 a float32 state is still solved, and reported, in float32)
    with jax.enable_x64(dtype != "float32"):
        dt = jnp.dtype(dtype.split()[0])
        z0 = {"h": jnp.zeros((2, 3, 2), dt), "c": [jnp.zeros((2, 5), dt)]}
        x = jnp.ones((2, 5), dt)

        def f(t, x):
            s = jnp.tanh(0.5 * t["c"][0] + x)
            return {"h": 0.5 * jnp.cos(t["h"]) + s[:, :1, None], "c": [s]}

        sol = jdeq.fixed_point(f, z0, x, solver=jdeq.FixedPointIteration(tol=1e-5))
        assert jax.tree_util.tree_structure(sol.value) == jax.tree_util.tree_structure(z0)
        for got, want in zip(jax.tree_util.tree_leaves(sol.value), jax.tree_util.tree_leaves(z0)):
            assert got.shape == want.shape and got.dtype == want.dtype
        assert bool(sol.stats.converged.all())
        assert sol.stats.abs_residual.dtype == dt
        assert sol.stats.nsteps.shape == (2,) and sol.stats.converged.dtype == jnp.bool_


def test_mixed_dtype_state_keeps_each_leafs_dtype():
    """A state whose leaves differ in dtype is solved in their common dtype, and each leaf of the
    value (and each leaf the cell sees) has its own dtype again."""
    z0 = {"h": jnp.zeros((2, 3), jnp.float32), "l": jnp.zeros((2, 2), jnp.bfloat16)}
    seen = []

    def f(t, x):
        seen.append((t["h"].dtype, t["l"].dtype))
        h = jnp.tanh(0.5 * t["h"] + x)
        return {"h": h, "l": (0.5 * h[:, :2]).astype(jnp.bfloat16) + 0.25 * t["l"]}

    sol = jdeq.fixed_point(f, z0, jnp.ones((2, 3)), solver=jdeq.Anderson(tol=1e-4))
    assert sol.value["h"].dtype == jnp.float32 and sol.value["l"].dtype == jnp.bfloat16
    assert set(seen) == {(jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))}
    assert bool(sol.stats.converged.all())


# ----------------------------------------------------------------------------- config objects


def test_solvers_hashable_equal_by_value_and_static_args():
    for cls in JDEQ_SOLVERS.values():
        a, b = cls(tol=1e-5, maxiter=7), cls(tol=1e-5, maxiter=7)
        assert a == b and hash(a) == hash(b) and a is not b
        assert a != cls(tol=1e-6, maxiter=7)
        with pytest.raises(Exception):
            a.tol = 1.0  # frozen
    assert jdeq.Implicit(solver="gmres", tol=1e-6) == jdeq.Implicit(solver="gmres", tol=1e-6)
    assert hash(jdeq.Phantom(steps=3)) == hash(jdeq.Phantom(steps=3))
    assert len({jdeq.Implicit(), jdeq.Implicit(), jdeq.Unrolled(), jdeq.JacobianFree()}) == 3

    traces = []

    def run(a, solver):
        traces.append(solver)
        return jdeq.fixed_point(lambda z, a: 0.5 * jnp.tanh(z) + a, jnp.zeros((2, 3)), a, solver=solver).value

    run_jit = jax.jit(run, static_argnames="solver")
    a = jnp.ones((2, 3))
    v1 = run_jit(a, solver=jdeq.Anderson(tol=1e-5))
    v2 = run_jit(a, solver=jdeq.Anderson(tol=1e-5))  # equal, distinct object: cache hit
    assert len(traces) == 1
    np.testing.assert_array_equal(v1, v2)
    run_jit(a, solver=jdeq.Broyden(tol=1e-5))
    assert len(traces) == 2


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("gradient", [jdeq.Implicit(), jdeq.Implicit(shine="direct")], ids=["implicit", "shine"])
@pytest.mark.parametrize("solver", [jdeq.FixedPointIteration(maxiter=5), jdeq.Anderson(maxiter=5),
                                    jdeq.Anderson(maxiter=5, damping=0.5), jdeq.Broyden(maxiter=5)],
                         ids=["fpi", "anderson", "anderson-damped", "broyden"])
def test_solver_contractions_run_at_highest_precision(solver, gradient):
    """The solvers' own products (histories, Gram matrices, mixing, the SHINE estimates) ask for
    ``Precision.HIGHEST``: on TPU (bf16 passes) and on GPU (TF32) a float32 product at the
    default precision keeps about 8 or 10 mantissa bits, too few for Anderson's least squares.
    Checked in the program, since the CPU computes float32 products exactly whatever is asked:
    with a cell written at HIGHEST, every product of the forward and backward solve is."""
    if gradient.shine and isinstance(solver, jdeq.FixedPointIteration):
        pytest.skip("SHINE needs a solver with an inverse-Jacobian estimate")
    W, x = tanh_problem(0)
    hi = jax.lax.Precision.HIGHEST

    def loss(W, x):
        f = lambda z, p: jnp.tanh(jnp.dot(z, p[0].T, precision=hi) + p[1])
        return jnp.sum(jdeq.fixed_point(f, jnp.zeros_like(x), (W, x), solver=solver, gradient=gradient).value)

    program = jax.make_jaxpr(jax.grad(loss))(jnp.asarray(W), jnp.asarray(x)).jaxpr
    precisions = [e.params["precision"] for e in eqns(program) if e.primitive.name == "dot_general"]
    assert len(precisions) > 4
    assert all(p == (hi, hi) for p in precisions), precisions


def test_hyper_anderson_history_contractions_run_at_highest_precision():
    """HyperAnderson's history products (its Gram rows and its mix, ``anderson_mix``, damped
    here) ask for ``Precision.HIGHEST`` too, as the test above checks for the other solvers. Its
    mixer network is a plain model whose matmuls keep the default precision, so the check reads
    the products batched over examples: the per-row contractions over ``(n, m, d)`` histories."""
    solver = jdeq.HyperAnderson(params=jdeq.init_mixer(jax.random.key(0), memory=3), memory=3, damping=0.5,
                                maxiter=5)
    W, x = tanh_problem(0)
    hi = jax.lax.Precision.HIGHEST

    def loss(W, x):
        f = lambda z, p: jnp.tanh(jnp.dot(z, p[0].T, precision=hi) + p[1])
        return jnp.sum(jdeq.fixed_point(f, jnp.zeros_like(x), (W, x), solver=solver).value)

    program = jax.make_jaxpr(jax.grad(loss))(jnp.asarray(W), jnp.asarray(x)).jaxpr
    rows = [e for e in eqns(program) if e.primitive.name == "dot_general" and e.params["dimension_numbers"][1][0]]
    assert len(rows) >= 3, len(rows)  # the Gram row, and the mix of the points and of the residuals
    assert all(e.params["precision"] == (hi, hi) for e in rows), [e.params["precision"] for e in rows]


def test_broyden_skips_an_update_whose_denominator_is_not_above_the_floor():
    """Broyden's documented floor: ``|dz^T B dg|`` not above sqrt(smallest normal) of the dtype
    (2**-63 in float32, exactly representable) skips the rank-one update; the step is then the
    plain step of ``B = -I``, ``z - B g = f(z)``. Row 0 sits exactly at the floor, row 1 far
    below it (1e-25, a float32 normal number), row 2 just above it (updated)."""
    solver = jdeq.Broyden(memory=2)
    s = np.float32(2.0**-63)
    z_prev = jnp.full((3, 1), -1.0, jnp.float32)
    state = solver.init(z_prev)
    # the state after a first (skipped) update at z_prev, whose residual was 0
    us, vs, _, g_prev, u0, v0, dropped = state
    state = (us, vs, z_prev, jnp.zeros_like(g_prev), u0, v0, dropped)
    z = jnp.zeros((3, 1), jnp.float32)  # dz = 1
    fz = jnp.asarray([[-s], [-1e-25], [-2 * s]], jnp.float32)  # g = fz, dg = fz, B = -I: denom = -fz
    z_next, new = solver.update(state, 2, z, fz)
    u, v = np.asarray(new[4]), np.asarray(new[5])
    np.testing.assert_array_equal(u[:2], 0.0)
    np.testing.assert_array_equal(v[:2], 0.0)
    np.testing.assert_array_equal(np.asarray(z_next)[:2], np.asarray(fz)[:2])  # the plain step
    assert np.all(u[2] != 0) and np.all(v[2] != 0)  # above the floor: updated
