"""Compilation and memory: no recompilation for equal shapes or a new run-time ``maxiter``, and
the compiled training step's temp memory measured with ``memory_analysis()``: flat in the
iteration budget for Implicit (and Phantom), growing with it for Unrolled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq


def _counting_cell(counter):
    def f(z, a):
        counter.append(None)  # runs once per trace, never at run time
        return 0.95 * jnp.tanh(z) + a

    return f


def test_same_shapes_compile_once():
    traces = []
    f = _counting_cell(traces)
    solver = jdeq.FixedPointIteration(tol=1e-5, maxiter=400)
    run = jax.jit(lambda a: jdeq.fixed_point(f, jnp.zeros_like(a), a, solver=solver).value)
    v1 = run(jnp.ones((4, 3)))
    n_traces = len(traces)
    assert n_traces > 0
    v2 = run(2.0 * jnp.ones((4, 3)))
    assert len(traces) == n_traces
    assert run._cache_size() == 1
    assert not np.allclose(v1, v2)
    run(jnp.ones((5, 3)))  # a new shape does compile (the counter is live)
    assert len(traces) > n_traces and run._cache_size() == 2


@pytest.mark.parametrize("solver_cls", [jdeq.FixedPointIteration, jdeq.Anderson, jdeq.Broyden])
def test_runtime_maxiter_does_not_recompile(solver_cls):
    traces = []
    f = _counting_cell(traces)
    solver = solver_cls(tol=1e-6, maxiter=1000, stop_mode="abs")
    run = jax.jit(lambda a, m: jdeq.fixed_point(f, jnp.zeros_like(a), a, solver=solver, maxiter=m).stats)
    a = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    short = run(a, 3)
    n_traces = len(traces)
    long = run(a, 500)
    assert len(traces) == n_traces and run._cache_size() == 1
    np.testing.assert_array_equal(short.nsteps, 3)
    assert not bool(short.converged.any())
    assert bool(long.converged.all())
    assert (np.asarray(long.nsteps) > 3).all() and (np.asarray(long.nsteps) < 500).all()
    assert (np.asarray(long.abs_residual) < np.asarray(short.abs_residual)).all()


def test_runtime_maxiter_does_not_recompile_the_implicit_gradient():
    traces = []
    f = _counting_cell(traces)
    solver = jdeq.Anderson(tol=1e-6, maxiter=1000, stop_mode="abs")

    def loss(a, m):
        return jnp.sum(jdeq.fixed_point(f, jnp.zeros_like(a), a, solver=solver, maxiter=m).value ** 2)

    grad = jax.jit(jax.grad(loss))
    a = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    g_short = grad(a, 2)
    n_traces = len(traces)
    g_long = grad(a, 400)
    g_longer = grad(a, 800)
    assert len(traces) == n_traces and grad._cache_size() == 1
    # Both the forward and the backward budget follow the run-time maxiter.
    np.testing.assert_allclose(g_long, g_longer, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(g_short) - np.asarray(g_long)).max() > 1e-2


def test_deq_can_carry_separate_train_and_eval_budgets():
    f = _counting_cell([])
    solver = jdeq.FixedPointIteration(tol=1e-6, maxiter=5)

    @jax.jit
    def step(a, train_budget, eval_budget):
        train = jdeq.fixed_point(f, jnp.zeros_like(a), a, solver=solver, maxiter=train_budget)
        ev = jdeq.fixed_point(f, jnp.zeros_like(a), a, solver=solver, maxiter=eval_budget)
        return train.stats.nsteps, ev.stats.nsteps

    a = jnp.ones((2, 3))
    n_train, n_eval = step(a, 4, 40)
    np.testing.assert_array_equal(n_train, 4)
    assert (np.asarray(n_eval) > 4).all()
    step(a, 6, 60)
    assert step._cache_size() == 1


# ----------------------------------------------------------------------------- memory

WIDTH, IN, BATCH = 64, 16, 8


def _mlp_cell(z, p):
    return jnp.tanh(z @ p["W"] + p["x"] @ p["U"] + p["b"])


def _train_step_temp_bytes(solver, gradient):
    """Temp bytes of the compiled ``value_and_grad`` of an MLP-cell DEQ's loss (params: the
    cell's W, U, b and a linear readout V; batch 8, width 64)."""
    rng = np.random.default_rng(0)
    params = {
        "W": jnp.asarray(0.5 * rng.normal(size=(WIDTH, WIDTH)) / np.sqrt(WIDTH), jnp.float32),
        "U": jnp.asarray(rng.normal(size=(IN, WIDTH)) / np.sqrt(IN), jnp.float32),
        "b": jnp.zeros((WIDTH,), jnp.float32),
        "V": jnp.asarray(rng.normal(size=(WIDTH, 4)) / np.sqrt(WIDTH), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(BATCH, IN)), jnp.float32)
    y = jnp.ones((BATCH, 4), jnp.float32)

    def loss(params, x, y):
        args = {"W": params["W"], "U": params["U"], "b": params["b"], "x": x}
        z = jdeq.fixed_point(_mlp_cell, jnp.zeros((BATCH, WIDTH)), args, solver=solver, gradient=gradient).value
        return jnp.mean((z @ params["V"] - y) ** 2)

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, x, y).compile()
    analysis = compiled.memory_analysis()
    assert analysis is not None
    return int(analysis.temp_size_in_bytes)


def test_implicit_memory_does_not_grow_with_maxiter():
    short = _train_step_temp_bytes(jdeq.Anderson(maxiter=10), jdeq.Implicit())
    long = _train_step_temp_bytes(jdeq.Anderson(maxiter=200), jdeq.Implicit())
    assert short > 0
    assert short == long, (short, long)


def test_unrolled_memory_grows_with_maxiter():
    short = _train_step_temp_bytes(jdeq.FixedPointIteration(maxiter=10), jdeq.Unrolled())
    long = _train_step_temp_bytes(jdeq.FixedPointIteration(maxiter=200), jdeq.Unrolled())
    implicit = _train_step_temp_bytes(jdeq.FixedPointIteration(maxiter=200), jdeq.Implicit())
    assert long > 5 * short, (short, long)
    # The iterates Unrolled stores (200 x batch x width floats) are more than Implicit's whole
    # temp budget.
    assert long - short > 190 * BATCH * WIDTH * 4
    assert long > 10 * implicit, (long, implicit)


def test_phantom_memory_grows_with_steps_not_maxiter():
    k2 = _train_step_temp_bytes(jdeq.FixedPointIteration(maxiter=10), jdeq.Phantom(steps=2))
    k20 = _train_step_temp_bytes(jdeq.FixedPointIteration(maxiter=10), jdeq.Phantom(steps=20))
    k20_long = _train_step_temp_bytes(jdeq.FixedPointIteration(maxiter=200), jdeq.Phantom(steps=20))
    assert k20 > 2 * k2, (k2, k20)
    assert k20 == k20_long, (k20, k20_long)
