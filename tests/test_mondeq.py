"""monDEQ (Winston & Kolter 2020): monotone parametrization, splitting solvers, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdeq
from jdeq.models import MonDEQ, MonDEQClassifier, MonotoneConvCell, MonotoneDenseCell


def _dense(seed=0, m=0.5, w_scale=1.5, n=12, dtype=jnp.float64):
    return MonotoneDenseCell(5, n, m=m, w_scale=w_scale, dtype=dtype, rngs=nnx.Rngs(seed))


def _conv(seed=0, nd=2, m=0.5, w_scale=1.0, dtype=jnp.float64):
    return MonotoneConvCell(1, 2, spatial_dims=nd, m=m, w_scale=w_scale, dtype=dtype, rngs=nnx.Rngs(seed))


def _operator_matrix(cell, x):
    """The matrix of I - W on one example, built column by column from the cell's `linear`."""
    op = cell.operator()
    problem = cell.problem(cell.injection(x))
    z1 = cell.init_z(x)[:1]
    n = z1.size
    W = jax.jacfwd(lambda v: problem.linear(v.reshape(z1.shape), op).reshape(-1))(jnp.zeros(n, z1.dtype))
    return jnp.eye(n, dtype=W.dtype) - W, problem, op


def test_dense_parametrization_strongly_monotone(x64):
    for seed in range(4):
        cell = _dense(seed, m=0.3, w_scale=3.0)  # large random A, B: W itself far from contractive
        M, problem, op = _operator_matrix(cell, jnp.ones((1, 5)))
        sym = jnp.linalg.eigvalsh((M + M.T) / 2)
        assert sym.min() >= 0.3 - 1e-9
        assert float(jnp.linalg.norm(jnp.eye(12) - M, 2)) > 1.0  # W is no contraction: not trivial
        np.testing.assert_allclose(problem.lipschitz(op), jnp.linalg.norm(M, 2), rtol=1e-10)


@pytest.mark.parametrize("nd,shape,seed", [(1, (1, 7, 1), 0), (2, (1, 5, 4, 1), 1)])
def test_conv_operator_strongly_monotone(x64, nd, shape, seed):
    cell = _conv(seed, nd=nd, m=0.2, w_scale=2.0)
    M, problem, op = _operator_matrix(cell, jnp.ones(shape))
    sym = jnp.linalg.eigvalsh((M + M.T) / 2)
    assert sym.min() >= 0.2 - 1e-9
    # The Fourier bound is a true upper bound of ||I - W|| for the zero-padded operator.
    assert float(problem.lipschitz(op)) >= float(jnp.linalg.norm(M, 2)) * (1 - 1e-9)


def _cell_reference(cell, x):
    """The same equilibrium by Anderson on the plain cell relu(Wz + Ux + b)."""
    return jdeq.fixed_point(lambda z, a: a[0](z, a[1]), cell.init_z(x), (cell, x),
                            solver=jdeq.Anderson(tol=1e-11, maxiter=400, stop_mode="abs")).value


@pytest.mark.parametrize("splitting", [jdeq.ForwardBackward(), jdeq.PeacemanRachford()])
def test_dense_splitting_converges_from_any_start(x64, splitting):
    cell = _dense(1)
    x = jax.random.normal(jax.random.key(0), (3, 5), jnp.float64)
    ref = _cell_reference(cell, x)
    bias, problem, op = cell.injection(x), cell.problem(None), cell.operator()
    solver = jdeq.FixedPointIteration(tol=1e-11, maxiter=5000, stop_mode="abs")
    solve = jax.jit(lambda z0, bias, op: jdeq.monotone_fixed_point(problem, bias, z0, op, splitting=splitting,
                                                                   solver=solver))
    for k in range(3):
        z0 = 10.0 * jax.random.normal(jax.random.key(k + 1), ref.shape, jnp.float64)
        sol = solve(z0, bias, op)
        assert bool(sol.stats.converged.all())
        np.testing.assert_allclose(sol.value, ref, atol=1e-8)
    z = sol.value
    np.testing.assert_allclose(z, jax.nn.relu(z @ op["W"].T + bias), atol=1e-8)  # a fixed point of the cell


@pytest.mark.parametrize("splitting", [jdeq.ForwardBackward(), jdeq.PeacemanRachford()])
def test_residual_contracts_at_guaranteed_rate(x64, splitting):
    cell = _dense(2, m=1.0, w_scale=1.0)
    x = jax.random.normal(jax.random.key(0), (2, 5), jnp.float64)
    bias, problem, op = cell.injection(x), cell.problem(None), cell.operator()
    solver = jdeq.FixedPointIteration(tol=1e-300, maxiter=30, stop_mode="abs", trace=True)
    z0 = 5.0 * jax.random.normal(jax.random.key(3), (2, 12), jnp.float64)
    sol = jdeq.monotone_fixed_point(problem, bias, z0, op, splitting=splitting, solver=solver)
    lip = problem.lipschitz(op)
    alpha = splitting.step(problem, op)
    rate = float(splitting.contraction(problem, alpha, lip))
    assert rate < 1
    tr = np.asarray(sol.stats.trace)
    ratios = tr[:, 1:] / tr[:, :-1]
    assert np.nanmax(ratios) <= rate + 1e-9


@pytest.mark.parametrize("splitting", [jdeq.ForwardBackward(), jdeq.PeacemanRachford()])
def test_run_time_maxiter_reaches_the_splitting_loop(x64, splitting):
    """``monotone_fixed_point(..., maxiter=k)`` stops the splitting after k evaluations of T:
    the run equals a solver built with ``maxiter=k``."""
    cell = _dense(2, m=1.0, w_scale=1.0)
    x = jax.random.normal(jax.random.key(0), (2, 5), jnp.float64)
    bias, problem, op = cell.injection(x), cell.problem(None), cell.operator()
    z0 = jnp.zeros((2, 12), jnp.float64)

    def run(solver, maxiter=None):
        return jdeq.monotone_fixed_point(problem, bias, z0, op, splitting=splitting, solver=solver, maxiter=maxiter)

    short = run(jdeq.FixedPointIteration(tol=1e-12, maxiter=500), maxiter=3)
    built = run(jdeq.FixedPointIteration(tol=1e-12, maxiter=3))
    np.testing.assert_array_equal(short.stats.nsteps, 3)
    np.testing.assert_array_equal(short.value, built.value)
    assert not bool(short.stats.converged.any())


def test_conv_forward_backward_matches_anderson(x64):
    cell = _conv(0, nd=2, m=1.0, w_scale=0.5)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1), jnp.float64)
    ref = _cell_reference(cell, x)
    layer = MonDEQ(cell, solver=jdeq.FixedPointIteration(tol=1e-10, maxiter=3000, stop_mode="abs"))
    solve = nnx.jit(lambda layer, x, z0: layer(x, z0))
    for k in range(2):
        z0 = 5.0 * jax.random.normal(jax.random.key(k), ref.shape, jnp.float64)
        z, stats = solve(layer, x, z0)
        assert bool(stats.converged.all())
        np.testing.assert_allclose(z, ref, atol=1e-7)


def test_implicit_gradient_matches_plain_deq(x64):
    cell = _dense(3, m=0.5, w_scale=1.0)
    x = jax.random.normal(jax.random.key(0), (3, 5), jnp.float64)
    tight = jdeq.FixedPointIteration(tol=1e-12, maxiter=2000, stop_mode="abs")
    mon = MonDEQ(cell, splitting=jdeq.PeacemanRachford(), solver=tight)
    deq = jdeq.nnx.DEQ(cell, solver=jdeq.Anderson(tol=1e-12, maxiter=300, stop_mode="abs"))

    def loss(model):
        z, _ = model(x)
        return jnp.sum(jnp.sin(z))

    g1 = nnx.jit(nnx.grad(loss))(mon)
    g2 = nnx.jit(nnx.grad(loss))(deq)
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(g1, nnx.Param)), jax.tree_util.tree_leaves(nnx.state(g2, nnx.Param))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("splitting", [jdeq.ForwardBackward(), jdeq.PeacemanRachford()])
def test_gradient_argument_is_the_gradient_mode_used(x64, splitting):
    """monotone_fixed_point(gradient=...): JacobianFree's gradient (one step through T) differs
    from the default Implicit one, for either splitting."""
    cell = _dense(3, m=0.5, w_scale=1.0)
    x = jax.random.normal(jax.random.key(0), (3, 5), jnp.float64)
    op = cell.operator()
    solver = jdeq.FixedPointIteration(tol=1e-12, maxiter=2000, stop_mode="abs")

    def loss(bias, gradient):
        problem = cell.problem(bias)
        z = jdeq.monotone_fixed_point(problem, bias, jnp.zeros_like(bias), op, splitting=splitting,
                                      solver=solver, gradient=gradient).value
        return jnp.sum(jnp.sin(z))

    bias = cell.injection(x)
    implicit = jax.grad(loss)(bias, jdeq.Implicit())
    jfb = jax.grad(loss)(bias, jdeq.JacobianFree())
    assert float(jnp.abs(implicit - jfb).max()) > 1e-3 * float(jnp.abs(implicit).max())


@pytest.mark.parametrize("splitting", [jdeq.ForwardBackward(), jdeq.PeacemanRachford()])
def test_throw_raises_for_either_splitting(splitting):
    """throw=True, "as in jdeq.fixed_point": a splitting that cannot converge in 2 steps raises
    (eagerly and under jit); with the budget it needs, it does not."""
    cell = _dense(2, m=1.0, w_scale=1.0, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(0), (2, 5))
    bias, problem, op = cell.injection(x), cell.problem(None), cell.operator()
    z0 = jnp.zeros((2, 12))

    def run(maxiter):
        solver = jdeq.FixedPointIteration(tol=1e-5, maxiter=maxiter)
        return jdeq.monotone_fixed_point(problem, bias, z0, op, splitting=splitting, solver=solver, throw=True)

    with pytest.raises(RuntimeError, match="throw=True"):
        run(2)
    with pytest.raises(RuntimeError, match="throw=True"):
        jax.block_until_ready(jax.jit(lambda: run(2).value)())
    assert bool(run(500).stats.converged.all())


def test_peaceman_rachford_default_step_and_contraction_as_documented():
    """The default step is ``1 / L``, which gives the factor ``sqrt(1 - m / L)``; a fixed step
    ``a`` gives ``sqrt(1 - 4 a m / (1 + a L)^2)`` (here m = 0.5, L = 4)."""
    problem = jdeq.MonotoneProblem(linear=lambda z, w: z @ w.T, monotonicity=0.5, lipschitz=lambda w: 4.0)
    pr = jdeq.PeacemanRachford()
    alpha = pr.step(problem, None)
    np.testing.assert_allclose(alpha, 0.25, rtol=1e-7)
    np.testing.assert_allclose(pr.contraction(problem, alpha, 4.0), np.sqrt(1 - 0.5 / 4), rtol=1e-6)
    np.testing.assert_allclose(pr.contraction(problem, 0.5, 4.0), np.sqrt(1 - 4 * 0.5 * 0.5 / 3.0 ** 2), rtol=1e-6)
    assert jdeq.PeacemanRachford(alpha=0.5).step(problem, None) == 0.5


@pytest.mark.parametrize("splitting", [jdeq.ForwardBackward(), jdeq.PeacemanRachford(), jdeq.PeacemanRachford(alpha=0.3)])
def test_the_step_takes_the_states_dtype(x64, splitting):
    """float64 parameters (x64 on) and a float32 state, with a problem whose maps keep the
    state's dtype: the step (from the float64 Lipschitz bound) is cast to the state's dtype, so
    ``T`` keeps float32 and ``z*`` is float32, the equilibrium of the all-float64 solve."""
    cell = _dense(1)
    x = jax.random.normal(jax.random.key(0), (3, 5), jnp.float64)
    bias, op = cell.injection(x), cell.operator()
    eye = jnp.eye(op["W"].shape[0], dtype=jnp.float64)
    problem = jdeq.MonotoneProblem(
        linear=lambda z, o: (z @ o["W"].T).astype(z.dtype), monotonicity=cell.m,
        lipschitz=lambda o: jnp.linalg.norm(eye - o["W"], 2),
        resolvent=(lambda a, o: jnp.linalg.inv((1.0 + a) * eye - a * o["W"]),
                   lambda v, inv: (v @ inv.T).astype(v.dtype)))
    solver = jdeq.FixedPointIteration(tol=1e-5, maxiter=2000, stop_mode="abs")
    ref = jdeq.monotone_fixed_point(problem, bias, jnp.zeros_like(bias), op, splitting=splitting, solver=solver)
    b32 = bias.astype(jnp.float32)
    sol = jdeq.monotone_fixed_point(problem, b32, jnp.zeros_like(b32), op, splitting=splitting, solver=solver)
    assert ref.value.dtype == jnp.float64 and sol.value.dtype == jnp.float32
    assert bool(sol.stats.converged.all())
    np.testing.assert_allclose(sol.value, ref.value, atol=1e-4)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="`m`"):
        MonotoneDenseCell(3, 4, m=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`alpha`"):
        jdeq.ForwardBackward(alpha=-1.0)
    with pytest.raises(ValueError, match="`alpha`"):
        jdeq.PeacemanRachford(alpha=0.0)
    with pytest.raises(ValueError, match="`monotonicity`"):
        jdeq.MonotoneProblem(linear=lambda z, a: z, monotonicity=0)
    with pytest.raises(ValueError, match="`kernel_size`"):
        MonotoneConvCell(1, 2, kernel_size=2, rngs=nnx.Rngs(0))
    cell = MonotoneConvCell(1, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="resolvent"):
        MonDEQ(cell, splitting=jdeq.PeacemanRachford())(jnp.ones((1, 4, 4, 1)))
    with pytest.raises(TypeError, match="`splitting`"):
        MonDEQ(cell, splitting=jdeq.Anderson())
    problem = jdeq.MonotoneProblem(linear=lambda z, a: z, monotonicity=1.0)
    with pytest.raises(ValueError, match="alpha"):
        jdeq.monotone_fixed_point(problem, jnp.ones((1, 2)), jnp.zeros((1, 2)))
    with pytest.raises(TypeError) as e:
        jdeq.MonotoneProblem(linear=3, monotonicity=1.0)
    assert str(e.value) == "`linear` must be callable as linear(z, args), got 3."
    with pytest.raises(TypeError) as e:
        jdeq.monotone_fixed_point(problem, jnp.ones((1, 2)), jnp.zeros((1, 2)), splitting="fb")
    assert str(e.value) == "`splitting` must be jdeq.ForwardBackward or jdeq.PeacemanRachford, got 'fb'."
    # every argument check names its argument and says what it expects, in full
    one, zero = jnp.ones((1, 2)), jnp.zeros((1, 2))
    fb = jdeq.ForwardBackward(alpha=0.5)
    cases = [
        (lambda: jdeq.monotone_fixed_point("p", one, zero), "`problem` must be a jdeq.MonotoneProblem, got 'p'."),
        (lambda: jdeq.monotone_fixed_point(problem, one, zero, splitting=fb, solver="fpi"),
         "`solver` must be a jdeq solver (FixedPointIteration, Anderson or Broyden) to iterate the "
         "splitting operator, got 'fpi'."),
        (lambda: jdeq.monotone_fixed_point(problem, (one,), zero, splitting=fb),
         "`bias` must have the pytree structure of `z0`."),
        (lambda: jdeq.monotone_fixed_point(problem, jnp.ones((1, 3)), zero, splitting=fb),
         "`bias` leaves must have the shapes of `z0`: (1, 3) vs (1, 2)."),
        (lambda: jdeq.MonotoneProblem(linear=lambda z, a: z, monotonicity=1.0, lipschitz=2.0),
         "`lipschitz` must be None or callable as lipschitz(args), got 2.0."),
        (lambda: jdeq.MonotoneProblem(linear=lambda z, a: z, monotonicity=1.0, resolvent=(len,)),
         "`resolvent` must be None or a pair (setup, apply) of callables, got (<built-in function len>,)."),
        (lambda: jdeq.MonotoneProblem(linear=lambda z, a: z, monotonicity=1.0, prox=None),
         "`prox` must be callable as prox(v, alpha), got None."),
        (lambda: jdeq.monotone_fixed_point(problem, one, zero, splitting=jdeq.PeacemanRachford(alpha=1.0)),
         "PeacemanRachford needs the problem's `resolvent=(setup, apply)` (a solve with (1 + alpha) I - "
         "alpha W); this problem has none: use ForwardBackward."),
        (lambda: jdeq.monotone_fixed_point(problem, one, zero),
         "ForwardBackward(alpha=None) picks its step from the problem's Lipschitz bound, but the problem "
         "has `lipschitz=None`: give `alpha` or the problem's `lipschitz`."),
        (lambda: jdeq.monotone_fixed_point(
            jdeq.MonotoneProblem(linear=lambda z, a: z, monotonicity=1.0, resolvent=(len, len)), one, zero,
            splitting=jdeq.PeacemanRachford()),
         "PeacemanRachford(alpha=None) picks its step from the problem's Lipschitz bound, but the problem "
         "has `lipschitz=None`: give `alpha` or the problem's `lipschitz`."),
    ]
    for call, message in cases:
        with pytest.raises((TypeError, ValueError)) as e:
            call()
        assert str(e.value) == message


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_trains_and_reduces_loss(kind, adam_losses):
    k1, k2 = jax.random.split(jax.random.key(0))
    if kind == "dense":
        x = jax.random.normal(k1, (32, 6))
        cell = MonotoneDenseCell(6, 16, rngs=nnx.Rngs(0))
        model = MonDEQClassifier(cell, 3, input_shape=(6,), rngs=nnx.Rngs(1))
    else:
        x = jax.random.normal(k1, (32, 6, 1))
        cell = MonotoneConvCell(1, 4, spatial_dims=1, rngs=nnx.Rngs(0))
        model = MonDEQClassifier(cell, 3, input_shape=(6, 1), pool=2,
                                 solver=jdeq.Anderson(tol=1e-4, maxiter=60), rngs=nnx.Rngs(1))
    y = jax.random.randint(k2, (32,), 0, 3)
    losses = adam_losses(model, x, y, 20)
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.85 * losses[0]
