"""The v0.2 contract of the layers and the open protocols: user-defined solvers and gradient
modes work everywhere, budget = depth exactly, per-call overrides (reaching the backward pass),
learned-solver weights as layer state, the Jacobian penalty through every equilibrium layer,
and NaN inputs that cannot poison the shared weights' gradient."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdeq
import jdeq.train as T


@dataclasses.dataclass(frozen=True, kw_only=True)
class HalfStep(jdeq.Solver):
    """A user's solver: damped iteration with its own fixed damping 1/2."""

    def init(self, z):
        return ()

    def update(self, state, k, z, fz):
        return 0.5 * (z + fz), state


@dataclasses.dataclass(frozen=True)
class Neumann(jdeq.Gradient):
    """A user's gradient mode: the implicit gradient by a truncated Neumann series,
    (I - J)^{-T} g ~ sum_{i<k} (J^T)^i g, written with a custom_vjp."""

    terms: int = 60

    def attach(self, f, z_star, args, *, solver, maxiter, stats):
        terms = self.terms

        @jax.custom_vjp
        def ident(z, a):
            return z

        def fwd(z, a):
            return z, (z, a)

        def bwd(res, g):
            z, a = res
            _, vjp_z = jax.vjp(lambda z: f(z, a), z)
            u, acc = g, g
            for _ in range(terms - 1):
                u = vjp_z(u)[0]
                acc = jax.tree.map(jnp.add, acc, u)
            _, vjp_a = jax.vjp(lambda a: f(z, a), a)
            return jax.tree.map(jnp.zeros_like, z), vjp_a(acc)[0]

        ident.defvjp(fwd, bwd)
        return ident(jax.lax.stop_gradient(z_star), args)


def cell(z, p):
    return jnp.tanh(z @ p["W"] + p["x"])


def make_params(n=4, d=5, dtype=jnp.float64):
    k1, k2 = jax.random.split(jax.random.key(2))
    return {"W": jax.random.normal(k1, (d, d), dtype) * 0.6 / np.sqrt(d), "x": jax.random.normal(k2, (n, d), dtype)}


# ----------------------------------------------------------------------------- user protocols


def test_user_solver_and_gradient_in_fixed_point(x64):
    p = make_params()
    ref = jdeq.fixed_point(cell, jnp.zeros((4, 5)), p, solver=jdeq.Anderson(tol=1e-12, maxiter=100))
    sol = jdeq.fixed_point(cell, jnp.zeros((4, 5)), p, solver=HalfStep(tol=1e-12, maxiter=400))
    np.testing.assert_allclose(sol.value, ref.value, atol=1e-11)
    loss = lambda p, s, g: jnp.sum(jnp.sin(jdeq.fixed_point(cell, jnp.zeros((4, 5)), p, solver=s, gradient=g).value))  # noqa: E731
    g_ref = jax.grad(loss)(p, jdeq.Anderson(tol=1e-12, maxiter=100), jdeq.Implicit())
    g_user = jax.grad(loss)(p, HalfStep(tol=1e-12, maxiter=400), Neumann(terms=80))
    for a, b in zip(jax.tree.leaves(g_user), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
    # the user's solver is also the backward solver of Implicit
    g_back = jax.grad(loss)(p, jdeq.Anderson(tol=1e-12, maxiter=100), jdeq.Implicit(solver=HalfStep(tol=1e-12, maxiter=400)))
    for a, b in zip(jax.tree.leaves(g_back), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def test_user_solver_and_gradient_in_both_flax_layers():
    cell_nnx = jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    ref = jdeq.nnx.DEQ(cell_nnx, solver=jdeq.Anderson(tol=1e-6, maxiter=100))
    user = jdeq.nnx.DEQ(cell_nnx, solver=HalfStep(tol=1e-6, maxiter=300), gradient=Neumann())
    np.testing.assert_allclose(user(x)[0], ref(x)[0], atol=1e-5)
    g_ref = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(ref)
    g_user = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(user)
    for a, b in zip(jax.tree.leaves(g_user), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)
    lin_ref = jdeq.linen.DEQ(jdeq.models.linen.MLPCell(features=8), solver=jdeq.Anderson(tol=1e-6, maxiter=100))
    lin_user = jdeq.linen.DEQ(jdeq.models.linen.MLPCell(features=8), solver=HalfStep(tol=1e-6, maxiter=300),
                              gradient=Neumann())
    v = lin_ref.init(jax.random.key(0), x)
    np.testing.assert_allclose(lin_user.apply(v, x)[0], lin_ref.apply(v, x)[0], atol=1e-5)
    gl_ref = jax.grad(lambda v: jnp.sum(lin_ref.apply(v, x)[0] ** 2))(v)
    gl_user = jax.grad(lambda v: jnp.sum(lin_user.apply(v, x)[0] ** 2))(v)
    for a, b in zip(jax.tree.leaves(gl_user), jax.tree.leaves(gl_ref)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)


def test_an_incomplete_user_solver_or_gradient_says_what_it_lacks():
    """A subclass of the extension points that misses a method raises NotImplementedError
    naming the subclass and the method's signature."""
    import dataclasses

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class NoUpdate(jdeq.Solver):
        def init(self, z):
            return ()

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class NoInit(jdeq.Solver):
        pass

    class NoAttach(jdeq.Gradient):
        pass

    f = lambda z, a: 0.5 * z + a  # noqa: E731
    z0, a = jnp.zeros((2, 3)), jnp.ones((2, 3))
    cases = [
        (NoUpdate(), jdeq.Implicit(), "NoUpdate must implement update(state, k, z, fz) -> (z_next, state)."),
        (NoInit(), jdeq.Implicit(), "NoInit must implement init(z) -> state."),
        (jdeq.Anderson(), NoAttach(), "NoAttach must implement attach(...) or override solve(...)."),
    ]
    for solver, gradient, message in cases:
        with pytest.raises(NotImplementedError) as e:
            jdeq.fixed_point(f, z0, a, solver=solver, gradient=gradient)
        assert str(e.value) == message


@dataclasses.dataclass(frozen=True, kw_only=True)
class LearnedDamping(jdeq.Solver):
    """A user's solver with a trainable per-coordinate damping (a leaf_field) and the user's own
    field metadata on it."""

    logit: Any = jdeq.leaf_field(default=None, metadata={"doc": "damping logits"})

    def init(self, z):
        return ()

    def update(self, state, k, z, fz):
        beta = jax.nn.sigmoid(self.logit)
        return z + beta * (fz - z), state


def test_a_user_solvers_leaf_field_is_a_trainable_leaf_and_keeps_its_metadata():
    """``jdeq.leaf_field``: the field is a pytree leaf of the config (the options stay static),
    it keeps the user's own metadata, and a loss is differentiable with respect to it through
    ``jit`` (with the Unrolled gradient, which backpropagates through the solver's steps)."""
    (field,) = [f for f in dataclasses.fields(LearnedDamping) if f.name == "logit"]
    assert field.metadata["doc"] == "damping logits" and field.metadata["leaf"] is True
    assert LearnedDamping().logit is None  # the field's other options (its default) hold
    solver = LearnedDamping(logit=jnp.zeros(3), maxiter=8)
    leaves, treedef = jax.tree_util.tree_flatten(solver)
    assert len(leaves) == 1 and jax.tree_util.tree_unflatten(treedef, leaves).maxiter == 8
    f = lambda z, a: 0.5 * z + a  # noqa: E731

    @jax.jit
    def loss(solver):
        z = jdeq.fixed_point(f, jnp.zeros((2, 3)), jnp.ones((2, 3)), solver=solver, gradient=jdeq.Unrolled())
        return jnp.sum(z.value)

    g = jax.grad(loss)(solver)
    assert isinstance(g, LearnedDamping) and g.logit.shape == (3,)
    assert bool(jnp.all(g.logit > 0))  # a longer step toward f(z) moves z_8 from 0 closer to z* = 2


def test_configs_are_pytrees_with_static_options():
    solver = jdeq.HyperAnderson(params=jdeq.init_mixer(jax.random.key(0)), memory=5, tol=1e-3)
    leaves, treedef = jax.tree_util.tree_flatten(solver)
    assert len(leaves) == 4  # the mixer's arrays; the options are static
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.tol == 1e-3 and rebuilt.memory == 5
    assert jax.tree_util.tree_leaves(jdeq.Anderson(memory=3)) == []
    assert jax.tree_util.tree_leaves(jdeq.Implicit(tol=1e-3)) == []
    # a config crosses jit as an argument (arrays traced, options static)
    out = jax.jit(lambda s: s.tol * jnp.sum(s.params["w1"]))(solver)
    np.testing.assert_allclose(out, 1e-3 * jnp.sum(solver.params["w1"]), rtol=1e-6)


def test_hyper_anderson_trains_as_layer_state():
    """The mixer's weights are SolverParam state of the DEQ (visible to nnx.split, trained by an
    nnx.Optimizer through the layer); no parallel path: the layer's gradient is that of
    jdeq.hyper_loss on the same weights, and a small step lowers the loss."""
    solver = jdeq.HyperAnderson(params=jdeq.init_mixer(jax.random.key(0), memory=5), memory=5, tol=1e-5,
                                safeguard=False)  # (the safeguard's switches make the loss piecewise)
    cell_nnx = jdeq.models.MLPCell(3, 16, w_scale=0.9, rngs=nnx.Rngs(0))
    deq = jdeq.nnx.DEQ(cell_nnx, solver=solver)
    params = nnx.state(deq, jdeq.nnx.SolverParam)
    assert len(jax.tree.leaves(params)) == 4
    x = jax.random.normal(jax.random.key(1), (32, 3))
    loss_of = lambda d: d.solver_loss(x, steps=10)  # noqa: E731
    grads = nnx.grad(loss_of, argnums=nnx.DiffState(0, jdeq.nnx.SolverParam))(deq)
    graphdef, state = nnx.split(cell_nnx)
    f = lambda z, a: nnx.merge(graphdef, a[0])(z, a[1])  # noqa: E731
    ref = jax.grad(lambda p: jdeq.hyper_loss(f, jnp.zeros((32, 16)), (state, x),
                                              jdeq.HyperAnderson(params=p, memory=5, tol=1e-5, safeguard=False),
                                              steps=10))(solver.params)
    got = [g[...] for g in grads["solver_params"].values()]
    for a, b in zip(got, jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(ref["w2"]).sum()) > 0
    opt = nnx.Optimizer(deq, optax.sgd(1e-6), wrt=jdeq.nnx.SolverParam)  # a first-order step
    before = float(loss_of(deq))
    opt.update(deq, grads)
    assert float(loss_of(deq)) < before
    assert not np.allclose(deq.solver.params["w2"], 0)  # the layer's solver is the trained one


# ----------------------------------------------------------------------------- budget = depth


@pytest.mark.parametrize("L", [1, 2, 7])
def test_budget_equals_depth_in_both_layers(L):
    cell_nnx = jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    fpi = jdeq.FixedPointIteration(tol=1e-30)  # unreachable: exactly maxiter evaluations
    deq = jdeq.nnx.DEQ(cell_nnx, solver=fpi)
    net = jdeq.nnx.Unrolled(cell_nnx, depth=L)
    z_deq, st = deq(x, maxiter=L)
    np.testing.assert_array_equal(st.nsteps, L)
    np.testing.assert_allclose(z_deq, net(x)[0], rtol=1e-6, atol=1e-7)
    assert L == 1 or not np.allclose(z_deq, net(x, depth=L - 1)[0], atol=1e-4)
    lin_deq = jdeq.linen.DEQ(jdeq.models.linen.MLPCell(features=8), solver=fpi)
    lin_net = jdeq.linen.Unrolled(jdeq.models.linen.MLPCell(features=8), depth=L)
    v = lin_deq.init(jax.random.key(0), x)
    # (two different programs, a loop and an unrolled chain: their float32 roundings may differ)
    np.testing.assert_allclose(lin_deq.apply(v, x, maxiter=L)[0], lin_net.apply(v, x)[0], rtol=1e-6, atol=1e-6)


def test_maxiter_one_is_one_application_not_z0():
    cell_nnx = jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 3))
    z, _ = jdeq.nnx.DEQ(cell_nnx, solver=jdeq.FixedPointIteration())(x, maxiter=1)
    np.testing.assert_allclose(z, cell_nnx(jnp.zeros((2, 8)), x), rtol=1e-6)


# ----------------------------------------------------------------------------- per-call overrides


def test_per_call_overrides_reach_forward_and_backward():
    cell_nnx = jdeq.models.MLPCell(3, 8, w_scale=0.95, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    deq = jdeq.nnx.DEQ(cell_nnx, solver=jdeq.Anderson(tol=1e-6, maxiter=50),
                       gradient=jdeq.Implicit(callback=None))
    z, st = deq(x, solver=jdeq.FixedPointIteration(tol=1e-30), maxiter=3)
    np.testing.assert_array_equal(st.nsteps, 3)
    seen = []
    grad_fn = nnx.grad(lambda m, g: jnp.sum(m(x, gradient=g, maxiter=40)[0]))
    grad_fn(deq, jdeq.Implicit(maxiter=2, solver=jdeq.FixedPointIteration(tol=1e-30), callback=seen.append))
    jax.effects_barrier()
    assert seen and int(np.asarray(seen[0].nsteps).max()) == 2  # the backward got the override
    # throw=True per call raises through the layer
    with pytest.raises(Exception, match="did not converge"):
        jax.block_until_ready(deq(x, maxiter=2, throw=True)[0])
    # the layer's own settings are untouched
    assert deq.solver == jdeq.Anderson(tol=1e-6, maxiter=50) and not deq.throw


def test_eval_maxiter_in_eval_mode():
    # a slow contraction (0.95): 50 float32 iterations cannot reach an exact fixed point, where
    # even tol=1e-30 would be met (a fast cell gets there in ~20 at some compiler settings)
    deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(3, 8, w_scale=0.95, rngs=nnx.Rngs(0)),
                       solver=jdeq.FixedPointIteration(tol=1e-30), eval_maxiter=3)
    x = jnp.ones((2, 3))
    assert int(deq(x)[1].nsteps[0]) == 50
    deq.eval()
    assert int(deq(x)[1].nsteps[0]) == 3
    assert int(deq(x, maxiter=5)[1].nsteps[0]) == 5


def test_a_bad_eval_maxiter_is_refused_by_name():
    cell = jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0))
    for value, kind in [(0, ValueError), (2.5, TypeError)]:
        with pytest.raises(kind) as e:
            jdeq.nnx.DEQ(cell, eval_maxiter=value)
        assert str(e.value) == f"`eval_maxiter` must be an int >= 1, got {value}."


# ----------------------------------------------------------------------------- NaN inputs


@pytest.mark.parametrize("gradient", [jdeq.Implicit(), jdeq.Phantom(steps=3), jdeq.JacobianFree(), jdeq.Unrolled()],
                         ids=["implicit", "phantom", "jfb", "unrolled"])
def test_nan_input_example_cannot_poison_the_weight_gradient(gradient):
    """Observation 6: one example with NaN input, masked out of the loss, used to make the
    shared weights' gradient NaN (0 * NaN in the VJP). The layers now guard their inputs."""
    cell_nnx = jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0))
    deq = jdeq.nnx.DEQ(cell_nnx, solver=jdeq.Anderson(tol=1e-6, maxiter=30), gradient=gradient)
    x = jax.random.normal(jax.random.key(1), (4, 3)).at[2, 1].set(jnp.nan)
    keep = jnp.array([1.0, 1.0, 0.0, 1.0])[:, None]

    def loss(m, x):
        z, _ = m(x)
        return jnp.sum(jnp.where(keep > 0, z, 0.0) ** 2)

    z, st = deq(x)
    assert z.shape == (4, 8) and st.nonfinite.shape == (4,)  # the guard keeps every shape
    assert bool(st.nonfinite[2]) and not bool(st.converged[2])
    np.testing.assert_array_equal(z[2], 0.0)  # z0: no finite iterate
    g = nnx.grad(loss)(deq, x)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(g))
    # and equals the gradient of the batch without that example
    clean = jnp.delete(x, 2, axis=0)
    g_ref = nnx.grad(lambda m, x: jnp.sum(m(x)[0] ** 2))(deq, clean)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # linen too
    lin = jdeq.linen.DEQ(jdeq.models.linen.MLPCell(features=8), solver=jdeq.Anderson(tol=1e-6, maxiter=30),
                         gradient=gradient)
    v = lin.init(jax.random.key(0), clean)
    assert lin.apply(v, x)[0].shape == (4, 8)
    gl = jax.grad(lambda v: jnp.sum(jnp.where(keep > 0, lin.apply(v, x)[0], 0.0) ** 2))(v)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(gl))


class _TwoInputCell(nnx.Module):
    """A cell whose input is a pair: per-example features (batch, 4) and a per-example scalar
    (batch,), the one-axis leaf that the guard must still read per example."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, z, x):
        a, s = x
        # (+ 0.1: z0 = 0 is not a fixed point of a zeroed input, so what the guard reports for
        # a flagged example differs from a solve of it)
        return jnp.tanh(0.5 * self.lin(z) + a + s[:, None] + 0.1)

    def init_z(self, x):
        return jnp.zeros_like(x[0])


def test_nan_guard_reads_every_input_leaf_and_reports_nan_residuals():
    """The guard's promises: every floating leaf with the batch axis counts, a (batch,) leaf
    included; a flagged example is reported as an unguarded solve reports it (value z0, NaN
    residuals, nsteps 1, nonfinite, not converged), and its neighbours are untouched."""
    deq = jdeq.nnx.DEQ(_TwoInputCell(nnx.Rngs(0)), solver=jdeq.Anderson(tol=1e-6, maxiter=40))
    a = jax.random.normal(jax.random.key(1), (5, 4))
    s = jnp.linspace(-1.0, 1.0, 5)
    z_clean, st_clean = deq((a, s))
    bad_a = a.at[3, 2].set(jnp.nan)  # the first leaf: example 3
    bad_s = s.at[1].set(jnp.inf)  # the second, one-axis leaf: example 1
    z, st = deq((bad_a, bad_s))
    flagged = np.array([False, True, False, True, False])
    np.testing.assert_array_equal(st.nonfinite, flagged)
    np.testing.assert_array_equal(st.converged, ~flagged)
    np.testing.assert_array_equal(np.isnan(st.abs_residual), flagged)
    np.testing.assert_array_equal(np.isnan(st.rel_residual), flagged)
    np.testing.assert_array_equal(np.asarray(st.nsteps)[flagged], 1)
    np.testing.assert_array_equal(z[flagged], 0.0)
    np.testing.assert_allclose(z[~flagged], z_clean[~flagged], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(st.nsteps[~flagged], st_clean.nsteps[~flagged])
    # and the weights' gradient of the other examples' loss stays finite
    keep = jnp.asarray(~flagged, jnp.float32)[:, None]
    g = nnx.grad(lambda m: jnp.sum(keep * jnp.where(keep > 0, m((bad_a, bad_s))[0], 0.0) ** 2))(deq)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(g))
    # a batch of one example, whose one-entry leaf is NaN, is guarded too
    z1, st1 = deq((a[:1], jnp.array([jnp.nan])))
    assert bool(st1.nonfinite[0]) and int(st1.nsteps[0]) == 1
    np.testing.assert_array_equal(z1, 0.0)
    g1 = nnx.grad(lambda m: jnp.sum(jnp.where(False, m((a[:1], jnp.array([jnp.nan])))[0], 0.0)))(deq)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(g1))


class _KeyedCell(nnx.Module):
    """Input ``(a, keys, scale)``: features, one typed PRNG key per example (a fixed random
    offset of its own) and a Python number: leaves that are not floating arrays."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, z, x):
        a, keys, scale = x
        noise = jax.vmap(lambda k: jax.random.normal(k, (4,)))(keys)
        return jnp.tanh(0.5 * self.lin(z) + a + scale * noise)

    def init_z(self, x):
        return jnp.zeros_like(x[0])


def test_nan_guard_passes_keys_and_python_numbers_through():
    """Leaves that cannot hold NaN (typed PRNG keys, a Python float) are neither read nor
    zeroed: the NaN example is flagged, the others solve as without it."""
    deq = jdeq.nnx.DEQ(_KeyedCell(nnx.Rngs(0)), solver=jdeq.Anderson(tol=1e-6, maxiter=40))
    a = jax.random.normal(jax.random.key(1), (3, 4))
    keys = jax.random.split(jax.random.key(2), 3)
    z_clean, _ = deq((a, keys, 0.3))
    z, st = deq((a.at[0, 1].set(jnp.nan), keys, 0.3))
    np.testing.assert_array_equal(st.nonfinite, [True, False, False])
    np.testing.assert_allclose(z[1:], z_clean[1:], rtol=1e-5, atol=1e-6)


class _SharedShiftCell(nnx.Module):
    """Input ``(a, shift)``: per-example features ``a`` and a ``shift`` shared by every example
    (no batch axis), which the guard must leave alone."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, z, x):
        a, shift = x
        return jnp.tanh(0.5 * self.lin(z) + a + shift)

    def init_z(self, x):
        return jnp.zeros_like(x[0])


def test_nan_guard_skips_a_leaf_without_the_batch_axis():
    """The guard reads only leaves whose leading axis is the batch: a shared (4,) leaf next to
    a batch of 5 is neither read per example nor zeroed."""
    deq = jdeq.nnx.DEQ(_SharedShiftCell(nnx.Rngs(0)), solver=jdeq.Anderson(tol=1e-6, maxiter=40))
    a = jax.random.normal(jax.random.key(1), (5, 4))
    shift = jnp.array([0.3, -0.2, 0.1, 0.5])
    z_clean, _ = deq((a, shift))
    z, st = deq((a.at[2, 0].set(jnp.nan), shift))
    flagged = np.arange(5) == 2
    np.testing.assert_array_equal(st.nonfinite, flagged)
    np.testing.assert_allclose(z[~flagged], z_clean[~flagged], rtol=1e-5, atol=1e-6)


class _AnyBatchCell(nnx.Module):
    """``tanh(0.5 W z + U x)``: one example ``(3,) -> (8,)`` or a batch, the same code."""

    def __init__(self, rngs):
        self.w = nnx.Linear(8, 8, rngs=rngs)
        self.u = nnx.Linear(3, 8, rngs=rngs)

    def __call__(self, z, x):
        return jnp.tanh(0.5 * self.w(z) + self.u(x))

    def init_z(self, x):
        return jnp.zeros(x.shape[:-1] + (8,), x.dtype)


def test_nan_guard_of_a_per_example_layer_under_vmap():
    """``DEQ(..., batched=False)`` (one example per call) vmapped over a batch with one NaN
    input: the guard runs per example (a scalar flag), the example is reported as non-finite
    with value z0, the others equal the batched layer's, and the weights' gradient of the other
    examples' loss is finite and equals the batched layer's."""
    cell = _AnyBatchCell(nnx.Rngs(0))
    solver = jdeq.Anderson(tol=1e-6, maxiter=40)
    one = jdeq.nnx.DEQ(cell, solver=solver, batched=False)
    many = jdeq.nnx.DEQ(cell, solver=solver)
    x = jax.random.normal(jax.random.key(1), (4, 3)).at[1, 2].set(jnp.nan)
    keep = jnp.array([1.0, 0.0, 1.0, 1.0])[:, None]

    def per_example(m, x):
        return nnx.vmap(lambda m, xi: m(xi), in_axes=(None, 0))(m, x)

    z, st = per_example(one, x)
    z_ref, st_ref = many(x)
    flagged = np.arange(4) == 1
    np.testing.assert_array_equal(st.nonfinite, flagged)
    np.testing.assert_array_equal(z[1], 0.0)
    np.testing.assert_allclose(z[~flagged], z_ref[~flagged], rtol=1e-5, atol=1e-6)

    def loss(call):
        return lambda m: jnp.sum(jnp.where(keep > 0, call(m, x)[0], 0.0) ** 2)

    g = nnx.grad(loss(per_example))(one)
    g_ref = nnx.grad(loss(lambda m, x: m(x)))(many)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


class _TokenCell(nnx.Module):
    """``tanh(W z + mean(embed(tokens)))``: integer inputs only, one example ``(L,)`` or a batch ``(B, L)``."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 3, rngs=rngs)
        self.w = nnx.Linear(3, 3, rngs=rngs)

    def __call__(self, z, tokens):
        return jnp.tanh(0.5 * self.w(z) + self.embed(tokens).mean(-2))

    def init_z(self, tokens):
        return jnp.zeros(tokens.shape[:-1] + (3,))


def test_nonfinite_guard_of_integer_inputs_only_per_example_and_batched():
    """An input with no floating-point leaf (token ids) has nothing to guard: a per-example layer
    (``batched=False``, called on one example and under vmap) reports a scalar ``nonfinite``
    False and equals the batched layer's rows."""
    cell = _TokenCell(nnx.Rngs(0))
    solver = jdeq.Anderson(tol=1e-6, maxiter=40)
    one = jdeq.nnx.DEQ(cell, solver=solver, batched=False)
    many = jdeq.nnx.DEQ(cell, solver=solver)
    tokens = jnp.asarray(np.arange(20).reshape(4, 5) % 10, jnp.int32)
    z_ref, st_ref = many(tokens)
    assert st_ref.nonfinite.shape == (4,) and not st_ref.nonfinite.any() and st_ref.converged.all()
    z0, st0 = one(tokens[0])
    assert st0.nonfinite.shape == () and not st0.nonfinite
    np.testing.assert_allclose(z0, z_ref[0], rtol=1e-5, atol=1e-6)
    z, st = nnx.vmap(lambda m, t: m(t), in_axes=(None, 0))(one, tokens)
    assert not st.nonfinite.any()
    np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-6)


def test_core_without_guard_still_zeroes_the_flagged_cotangent():
    """What holds in the pure core (documented in jdeq.Implicit): a flagged example's cotangent
    is zero, so gradients with respect to its own inputs are zero and finite; the layers add the
    input guard for shared weights."""
    p = make_params(dtype=jnp.float32)
    x = p["x"].at[1, 0].set(jnp.inf)
    g = jax.grad(lambda x: jnp.sum(jdeq.fixed_point(cell, jnp.zeros((4, 5)), {"W": p["W"], "x": x}).value[0]))(x)
    assert np.isfinite(np.asarray(g[0])).all() and not np.allclose(g[0], 0)


# ----------------------------------------------------------------------------- Jacobian penalty


def test_jacobian_penalty_reaches_nnx_linen_and_mondeq():
    x = jax.random.normal(jax.random.key(0), (4, 3))
    key = jax.random.key(1)
    # nnx: fit-style recording through sow, no monkeypatching
    model = jdeq.nnx.DEQ(jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0)))
    layers = T.jacobian.start_recording(model)
    z, _ = model(x)
    pen = T.jacobian.penalty(T.JacReg(gamma=0.5), layers, key)
    direct = model.jacobian_penalty(x, z, jax.random.fold_in(jax.random.split(key)[1], 0), gamma=0.5)
    np.testing.assert_allclose(pen, direct, rtol=1e-6)
    assert not hasattr(model, "equilibria")  # consumed
    # MonDEQ is found and penalized the same way
    mon = jdeq.models.MonDEQ(jdeq.models.MonotoneDenseCell(3, 8, rngs=nnx.Rngs(0)))
    layers = T.jacobian.start_recording(mon)
    zm, _ = mon(x)
    assert float(T.jacobian.penalty(T.JacReg(gamma=1.0), layers, key)) > 0
    # linen: sown equilibria + the penalty method
    lin = jdeq.linen.DEQ(jdeq.models.linen.MLPCell(features=8))
    v = lin.init(jax.random.key(0), x)
    (zl, _), inter = lin.apply(v, x, mutable=["intermediates"])
    (xs, zs), = inter["intermediates"]["equilibria"]
    np.testing.assert_allclose(zs, zl)
    reg = lin.apply(v, xs, zs, key, gamma=0.5, method=jdeq.linen.DEQ.jacobian_penalty)
    assert float(reg) > 0
    gr = jax.grad(lambda v: lin.apply(v, xs, zs, key, gamma=0.5, method=jdeq.linen.DEQ.jacobian_penalty))(v)
    assert any(float(jnp.abs(a).sum()) > 0 for a in jax.tree.leaves(gr))


def test_fit_with_jac_reg_on_a_mondeq_classifier():
    x = jax.random.normal(jax.random.key(0), (32, 16))
    y = (x[:, 0] > 0).astype(jnp.int32)
    model = jdeq.models.MonDEQClassifier(jdeq.models.MonotoneDenseCell(16, 8, rngs=nnx.Rngs(0)), 2,
                                         input_shape=(16,), rngs=nnx.Rngs(1))
    hist = T.fit(model, optax.adam(1e-2), {"inputs": np.asarray(x), "labels": np.asarray(y)}, steps=3, batch_size=16,
                 jac_reg=T.JacReg(gamma=0.1), progress=False)
    assert all(r["jac_reg"] > 0 for r in hist.train)


def test_solver_solve_unrolled_returns_the_snapshots_and_state_the_loop_returns():
    """``Solver.solve(..., unrolled=True)`` (the differentiable scan) honours ``snapshots`` and
    ``keep_state`` as the while loop does: the same snapshots (per-example best iterate at each
    budget), the same final solver state and the same value, in ``(z, stats, snaps, state)``."""
    a = jnp.asarray(np.linspace(-1.0, 1.0, 6).reshape(2, 3))
    F = lambda z: 0.9 * jnp.tanh(z) + a  # noqa: E731
    solver = jdeq.Anderson(tol=1e-30, maxiter=8, memory=3)
    budgets = jnp.asarray([2, 5, 8], jnp.int32)
    loop = solver.solve(F, jnp.zeros((2, 3)), 8, snapshots=budgets, keep_state=True)
    unrolled = solver.solve(F, jnp.zeros((2, 3)), 8, unrolled=True, snapshots=budgets, keep_state=True)
    assert len(loop) == len(unrolled) == 4
    (z, _, snaps, state), (zu, _, snaps_u, state_u) = loop, unrolled
    assert snaps_u.shape == snaps.shape == (3, 2, 3)
    assert bool(jnp.any(snaps_u[0] != snaps_u[2]))  # three different budgets, three states
    np.testing.assert_allclose(zu, z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(snaps_u, snaps, rtol=1e-5, atol=1e-6)
    for u, v in zip(jax.tree.leaves(state_u), jax.tree.leaves(state)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_a_solver_without_an_inverse_estimate_says_so():
    """The default ``Solver.inverse_estimate`` (SHINE's hook) raises, naming the solver."""
    solver = jdeq.FixedPointIteration()
    assert not solver.has_inverse_estimate
    with pytest.raises(NotImplementedError) as e:
        solver.inverse_estimate(None, jnp.ones((2, 3)), transpose=True)
    assert str(e.value) == "FixedPointIteration keeps no inverse-Jacobian estimate."
