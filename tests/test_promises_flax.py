"""Promises of the Flax adapters' and the model zoo's docstrings (jdeq/nnx.py, jdeq/linen.py,
jdeq/models/), each held by a test that fails when the option is ignored (issue 18).
tests/test_promises.py holds throw=True, the nnx run-time maxiter and remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jdeq

# (numpy: a test module must not start JAX at import, see tests/conftest.py)
X = np.array([[0.5, -1.0, 0.3], [1.2, 0.1, -0.4]], np.float32)
FPI = jdeq.FixedPointIteration(tol=1e-6, maxiter=100)  # the cheapest loop to compile


# ---- nnx.DEQ.record_equilibria: "each call sows (x, z*) into nnx.Intermediate 'equilibria'" ----


def test_nnx_record_equilibria_sows_x_and_z_star():
    deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0)), solver=FPI)
    z, _ = deq(X)
    assert getattr(deq, "equilibria", None) is None  # off by default: nothing recorded
    deq.set_attributes(record_equilibria=True)
    z, _ = deq(X)
    z2, _ = deq(2 * X)
    records = deq.equilibria.get_value()
    assert isinstance(deq.equilibria, nnx.Intermediate) and len(records) == 2
    np.testing.assert_array_equal(records[0][0], X)
    np.testing.assert_array_equal(records[0][1], z)
    np.testing.assert_array_equal(records[1][0], 2 * X)
    np.testing.assert_array_equal(records[1][1], z2)


def test_linen_sows_equilibria_when_intermediates_are_mutable():
    deq = jdeq.linen.DEQ(jdeq.models.linen.MLPCell(features=8), solver=FPI)
    variables = deq.init(jax.random.key(0), X)
    (z, _), state = deq.apply(variables, X, mutable=["intermediates"])
    (x_rec, z_rec), = state["intermediates"]["equilibria"]
    np.testing.assert_array_equal(x_rec, X)
    np.testing.assert_array_equal(z_rec, z)


# ---- linen.DEQ's call: "the keywords override the attributes for this call" -------------------


def test_linen_call_time_solver_maxiter_and_gradient_overrides():
    deq = jdeq.linen.DEQ(jdeq.models.linen.MLPCell(features=8), solver=FPI)
    variables = deq.init(jax.random.key(0), X)
    _, st = deq.apply(variables, X, solver=jdeq.FixedPointIteration(tol=1e-30, maxiter=7))
    np.testing.assert_array_equal(st.nsteps, 7)  # the call's solver (and its budget)
    _, st = deq.apply(variables, X, solver=jdeq.FixedPointIteration(tol=1e-30, maxiter=7), maxiter=3)
    np.testing.assert_array_equal(st.nsteps, 3)
    seen = []
    gradient = jdeq.Implicit(maxiter=2, solver=jdeq.FixedPointIteration(tol=1e-30), callback=seen.append)
    jax.grad(lambda v: jnp.sum(deq.apply(v, X, gradient=gradient)[0]))(variables)
    jax.effects_barrier()
    assert seen and int(np.max(seen[-1].nsteps)) == 2


# ---- linen.DEQ: "a learned solver's arrays become the params 'solver' of this layer" ----------


def test_linen_learned_solver_weights_are_trainable_params():
    params = jdeq.init_mixer(jax.random.key(1), memory=3, hidden=8)
    solver = jdeq.HyperAnderson(params=params, memory=3, tol=1e-5)
    deq = jdeq.linen.DEQ(jdeq.models.linen.MLPCell(features=8), solver=solver)
    variables = deq.init(jax.random.key(0), X)
    held = variables["params"]["solver"]
    assert [np.shape(a) for a in jax.tree.leaves(held)] == [np.shape(a) for a in jax.tree.leaves(params)]
    for a, b in zip(jax.tree.leaves(held), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    # the layer solves with the weights held in its variables: changing them changes the solve
    z, st = deq.apply(variables, X)
    moved = jax.tree.map(lambda a: a + 0.5, variables["params"]["solver"])
    z2, st2 = deq.apply({"params": {**variables["params"], "solver": moved}}, X)
    assert not np.array_equal(np.asarray(st.nsteps), np.asarray(st2.nsteps)) or not np.allclose(z, z2, atol=0)
    # a model's loss differentiates (this used to fail: reverse mode linearized the forward
    # loop through the mixer's weights): zero for the solver under Implicit, which does not
    # differentiate the path, a path gradient under Unrolled
    def grads(gradient):
        return jax.grad(lambda v: jnp.sum(deq.apply(v, X, maxiter=4, gradient=gradient)[0] ** 2))(variables)

    g = grads(jdeq.Implicit())
    assert all(not bool(jnp.any(a)) for a in jax.tree.leaves(g["params"]["solver"]))
    assert any(float(jnp.abs(a).sum()) > 0 for a in jax.tree.leaves(g["params"]["cell"]))
    g = grads(jdeq.Unrolled())
    assert any(float(jnp.abs(a).sum()) > 0 for a in jax.tree.leaves(g["params"]["solver"]))


# ---- linen.DEQ.jacobian_penalty with a cell that has no init_z (z0 given at the call) --------


class _NoInitZCell(nn.Module):
    @nn.compact
    def __call__(self, z, x):
        return jnp.tanh(0.5 * nn.Dense(8, use_bias=False)(z) + nn.Dense(8)(x))


def test_linen_jacobian_penalty_needs_no_init_z():
    deq = jdeq.linen.DEQ(_NoInitZCell(), solver=FPI)
    z0 = jnp.zeros((2, 8))
    variables = deq.init(jax.random.key(0), X, z0)
    z, _ = deq.apply(variables, X, z0)
    reg = deq.apply(variables, X, z, jax.random.key(1), gamma=1.0, method=jdeq.linen.DEQ.jacobian_penalty)
    assert np.isfinite(float(reg)) and float(reg) > 0


def test_linen_jacobian_penalty_as_the_init_method_creates_the_layers_variables():
    """``init(..., method=DEQ.jacobian_penalty)`` (a loss that only regularizes) builds the cell
    from ``x`` and ``z_star`` with the same variables as ``init(key, x, z0)``."""
    deq = jdeq.linen.DEQ(_NoInitZCell(), solver=FPI)
    z0 = jnp.zeros((2, 8))
    want = deq.init(jax.random.key(0), X, z0)
    got = deq.init(jax.random.key(0), X, z0, jax.random.key(1), gamma=1.0, method=jdeq.linen.DEQ.jacobian_penalty)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_linen_jacobian_penalty_passes_every_option_to_the_core():
    """``gamma, prob, num_samples, noise`` "as in jdeq.jacobian_penalty": the layer's method is
    the core function on the bound cell, option for option (Rademacher probes differ from the
    default Gaussian ones, so a dropped ``noise`` would show)."""
    deq = jdeq.linen.DEQ(_NoInitZCell(), solver=FPI)
    z0 = jnp.zeros((2, 8))
    variables = deq.init(jax.random.key(0), X, z0)
    z, _ = deq.apply(variables, X, z0)
    cell = _NoInitZCell()
    f = lambda zz, a: cell.apply({"params": a[0]}, zz, a[1])  # noqa: E731
    key = jax.random.key(2)
    keys = jax.random.split(key, 8)
    for opts in ({}, {"num_samples": 3, "noise": "rademacher"}, {"num_samples": 2, "noise": "normal"},
                 {"prob": 0.4}):
        got = jax.vmap(lambda k: deq.apply(variables, X, z, k, gamma=0.7,  # noqa: B023
                                           method=jdeq.linen.DEQ.jacobian_penalty, **opts))(keys)
        want = jax.vmap(lambda k: jdeq.jacobian_penalty(  # noqa: B023
            f, z, (variables["params"]["cell"], X), k, gamma=0.7, **opts))(keys)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        if "prob" in opts:  # with these keys, some calls skip the penalty and some compute it
            assert 0 < int(jnp.sum(got == 0)) < len(keys), got
    rad = deq.apply(variables, X, z, key, gamma=0.7, num_samples=3, noise="rademacher",
                    method=jdeq.linen.DEQ.jacobian_penalty)
    gauss = deq.apply(variables, X, z, key, gamma=0.7, num_samples=3, method=jdeq.linen.DEQ.jacobian_penalty)
    assert abs(float(rad) - float(gauss)) > 1e-4


# ---- batched=False: "one example per call, for per-example code under vmap" ------------------


class _AnyShapeCell(nn.Module):
    """A Linen cell that works on one example or on a batch (Dense maps the last axis)."""

    @nn.compact
    def __call__(self, z, x):
        return jnp.tanh(0.5 * nn.Dense(8, use_bias=False, name="w")(z) + nn.Dense(8, name="u")(x))

    def init_z(self, x):
        return jnp.zeros(x.shape[:-1] + (8,), x.dtype)


def test_linen_batched_false_attribute_and_override():
    """``batched=False``: one example per call (per-example code under ``jax.vmap``); values
    equal the batched layer's (tests/test_vmap.py holds the nnx layer's)."""
    solver = FPI
    batched = jdeq.linen.DEQ(_AnyShapeCell(), solver=solver)
    one = jdeq.linen.DEQ(_AnyShapeCell(), solver=solver, batched=False)
    variables = batched.init(jax.random.key(0), X)
    z, _ = batched.apply(variables, X)
    z_one, st_one = one.apply(variables, X[0])
    assert z_one.shape == (8,) and np.ndim(st_one.nsteps) == 0
    np.testing.assert_allclose(z_one, z[0], atol=1e-5)
    z_map, st_map = jax.vmap(lambda x: one.apply(variables, x))(X)
    np.testing.assert_allclose(z_map, z, atol=1e-5)
    assert st_map.nsteps.shape == (2,)
    np.testing.assert_allclose(batched.apply(variables, X[1], batched=False)[0], z[1], atol=1e-5)


# ---- Unrolled: depth and its per-call override -------------------------------------------------


def test_nnx_unrolled_depth_and_override_apply_the_cell_that_many_times():
    cell = jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0))
    net = jdeq.nnx.Unrolled(cell, depth=4)

    def manual(depth):
        z = cell.init_z(X)
        for _ in range(depth):
            z = cell(z, X)
        return z

    z4, st4 = net(X)
    z7, st7 = net(X, depth=7)
    np.testing.assert_allclose(z4, manual(4), rtol=1e-6)
    np.testing.assert_allclose(z7, manual(7), rtol=1e-6)
    np.testing.assert_array_equal(st4.nsteps, 4)
    np.testing.assert_array_equal(st7.nsteps, 7)


def test_nnx_unrolled_starts_from_the_given_z0():
    """``net(x, z0)``: the applications start at ``z0``, not at ``cell.init_z(x)``."""
    cell = jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0))
    z0 = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8)), jnp.float32)
    z, _ = jdeq.nnx.Unrolled(cell, depth=2)(X, z0)
    np.testing.assert_allclose(z, cell(cell(z0, X), X), rtol=1e-6)
    assert not np.allclose(z, cell(cell(cell.init_z(X), X), X), atol=1e-3)


def _pure_cell(cell):
    """``(f, state)`` with ``f(z, (state, x)) == cell(z, x)``: the cell as the core functions take it."""
    graphdef, state = nnx.split(cell)
    return (lambda z, a: nnx.merge(graphdef, a[0])(z, a[1])), state


def test_nnx_jacobian_penalty_passes_every_option_to_the_core():
    """nnx ``DEQ.jacobian_penalty``: ``gamma, prob, num_samples, noise`` "as in
    jdeq.jacobian_penalty", defaults included: the core function on the cell's pure function,
    option for option (Rademacher probes differ from the default Gaussian ones, so a dropped
    ``noise`` would show; so would a dropped ``num_samples`` or ``prob``)."""
    deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0)), solver=FPI)
    z, _ = deq(X)
    f, state = _pure_cell(deq.cell)
    keys = jax.random.split(jax.random.key(2), 8)
    for opts in ({}, {"num_samples": 3, "noise": "rademacher"}, {"num_samples": 3}, {"prob": 0.4}):
        got = jnp.stack([deq.jacobian_penalty(X, z, k, gamma=0.7, **opts) for k in keys])
        want = jax.vmap(lambda k: jdeq.jacobian_penalty(f, z, (state, X), k, gamma=0.7, **opts))(keys)  # noqa: B023
        np.testing.assert_allclose(got, want, rtol=1e-5)
        if "prob" in opts:  # with these keys, some calls skip the penalty and some compute it
            assert 0 < int(jnp.sum(got == 0)) < len(keys), got
    one = deq.jacobian_penalty(X, z, keys[0], gamma=0.7)
    assert abs(float(one) - float(deq.jacobian_penalty(X, z, keys[0], gamma=0.7, num_samples=3))) > 1e-5
    assert abs(float(one) - float(deq.jacobian_penalty(X, z, keys[0], gamma=0.7, noise="rademacher"))) > 1e-5


def test_nnx_solver_loss_starts_from_the_given_z0():
    """``DEQ.solver_loss(x, steps=..., z0=...)``: the learned solver's path starts at ``z0``
    (``jdeq.hyper_loss`` from that start), not at ``cell.init_z(x)``."""
    solver = jdeq.HyperAnderson(params=jdeq.init_mixer(jax.random.key(1), memory=3, hidden=8), memory=3)
    deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0)), solver=solver)
    f, state = _pure_cell(deq.cell)
    z0 = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8)), jnp.float32)
    got = deq.solver_loss(X, steps=4, z0=z0)
    np.testing.assert_allclose(got, jdeq.hyper_loss(f, z0, (state, X), solver, steps=4), rtol=1e-5)
    assert abs(float(got) - float(deq.solver_loss(X, steps=4))) > 1e-3


def test_linen_unrolled_depth_override():
    net = jdeq.linen.Unrolled(jdeq.models.linen.MLPCell(features=8), depth=3)
    variables = net.init(jax.random.key(0), X)
    _, st = net.apply(variables, X, depth=6)
    np.testing.assert_array_equal(st.nsteps, 6)
    z6, _ = net.apply(variables, X, depth=6)
    z3, _ = net.apply(variables, X)
    assert not np.allclose(z3, z6)


# ---- models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [0.2, 2.5])
def test_monotone_dense_cell_m_is_the_strong_monotonicity(m):
    """``m``: strong monotonicity of ``I - W``: the symmetric part of ``I - W`` is ``>= m I``,
    with equality in the direction that ``A`` does not reach."""
    cell = jdeq.models.MonotoneDenseCell(3, 6, m=m, rngs=nnx.Rngs(0))
    cell.A[...] = cell.A[...].at[0].set(0.0).at[:, 0].set(0.0)  # A e0 = 0: equality along e0
    i_w = np.eye(6) - np.asarray(cell.weight(), np.float64)
    eig = np.linalg.eigvalsh(0.5 * (i_w + i_w.T))
    np.testing.assert_allclose(eig.min(), m, rtol=1e-5)


@pytest.mark.parametrize("rate", [0.25, 0.75])
def test_variational_dropout_rate_drops_that_fraction(rate):
    drop = jdeq.models.VariationalDropout((400,), rate, rngs=nnx.Rngs(dropout=0))
    drop.reset(8)
    y = np.asarray(drop(jnp.ones((8, 400))))
    dropped = (y == 0).mean()
    assert abs(dropped - rate) < 0.04, dropped
    np.testing.assert_allclose(y[y != 0], 1 / (1 - rate), rtol=1e-6)  # inverted dropout
    drop.eval()
    np.testing.assert_array_equal(drop(jnp.ones((8, 400))), 1.0)  # deterministic: identity


def test_mixed_precision_computes_in_compute_dtype_and_returns_zs_dtype():
    cell = jdeq.models.MLPCell(3, 16, rngs=nnx.Rngs(0))
    z = jax.random.normal(jax.random.key(1), (2, 16))
    full = cell(z, X)
    low = jdeq.models.MixedPrecision(cell)(z, X)
    same = jdeq.models.MixedPrecision(cell, compute_dtype=jnp.float32)(z, X)
    assert low.dtype == same.dtype == jnp.float32
    np.testing.assert_array_equal(same, full)
    err = float(jnp.max(jnp.abs(low - full)))
    assert 1e-4 < err < 5e-2, err  # bfloat16 arithmetic: ~3 significant digits
    np.testing.assert_array_equal(low, low.astype(jnp.bfloat16).astype(jnp.float32))  # bf16 values
    grads = nnx.grad(lambda c: jnp.sum(jdeq.models.MixedPrecision(c)(z, X)))(cell)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


# ---- MonDEQ: default splitting, record_equilibria, maxiter, throw ------------------------------


def _mon_cell():
    return jdeq.models.MonotoneDenseCell(3, 6, rngs=nnx.Rngs(0))


def test_mondeq_default_splitting_is_peaceman_rachford_for_a_dense_cell():
    """``splitting=None``: "Peaceman-Rachford when the cell offers a resolvent (dense)"."""
    solver = jdeq.FixedPointIteration(tol=1e-6, maxiter=300)
    z, st = jdeq.models.MonDEQ(_mon_cell(), solver=solver)(X)
    z_pr, st_pr = jdeq.models.MonDEQ(_mon_cell(), splitting=jdeq.PeacemanRachford(), solver=solver)(X)
    z_fb, st_fb = jdeq.models.MonDEQ(_mon_cell(), splitting=jdeq.ForwardBackward(), solver=solver)(X)
    np.testing.assert_array_equal(z, z_pr)
    np.testing.assert_array_equal(st.nsteps, st_pr.nsteps)
    assert not np.array_equal(st.nsteps, st_fb.nsteps)


def test_mondeq_records_equilibria_and_takes_maxiter_and_throw():
    layer = jdeq.models.MonDEQ(_mon_cell(), solver=jdeq.FixedPointIteration(tol=1e-12, maxiter=300))
    _, st = layer(X, maxiter=4)
    np.testing.assert_array_equal(st.nsteps, 4)
    assert getattr(layer, "equilibria", None) is None
    layer.record_equilibria = True
    z, _ = layer(X)
    (x_rec, z_rec), = layer.equilibria.get_value()
    np.testing.assert_array_equal(x_rec, X)
    np.testing.assert_array_equal(z_rec, z)
    strict = jdeq.models.MonDEQ(_mon_cell(), solver=jdeq.FixedPointIteration(tol=1e-12, maxiter=3), throw=True)
    with pytest.raises(RuntimeError, match="did not converge"):
        jax.block_until_ready(strict(X)[0])


# ---- Unrolled(remat=True) as a constructor setting (tests/test_promises.py holds the per-call one) --


def _grad_temp_bytes(fn, *args) -> int:
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


@pytest.mark.parametrize("flavour", ["nnx", "linen"])
def test_remat_set_at_construction_lowers_the_compiled_memory(flavour):
    depth, width, batch = 24, 64, 32
    x = jnp.ones((batch, width))

    def loss_of(remat):  # remat None: the constructor's default (documented: False, stored)
        kw = {} if remat is None else {"remat": remat}
        if flavour == "nnx":
            net = jdeq.nnx.Unrolled(jdeq.models.MLPCell(width, width, rngs=nnx.Rngs(0)), depth=depth, **kw)
            graphdef, state = nnx.split(net)
            return (lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x)[0] ** 2)), state
        net = jdeq.linen.Unrolled(cell=jdeq.models.linen.MLPCell(features=width), depth=depth, **kw)
        return (lambda s, x: jnp.sum(net.apply(s, x)[0] ** 2)), net.init(jax.random.key(0), x)

    stored = _grad_temp_bytes(jax.grad(loss_of(False)[0]), loss_of(False)[1], x)
    loss, state = loss_of(True)
    recomputed = _grad_temp_bytes(jax.grad(loss), state, x)
    assert recomputed * 2 < stored, (recomputed, stored)
    loss, state = loss_of(None)
    assert _grad_temp_bytes(jax.grad(loss), state, x) == stored  # the default stores


@pytest.mark.parametrize("m", [2.0])
def test_monotone_conv_cell_m_is_the_strong_monotonicity(m):
    """``<(I - W) v, v> = m ||v||^2 + ||A v||^2`` (``B - B^T`` is skew): equality with ``A = 0``."""
    cell = jdeq.models.MonotoneConvCell(1, 3, m=m, rngs=nnx.Rngs(0))
    v = jax.random.normal(jax.random.key(2), (2, 5, 5, 3))
    problem = cell.problem(jnp.zeros_like(v))
    assert problem.monotonicity == m

    def form(op):
        return float(jnp.sum((v - problem.linear(v, op)) * v))

    op = cell.operator()
    vv = float(jnp.sum(v * v))
    assert form(op) >= m * vv * (1 - 1e-5)
    assert form({**op, "A": jnp.zeros_like(op["A"])}) == pytest.approx(m * vv, rel=1e-5)


# ---- nnx.DEQ.__call__: run-time overrides are checked as the constructor's arguments are ----


@pytest.mark.parametrize("name, bad, message", [
    ("solver", "anderson", "`solver` must be a jdeq.Solver"),
    ("gradient", jdeq.Anderson(), "`gradient` must be a jdeq.Gradient"),
    ("throw", "yes", "`throw` must be a bool"),
    ("batched", "yes", "`batched` must be a bool"),
])
def test_nnx_call_time_overrides_are_validated(name, bad, message):
    deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0)), solver=FPI)
    with pytest.raises(TypeError, match=message):
        deq(X, **{name: bad})
