"""Per-example code under ``jax.vmap`` gives per-example results (DESIGN.md, v0.2).

``jax.vmap`` of a function that solves one example (``batched=False``) must give, per example,
what the batched solve gives: values, every stat and gradients, for every solver and gradient
mode, in float64 to rounding. The batched solve is the reference. Also: the ambiguous 1-D
``z0`` is an error, ``nnx.vmap``/``nnx.scan`` over the Flax layer, and vmap of batched code.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdeq
from _jaxpr import eqns

N, D = 5, 6


def cell(z, p):
    return jnp.tanh(z @ p["W"] + p["x"])


def make_params(dtype=jnp.float64):
    k1, k2 = jax.random.split(jax.random.key(3))
    W = jax.random.normal(k1, (D, D), dtype) * 0.8 / np.sqrt(D)
    # examples of different difficulty, so that they stop at different iterations
    x = jax.random.normal(k2, (N, D), dtype) * jnp.linspace(0.2, 2.0, N, dtype=dtype)[:, None]
    return {"W": W, "x": x}


SOLVERS = {
    "fpi": lambda: jdeq.FixedPointIteration(tol=1e-9, maxiter=60),
    "anderson": lambda: jdeq.Anderson(tol=1e-9, maxiter=40, memory=3),
    "broyden": lambda: jdeq.Broyden(tol=1e-9, maxiter=40, memory=6),
    "hyper": lambda: jdeq.HyperAnderson(
        params=jax.tree.map(lambda a: a + 0.05, jdeq.init_mixer(jax.random.key(1), memory=3, dtype=jnp.float64)),
        tol=1e-9, maxiter=40, memory=3,
    ),
}
GRADIENTS = {
    "implicit": lambda: jdeq.Implicit(),
    "phantom": lambda: jdeq.Phantom(steps=4, damping=0.8),
    "jfb": lambda: jdeq.JacobianFree(),
    "unrolled": lambda: jdeq.Unrolled(),
}


def _loss_weights():
    return jnp.cos(jnp.arange(N * D, dtype=jnp.float64).reshape(N, D))


@pytest.mark.parametrize("gname", sorted(GRADIENTS))
@pytest.mark.parametrize("sname", sorted(SOLVERS))
def test_vmap_of_per_example_code_equals_the_batched_solve(x64, sname, gname):
    solver, gradient = SOLVERS[sname](), GRADIENTS[gname]()
    p = make_params()
    c = _loss_weights()

    def batched(p):
        sol = jdeq.fixed_point(cell, jnp.zeros((N, D)), p, solver=solver, gradient=gradient)
        return jnp.sum(c * sol.value), sol

    def per_example(p):
        def one(x):
            return jdeq.fixed_point(cell, jnp.zeros(D), {"W": p["W"], "x": x}, solver=solver,
                                    gradient=gradient, batched=False)

        sol = jax.vmap(one)(p["x"])
        return jnp.sum(c * sol.value), sol

    (lb, sb), gb = jax.value_and_grad(batched, has_aux=True)(p)
    (lv, sv), gv = jax.jit(jax.value_and_grad(per_example, has_aux=True))(p)
    np.testing.assert_allclose(sv.value, sb.value, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(sv.stats.nsteps, sb.stats.nsteps)
    np.testing.assert_array_equal(sv.stats.converged, sb.stats.converged)
    np.testing.assert_array_equal(sv.stats.nonfinite, sb.stats.nonfinite)
    np.testing.assert_allclose(sv.stats.abs_residual, sb.stats.abs_residual, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(sv.stats.rel_residual, sb.stats.rel_residual, rtol=1e-9, atol=1e-15)
    assert sv.stats.nsteps.shape == (N,)  # one count per example, not (N, D)
    assert len(set(np.asarray(sb.stats.nsteps).tolist())) > 1  # examples did stop apart
    for a, b in zip(jax.tree.leaves(gv), jax.tree.leaves(gb)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_the_reported_bug_vmap_of_1d_state_was_d_scalar_problems():
    """Observation 1 of the v0.2 issue: a 1-D ``z0`` under vmap used to be read as a batch of
    ``d`` scalar problems (values off by 0.1-0.29, nsteps of shape (batch, d)). Now it is an
    error, and ``batched=False`` gives the batched solve's answer."""
    p = make_params(jnp.float32)
    with pytest.raises(ValueError, match=r"`z0`.*batched=False"):
        jax.vmap(lambda x: jdeq.fixed_point(cell, jnp.zeros(D), {"W": p["W"], "x": x}).value)(p["x"])
    ref = jdeq.fixed_point(cell, jnp.zeros((N, D)), p)
    got = jax.vmap(lambda x: jdeq.fixed_point(cell, jnp.zeros(D), {"W": p["W"], "x": x}, batched=False))(p["x"])
    np.testing.assert_allclose(got.value, ref.value, atol=1e-6)
    assert got.stats.nsteps.shape == (N,)


def test_unbatched_single_example_without_vmap_and_scalar_state(x64):
    p = make_params()
    ref = jdeq.fixed_point(cell, jnp.zeros((N, D)), p, solver=jdeq.Anderson(tol=1e-10))
    one = jdeq.fixed_point(cell, jnp.zeros(D), {"W": p["W"], "x": p["x"][2]}, batched=False,
                           solver=jdeq.Anderson(tol=1e-10))
    np.testing.assert_allclose(one.value, ref.value[2], rtol=1e-12)
    assert one.stats.nsteps.shape == () and int(one.stats.nsteps) == int(ref.stats.nsteps[2])
    # a scalar state is one problem: z = cos(z)
    s = jdeq.fixed_point(lambda z, _: jnp.cos(z), jnp.asarray(0.0), batched=False,
                         solver=jdeq.Anderson(tol=1e-12, maxiter=100))
    np.testing.assert_allclose(s.value, 0.7390851332151607, rtol=1e-10)
    # one example given as a tree of a NumPy array and a Python float
    t = jdeq.fixed_point(lambda z, _: {"v": jnp.cos(z["v"]), "s": jnp.cos(z["s"])},
                         {"v": np.zeros(2), "s": 0.0}, batched=False, solver=jdeq.Anderson(tol=1e-12))
    assert t.value["v"].shape == (2,) and t.value["s"].shape == ()
    np.testing.assert_allclose([*t.value["v"], t.value["s"]], 0.7390851332151607, rtol=1e-10)


def test_vmap_of_batched_code_and_nested_vmap(x64):
    """vmap over an extra leading axis of batched code, and vmap of vmap of per-example code."""
    p = make_params()
    W2 = jnp.stack([p["W"], 0.5 * p["W"]])
    solver = jdeq.Anderson(tol=1e-10, maxiter=60)
    loop = [jdeq.fixed_point(cell, jnp.zeros((N, D)), {"W": w, "x": p["x"]}, solver=solver) for w in W2]
    batched = jax.vmap(lambda w: jdeq.fixed_point(cell, jnp.zeros((N, D)), {"W": w, "x": p["x"]}, solver=solver))(W2)
    nested = jax.vmap(lambda w: jax.vmap(
        lambda x: jdeq.fixed_point(cell, jnp.zeros(D), {"W": w, "x": x}, solver=solver, batched=False))(p["x"]))(W2)
    for i in range(2):
        for got in (batched, nested):
            np.testing.assert_allclose(got.value[i], loop[i].value, rtol=1e-12, atol=1e-14)
            np.testing.assert_array_equal(got.stats.nsteps[i], loop[i].stats.nsteps)


def test_vmap_with_a_batched_budget_falls_back_correctly(x64):
    """A per-example budget under vmap (not mergeable into one loop) still gives each example
    what its own solve gives."""
    p = make_params()
    budgets = jnp.arange(2, 2 + N)
    solver = jdeq.FixedPointIteration(tol=1e-30)
    got = jax.vmap(lambda x, m: jdeq.fixed_point(cell, jnp.zeros(D), {"W": p["W"], "x": x}, solver=solver,
                                                 maxiter=m, batched=False))(p["x"], budgets)
    for i in range(N):
        ref = jdeq.fixed_point(cell, jnp.zeros((1, D)), {"W": p["W"], "x": p["x"][i:i + 1]}, solver=solver,
                               maxiter=int(budgets[i]))
        np.testing.assert_allclose(got.value[i], ref.value[0], rtol=1e-13)
        assert int(got.stats.nsteps[i]) == int(budgets[i])


def test_vmap_with_integer_inputs_closed_over_per_example(x64):
    """Integer per-example arrays (token ids) closed over by the cell: still one merged loop."""
    p = make_params()
    emb = jax.random.normal(jax.random.key(0), (10, D), jnp.float64)
    ids = jnp.array([1, 4, 7, 2, 9])

    def one(i):
        f = lambda z, W: jnp.tanh(z @ W + emb[i])  # noqa: E731  closes over a batched int
        return jdeq.fixed_point(f, jnp.zeros(D), p["W"], batched=False, solver=jdeq.Anderson(tol=1e-10)).value

    ref = jdeq.fixed_point(cell, jnp.zeros((N, D)), {"W": p["W"], "x": emb[ids]}, solver=jdeq.Anderson(tol=1e-10))
    np.testing.assert_allclose(jax.vmap(one)(ids), ref.value, rtol=1e-12)


def test_vmap_with_a_shared_start_keeps_its_dtype_whatever_the_mapped_inputs(x64):
    """A shared (unmapped) float32 start with float64 per-example inputs that the cell casts to
    float32: the merged loop runs in float32, as each example alone does."""
    p = make_params()
    W32 = p["W"].astype(jnp.float32)

    def one(x):  # x: float64, this example's input
        f = lambda z, W: jnp.tanh(z @ W + x).astype(jnp.float32)  # noqa: E731
        return jdeq.fixed_point(f, jnp.zeros(D, jnp.float32), W32, batched=False, solver=jdeq.Anderson(tol=1e-5))

    got = jax.vmap(one)(p["x"])
    assert got.value.dtype == jnp.float32
    # the merged loop itself carries float32 (a float64 loop cast back at the end would pass
    # the checks below: its values differ from float32's by rounding only)
    jaxpr = jax.make_jaxpr(jax.vmap(one))(p["x"]).jaxpr
    loops = [e for e in eqns(jaxpr) if e.primitive.name == "while"]
    assert loops and all(v.aval.dtype != jnp.float64 for e in loops for v in e.outvars
                         if hasattr(v.aval, "dtype")), [[v.aval for v in e.outvars] for e in loops]
    for i in range(N):
        alone = one(p["x"][i])
        # float32, two different programs: equal up to rounding
        np.testing.assert_allclose(got.value[i], alone.value, rtol=1e-5, atol=1e-6)
        assert int(got.stats.nsteps[i]) == int(alone.stats.nsteps)


def test_vmap_with_only_prng_keys_mapped():
    """Per-example PRNG keys are the only mapped input (noise drawn inside the cell)."""
    W = 0.5 * jnp.eye(D)
    keys = jax.random.split(jax.random.key(0), N)

    def one(key):  # the cell closes over the key itself and draws inside
        f = lambda z, W: jnp.tanh(z @ W + jax.random.normal(key, (D,)))  # noqa: E731
        return jdeq.fixed_point(f, jnp.zeros(D), W, batched=False, solver=jdeq.Anderson(tol=1e-6)).value

    got = jax.vmap(one)(keys)
    np.testing.assert_allclose(got, jnp.stack([one(k) for k in keys]), rtol=1e-5)


def test_vmap_merges_into_one_loop():
    """The batching rule maps vmap onto one batch-wide loop: the compiled per-example solve has
    no select over the solver's history (JAX's generic while-loop rule selects the whole carry)."""
    p = make_params(jnp.float32)
    solver = jdeq.Anderson(memory=4)

    def per_example(x):
        return jdeq.fixed_point(cell, jnp.zeros(D), {"W": p["W"], "x": x}, solver=solver, batched=False).value

    jaxpr = str(jax.make_jaxpr(jax.vmap(per_example))(p["x"]))
    assert jaxpr.count("while[") == 1
    # the merged loop's history is (N * 1, memory, D): one batch axis, not a vmapped (N, 1, ...)
    assert f"f32[{N},4,{D}]" in jaxpr and f"f32[{N},1,4,{D}]" not in jaxpr


# ----------------------------------------------------------------------------- Flax layers


def test_nnx_vmap_over_the_deq_layer_equals_the_batched_layer():
    cell = jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (N, 3))
    batched = jdeq.nnx.DEQ(cell, solver=jdeq.Anderson(tol=1e-6))
    single = jdeq.nnx.DEQ(cell, solver=jdeq.Anderson(tol=1e-6), batched=False)
    z_ref, st_ref = batched(x)

    @nnx.vmap(in_axes=(None, 0))
    def run(model, xi):
        return model(xi[None])[0][0]  # MLPCell wants a batch axis: one example as a batch of 1

    np.testing.assert_allclose(run(batched, x), z_ref, atol=1e-6)

    # truly per-example: the layer with batched=False on an unbatched cell call
    def per_example_cell(z, xi, cell=cell):
        return cell(z[None], xi[None])[0]

    class One(nnx.Module):
        def __init__(self, cell):
            self.cell = cell

        def __call__(self, z, xi):
            return per_example_cell(z, xi, self.cell)

        def init_z(self, xi):
            return jnp.zeros((8,), xi.dtype)

    single = jdeq.nnx.DEQ(One(cell), solver=jdeq.Anderson(tol=1e-6), batched=False)
    z_v, st_v = nnx.vmap(lambda m, xi: m(xi), in_axes=(None, 0))(single, x)
    np.testing.assert_allclose(z_v, z_ref, atol=1e-6)
    np.testing.assert_array_equal(st_v.nsteps, st_ref.nsteps)


def test_nnx_scan_over_deq_layers():
    """``nnx.scan`` over a stack of DEQ layers (per-layer weights) equals a Python loop."""
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return jdeq.nnx.DEQ(jdeq.models.MLPCell(4, 4, rngs=nnx.Rngs(key)), solver=jdeq.Anderson(tol=1e-6))

    stack = make(jax.random.split(jax.random.key(0), 3))
    x = jax.random.normal(jax.random.key(1), (N, 4))

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
    def run(layer, h):
        z, stats = layer(h)
        return z, stats.nsteps

    h, nsteps = run(stack, x)
    ref = x
    for i in range(3):
        layer = nnx.merge(*nnx.split(stack))  # a copy, then take layer i
        graphdef, state = nnx.split(layer)
        one = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
        ref, st = one(ref)
        np.testing.assert_array_equal(nsteps[i], st.nsteps)
    np.testing.assert_allclose(h, ref, atol=1e-6)
