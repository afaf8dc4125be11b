"""Run as a script with 8 CPU devices (see tests/test_explicit_sharding.py): solves and
gradients under ``jax.set_mesh`` with Explicit and Auto axes, compared with one device.
Prints one JSON line per check: {"name", "ok", "detail"}."""

from __future__ import annotations

import json
import sys
import traceback

# The 8 devices come from XLA_FLAGS=--xla_force_host_platform_device_count=8, set by the caller
# (tests/test_explicit_sharding.py) in this process's environment: setting it here at import
# would leak into any process that imports this module (pytest --doctest-modules does).

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import jdeq  # noqa: E402

N, D = 16, 6


def cell(z, p):
    return jnp.tanh(z @ p["W"] + p["x"])


def params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"W": jax.random.normal(k1, (D, D)) * 0.7 / np.sqrt(D), "x": jax.random.normal(k2, (N, D))}


# (built on demand: test_explicit_sharding imports this module, and a test module must not start
# JAX at import: tests/conftest.py)
SOLVERS = {
    "fpi": lambda: jdeq.FixedPointIteration(tol=1e-5, maxiter=60),
    "anderson": lambda: jdeq.Anderson(tol=1e-5, maxiter=40),
    "broyden": lambda: jdeq.Broyden(tol=1e-5, maxiter=40),
    "hyper": lambda: jdeq.HyperAnderson(params=jdeq.init_mixer(jax.random.key(1)), tol=1e-5, maxiter=40),
}
GRADIENTS = {
    "implicit": jdeq.Implicit(),
    "implicit_gmres": jdeq.Implicit(solver="gmres", tol=1e-6),
    # truncated: the backward's budget reaches jaxopt's solve under Explicit axes too (its
    # gradient is 0.5 away from the converged one here)
    "implicit_bicgstab": jdeq.Implicit(solver="bicgstab", tol=1e-6, maxiter=2),
    "phantom": jdeq.Phantom(steps=3),
    "jfb": jdeq.JacobianFree(),
    "unrolled": jdeq.Unrolled(),
}


# Every solver and every gradient mode under each axis type, without the full product (each pair
# compiles twice, and CI's time is budgeted): Explicit axes run Anderson with every gradient and
# every other solver with the default and the unrolled backward; Auto axes run each solver once.
PAIRS = {
    "explicit": [("anderson", g) for g in GRADIENTS]
    + [(s, g) for s in ("fpi", "broyden", "hyper") for g in ("implicit", "unrolled")],
    "auto": [("fpi", "implicit"), ("anderson", "implicit_gmres"), ("broyden", "unrolled"), ("hyper", "implicit")],
}


def loss_and_sol(p, solver, gradient):
    sol = jdeq.fixed_point(cell, jnp.zeros_like(p["x"]), p, solver=solver, gradient=gradient)
    return jnp.sum(jnp.sin(sol.value)), sol


def report(name, fn):
    try:
        fn()
        print(json.dumps({"name": name, "ok": True, "detail": ""}), flush=True)
    except Exception:  # noqa: BLE001 - reported to the test
        print(json.dumps({"name": name, "ok": False, "detail": traceback.format_exc()[-3000:]}), flush=True)


def close(a, b, tol=1e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


def main(kind: str):
    axis_type = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[kind]
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    p = params()
    step = jax.jit(jax.value_and_grad(loss_and_sol, has_aux=True), static_argnums=(1, 2))
    refs = {}

    def ref(s, g):  # one device, computed only for the checks this kind runs
        if (s, g) not in refs:
            refs[(s, g)] = step(p, SOLVERS[s](), GRADIENTS[g])
        return refs[(s, g)]

    for s, g in PAIRS[kind]:
        if True:
            def check(s=s, g=g):
                (rloss, rsol), rgrads = ref(s, g)  # before entering the mesh
                with jax.set_mesh(mesh):
                    ps = {"W": p["W"], "x": jax.device_put(p["x"], NamedSharding(mesh, P("data")))}
                    (loss, sol), grads = step(ps, SOLVERS[s](), GRADIENTS[g])
                    close(sol.value, rsol.value)
                    np.testing.assert_array_equal(sol.stats.nsteps, rsol.stats.nsteps)
                    # float32 gradients summed in another order over 8 shards; the unrolled
                    # backward of HyperAnderson differs by 2.6e-5 in one entry of 36 (XLA:CPU's
                    # legacy emitters); a missing or wrong collective is off by O(1)
                    close(grads, rgrads, 1e-4)
                    spec = sol.value.sharding.spec
                    assert spec[0] == "data", f"value not sharded on data: {sol.value.sharding}"
                    assert sol.stats.nsteps.sharding.spec[0] == "data", sol.stats.nsteps.sharding

            report(f"{kind}/{s}/{g}", check)

    # per-example code under vmap, sharded batch
    def vmapped():
        expected = ref("anderson", "implicit")[0][1].value
        with jax.set_mesh(mesh):
            xs = jax.device_put(p["x"], NamedSharding(mesh, P("data")))
            f = jax.jit(jax.vmap(lambda x: jdeq.fixed_point(cell, jnp.zeros(D), {"W": p["W"], "x": x},
                                                            solver=SOLVERS["anderson"](), batched=False).value))
            out = f(xs)
            close(out, expected)
            assert out.sharding.spec[0] == "data", out.sharding

    report(f"{kind}/vmap_per_example", vmapped)

    # a state split along its features too, on Explicit (data, model) axes (a user's cell with
    # weights split along "model", outside fit): the solvers' per-row contractions over the split
    # feature axis say where their result lies (ambiguous otherwise: a sharding type error)
    def feature_split_state():
        fmesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)

        def split_cell(z, q):
            sh = jax.typeof(z).sharding
            return jnp.tanh(jnp.matmul(z, q["W"], out_sharding=None if sh.mesh.empty else sh) + q["x"])

        def loss(q, solver, gradient):
            sol = jdeq.fixed_point(split_cell, jnp.zeros_like(q["x"]), q, solver=solver, gradient=gradient)
            return jnp.sum(jnp.sin(sol.value)), sol

        fstep = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2))
        # the default backward, and SHINE's, whose inverse estimate contracts the solver's history
        # over the split feature axis too ("refine": the estimate then refined to the backward's
        # tol, so the tolerance below holds; "direct" alone moves by 2e-3 in float32 when W
        # moves by one rounding, on one device as well)
        shine = jdeq.Implicit(shine="refine")
        for s, g in [("anderson", jdeq.Implicit()), ("broyden", jdeq.Implicit()), ("anderson", shine), ("broyden", shine)]:
            (_, rsol), rgrads = fstep(p, SOLVERS[s](), g)
            with jax.set_mesh(fmesh):
                feat = NamedSharding(fmesh, P("data", "model"))
                (_, sol), grads = fstep({"W": p["W"], "x": jax.device_put(p["x"], feat)}, SOLVERS[s](), g)
                close(sol.value, rsol.value)
                close(grads, rgrads, 2e-5)
                assert sol.value.sharding.spec == P("data", "model"), (s, sol.value.sharding)

    if kind == "explicit":
        report(f"{kind}/feature_split_state", feature_split_state)

    # the Flax layers
    def flax_layers():
        cell_nnx = jdeq.models.MLPCell(D, 8, rngs=nnx.Rngs(0))
        deq = jdeq.nnx.DEQ(cell_nnx, solver=jdeq.Anderson(tol=1e-5))
        ref = nnx.jit(lambda m, x: m(x)[0])(deq, p["x"])
        grad_ref = nnx.grad(lambda m, x: jnp.sum(m(x)[0] ** 2))(deq, p["x"])
        lin = jdeq.linen.DEQ(jdeq.models.linen.MLPCell(features=8), solver=jdeq.Anderson(tol=1e-5))
        variables = lin.init(jax.random.key(0), p["x"])
        lref = jax.jit(lambda v, x: lin.apply(v, x)[0])(variables, p["x"])
        lgrad_ref = jax.grad(lambda v, x: jnp.sum(lin.apply(v, x)[0] ** 2))(variables, p["x"])
        with jax.set_mesh(mesh):
            xs = jax.device_put(p["x"], NamedSharding(mesh, P("data")))
            out = nnx.jit(lambda m, x: m(x)[0])(deq, xs)
            close(out, ref)
            assert out.sharding.spec[0] == "data"
            close(nnx.grad(lambda m, x: jnp.sum(m(x)[0] ** 2))(deq, xs), grad_ref, 2e-5)
            lout = jax.jit(lambda v, x: lin.apply(v, x)[0])(variables, xs)
            close(lout, lref)
            assert lout.sharding.spec[0] == "data"
            close(jax.grad(lambda v, x: jnp.sum(lin.apply(v, x)[0] ** 2))(variables, xs), lgrad_ref, 2e-5)

    report(f"{kind}/flax_layers", flax_layers)

    # fit / evaluate / predict on a mesh of this axis type, data and model axes
    def training():
        import optax
        import jdeq.train as T

        model = _classifier

        x = np.asarray(jax.random.normal(jax.random.key(3), (32, D)), np.float32)
        y = (x[:, 0] > 0).astype(np.int32)
        data = {"inputs": x, "labels": y}
        ref_model = model()
        ref = T.fit(ref_model, optax.sgd(0.1), data, steps=3, batch_size=32, progress=False, log_every=1)
        layouts = [((8,), ("data",), None), ((4, 2), ("data", "model"), "model")]
        for shape, names, model_axis in layouts:
            m = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))
            net = model()
            hist = T.fit(net, optax.sgd(0.1), data, steps=3, batch_size=32, progress=False, mesh=m,
                         model_axis=model_axis, min_shard_size=1, log_every=1)
            np.testing.assert_allclose([r["loss"] for r in hist.train], [r["loss"] for r in ref.train], rtol=2e-5)
            close(nnx.state(net, nnx.Param), nnx.state(ref_model, nnx.Param), 2e-5)
            if model_axis is not None:  # the weights really were split along the model axis
                specs = [v.sharding.spec for v in jax.tree.leaves(nnx.state(net, nnx.Param))]
                assert any(model_axis in tuple(s) for s in specs), specs
            ev = T.evaluate(net, data, batch_size=16, mesh=m, model_axis=model_axis, min_shard_size=1)
            ev_ref = T.evaluate(ref_model, data, batch_size=16)
            np.testing.assert_allclose(ev["loss"], ev_ref["loss"], rtol=2e-5)
            close(T.predict(net, x, batch_size=16, mesh=m, model_axis=model_axis, min_shard_size=1),
                  T.predict(ref_model, x, batch_size=16), 2e-5)

    report(f"{kind}/fit_evaluate_predict", training)


def _classifier():
    class Net(nnx.Module):
        def __init__(self):
            self.deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(D, 8, rngs=nnx.Rngs(0)),
                                    solver=jdeq.Anderson(tol=1e-5, maxiter=30))
            self.head = nnx.Linear(8, 2, rngs=nnx.Rngs(1))

        def __call__(self, x):
            z, stats = self.deq(x)
            return self.head(z), stats

    return Net()


if __name__ == "__main__":
    for kind in sys.argv[1:] or ["explicit", "auto"]:
        main(kind)
