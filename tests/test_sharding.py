"""DEQs on a Mesh (jdeq.train.sharding): data parallel and model-axis weight sharding in fit,
evaluate and predict, jaxopt's linear backward solvers sharded, per-host data (host_shard), and
the bf16 cell policy.

Collectives per solver iteration counted in the compiled HLO (``pytest -s`` prints them):
data parallel, jdeq's solvers forward and backward: one all-reduce of a ``pred[]`` (the stop
test). Weights split along a model axis (``z @ W`` with ``W`` column-split): forward, one
all-gather of the local state's features + the stop test (+ Anderson: one all-reduce of the
per-example Gram row, ``f32[batch, memory]``); backward, the all-reduce of the row-split
product ``u @ W^T`` (``f32[batch, features]``) + the stop test (+ Anderson's Gram row).
jaxopt's linear solvers on a data mesh solve the whole batch as one system, so their inner
products are global: BiCGSTAB 3 scalar all-reduces per iteration, normal-CG 2, GMRES one
``f32[restart+1]`` (Gram-Schmidt) + one or more scalar norms per Arnoldi step.

The multi-device checks need 8 devices, which XLA only gives the CPU backend when
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set before jax is imported, so they
run once, together, in a subprocess (this file run as a script) that reports one result per
check as JSON; each test below asserts its own check.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import traceback
from _devices import cpu_devices_env

NDEV = 8


# ----------------------------------------------------------------------------- HLO inspection


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if m:
            name = m.group(1)
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps


def _reachable(comps, roots) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for line in comps[c]:
            todo.extend(t for t in re.findall(r"%([\w.\-]+)", line) if t in comps)
    return seen


def _loop_bodies(hlo: str) -> list[list[str]]:
    """Per ``lax.while_loop`` of a compiled HLO module (the solvers' loops): the lines of its body
    and condition, with everything they call (what runs once per iteration). Loops XLA makes
    itself are left out: its CPU emitters may expand an op into a ``while`` (a scatter-add, with
    ``--xla_cpu_use_fusion_emitters=false``), which says nothing about the solver."""
    comps = _computations(hlo)
    out = []
    for lines in comps.values():
        for line in lines:
            m = re.search(r' while\(.*condition=%([\w.\-]+), body=%([\w.\-]+).*op_name="(?:[^"]*/)?while"', line)
            if m:
                out.append([ln for c in _reachable(comps, m.groups()) for ln in comps[c]])
    return out


def loop_report(hlo: str) -> list[dict]:
    """Per ``while`` of a compiled HLO module: its collectives and host callbacks per iteration."""
    return [
        {
            "all_reduce": sum(bool(re.search(r" all-reduce(-start)?\(", ln)) for ln in body),
            "other_collectives": sum(
                bool(re.search(r" (all-gather|all-to-all|collective-permute|reduce-scatter)(-start)?\(", ln))
                for ln in body
            ),
            "callbacks": sum("callback" in ln and "custom-call" in ln for ln in body),
        }
        for body in _loop_bodies(hlo)
    ]


def loop_collectives(hlo: str) -> list[dict[str, list[str]]]:
    """Per ``while`` of a compiled HLO module: ``{collective kind: [operand shapes]}`` per iteration."""
    out = []
    for body in _loop_bodies(hlo):
        kinds: dict[str, list[str]] = {}
        for ln in body:
            mm = re.search(r"= (\S+) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
                           r"(?:-start)?\(", ln)
            if mm:
                kinds.setdefault(mm.group(2), []).append(mm.group(1).split("{")[0])
        out.append({k: sorted(v) for k, v in sorted(kinds.items())})
    return out


def _count(loop: dict) -> dict[str, int]:
    return {k: len(v) for k, v in loop.items()}


# ----------------------------------------------------------------------------- subprocess checks


def _checks() -> dict[str, str]:  # runs with 8 CPU devices
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from jax.sharding import PartitionSpec as P

    import jdeq
    from jdeq import train as T

    assert jax.device_count() == NDEV
    mesh = T.data_mesh()
    rep, dat = T.replicated(mesh), T.batch_sharding(mesh)
    results = {}

    def check(fn):
        try:
            fn()
            results[fn.__name__] = "ok"
        except Exception:
            results[fn.__name__] = traceback.format_exc()

    f = lambda z, p: jnp.tanh(z @ p["W"] + p["x"])  # noqa: E731
    p = {"W": 0.6 * jax.random.normal(jax.random.key(0), (8, 8)) / np.sqrt(8),
         "x": jax.random.normal(jax.random.key(1), (16, 8))}
    z0 = jnp.zeros((16, 8))

    def solve_and_grad(p, z0):
        def loss(p):
            sol = jdeq.fixed_point(f, z0, p, solver=jdeq.Anderson(tol=1e-6, maxiter=40))
            return jnp.sum(sol.value**2), sol
        (_, sol), g = jax.value_and_grad(loss, has_aux=True)(p)
        return sol.value, sol.stats, g

    def sharded_solve_matches_single_device():
        single = jax.jit(solve_and_grad)(p, z0)
        sharded_fn = jax.jit(solve_and_grad, in_shardings=({"W": rep, "x": dat}, dat))
        sharded = sharded_fn(jax.device_put(p, {"W": rep, "x": dat}), jax.device_put(z0, dat))
        for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
        value, stats, g = sharded
        assert value.sharding.is_equivalent_to(dat, 2), value.sharding
        assert stats.nsteps.sharding.is_equivalent_to(dat, 1), stats.nsteps.sharding
        assert g["x"].sharding.is_equivalent_to(dat, 2) and g["W"].sharding.is_fully_replicated
        assert bool(stats.converged.all()) and int(stats.nsteps.max()) > 3
        # one all-reduce per iteration (the global stop test) in the forward and backward loops
        hlo = sharded_fn.lower(p, z0).compile().as_text()
        loops = loop_report(hlo)
        assert len(loops) == 2, loops
        assert all(r == {"all_reduce": 1, "other_collectives": 0, "callbacks": 0} for r in loops), loops
        # a boolean one (jdeq._loop.keep_going's jnp.any: stop_fraction=1), not a count of active rows
        assert loop_collectives(hlo) == [{"all-reduce": ["pred[]"]}] * 2, loop_collectives(hlo)

    class Net(nnx.Module):
        def __init__(self, throw=False):
            rngs = nnx.Rngs(0)
            self.deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(4, 8, w_scale=0.6, rngs=rngs),
                                    solver=jdeq.FixedPointIteration(tol=1e-4, maxiter=30), throw=throw)
            self.head = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            z, stats = self.deq(x)
            return self.head(z), stats

    rng = np.random.default_rng(0)
    data = {"inputs": rng.normal(size=(64, 4)).astype(np.float32), "labels": rng.integers(0, 3, 64)}

    def sharded_fit_matches_single_device():
        runs = []
        for mesh_arg in (None, mesh):
            model = Net()
            hist = T.fit(model, optax.sgd(0.5), data, steps=3, batch_size=16, log_every=1,
                         progress=False, mesh=mesh_arg)
            runs.append((hist, nnx.state(model, nnx.Param)))
        (h1, p1), (h8, p8) = runs
        for r1, r8 in zip(h1.train, h8.train):
            for k in ("loss", "accuracy", "nsteps", "abs_residual", "rel_residual", "converged"):
                np.testing.assert_allclose(r8[k], r1[k], rtol=1e-4, atol=1e-6, err_msg=k)
        for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p8)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
            assert b.sharding.is_fully_replicated and len(b.sharding.device_set) == NDEV
        assert any(not np.allclose(a, b) for a, b in
                   zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(nnx.state(Net(), nnx.Param))))

    def train_step_hlo_has_no_callback_in_loops():
        # throw=True puts a host callback in the step: it must sit after the solve, not in it
        graphdef, params, rest = nnx.split(Net(throw=True), nnx.Param, ...)

        def step(params, batch):
            loss = lambda q: T.classification_loss(nnx.merge(graphdef, q, rest), batch)  # noqa: E731
            return jax.value_and_grad(loss, has_aux=True)(params)

        batch = T.shard_batch({k: v[:16] for k, v in data.items()}, mesh)
        hlo = jax.jit(step, in_shardings=(rep, dat), out_shardings=rep).lower(
            T.replicate(params, mesh), batch).compile().as_text()
        loops = loop_report(hlo)
        assert len(loops) == 2 and all(r["callbacks"] == 0 and r["all_reduce"] == 1 for r in loops), loops
        assert "python_cpu_callback" in hlo  # the throw check exists, outside the loops

    def bad_batch_size_raises():
        try:
            T.fit(Net(), optax.sgd(0.1), data, steps=1, batch_size=12, progress=False, mesh=mesh)
        except ValueError as e:
            assert "multiple of the 8 devices" in str(e), e
        else:
            raise AssertionError("no error for batch_size=12 on 8 devices")

    # ------------------------------------------------------------- model axis (weights split)
    collectives = results.setdefault("collectives", {})
    meshes = {"2x4": T.model_mesh(4), "4x2": T.model_mesh(2)}

    def param_shardings_rule():
        m4 = meshes["2x4"]
        tree = {"big": jnp.zeros((16, 12)), "col": jnp.zeros((8, 16)), "small": jnp.zeros((4, 4)),
                "odd": jnp.zeros((15, 7)), "vec": jnp.zeros(64), "key": jax.random.key(0)}
        specs = {k: s.spec for k, s in T.param_shardings(tree, m4, min_size=64).items()}
        assert specs == {"big": P("model"), "col": P(None, "model"), "small": P(), "odd": P(), "vec": P("model"),
                         "key": P()}, specs
        assert all(s.spec == P() for s in jax.tree.leaves(T.param_shardings(tree, m4, model_axis=None)))
        assert all(s.spec == P() for s in jax.tree.leaves(T.param_shardings(tree, m4, min_size=10**6)))
        # optax moments follow the parameters, the step count is replicated
        opt = optax.adam(1e-3)
        sh = T.param_shardings(tree, m4, min_size=64)
        osh = T.optimizer_shardings(opt, opt.init({k: v for k, v in tree.items() if k != "key"}),
                                    {k: v for k, v in sh.items() if k != "key"}, m4)
        assert osh[0].mu["big"].spec == P("model") and osh[0].nu["col"].spec == P(None, "model")
        assert osh[0].count.spec == P()
        # a weight annotated by its model keeps its annotation (nnx.with_partitioning)
        with jax.set_mesh(m4):
            lin = nnx.Linear(8, 8, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("model", None)),
                             rngs=nnx.Rngs(0))
        assert T.param_shardings(nnx.state(lin), m4, min_size=0)["kernel"].get_value().spec == P("model", None)

    W = 16
    pw = {"W": 0.6 * jax.random.normal(jax.random.key(0), (W, W)) / np.sqrt(W),
          "x": jax.random.normal(jax.random.key(1), (16, W))}
    zw = jnp.zeros((16, W))

    def model_sharded_solve_matches_single_device():
        for name, solver in (("4x2", jdeq.FixedPointIteration(tol=1e-6, maxiter=60)),
                             ("2x4", jdeq.Anderson(tol=1e-6, maxiter=40))):
            def solve_and_grad(p, z0, solver=solver):
                def loss(p):
                    sol = jdeq.fixed_point(f, z0, p, solver=solver)
                    return jnp.sum(sol.value**2), sol
                (_, sol), g = jax.value_and_grad(loss, has_aux=True)(p)
                return sol.value, sol.stats, g

            single = jax.jit(solve_and_grad)(pw, zw)
            for m in (meshes[name],):
                sh = {"W": T.param_shardings(pw["W"], m, min_size=W * W), "x": T.batch_sharding(m)}
                assert sh["W"].spec == P(None, "model")
                fn = jax.jit(solve_and_grad, in_shardings=(sh, T.batch_sharding(m))).lower(pw, zw).compile()
                value, stats, g = fn(jax.device_put(pw, sh), jax.device_put(zw, T.batch_sharding(m)))
                # partial sums over the split feature axis round differently: an example whose
                # residual sits at the tolerance may take one more step
                np.testing.assert_allclose(np.asarray(value), np.asarray(single[0]), rtol=1e-5, atol=1e-5)
                for k in ("W", "x"):
                    np.testing.assert_allclose(np.asarray(g[k]), np.asarray(single[2][k]), rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(np.asarray(stats.abs_residual), np.asarray(single[1].abs_residual), atol=1e-5)
                assert np.abs(np.asarray(stats.nsteps) - np.asarray(single[1].nsteps)).max() <= 1
                assert bool(stats.converged.all()) and int(stats.nsteps.max()) > 3
                assert g["W"].sharding.is_equivalent_to(sh["W"], 2), g["W"].sharding
                assert stats.nsteps.sharding.spec[0] == "data", stats.nsteps.sharding
                hlo = fn.as_text()
                assert all(r["callbacks"] == 0 for r in loop_report(hlo))
                loops = loop_collectives(hlo)
                collectives[f"solve {type(solver).__name__} {name}"] = loops
                assert len(loops) == 2, loops
                fwd, bwd = sorted(loops, key=lambda r: "all-gather" not in r)
                # forward: the stop test, one all-gather of the state's features for z @ W, and
                # (Anderson) one all-reduce of the per-example Gram row; backward: the stop test,
                # the reduction of the row-split product u @ W^T (+ Anderson's Gram row)
                anderson = isinstance(solver, jdeq.Anderson)
                assert _count(fwd) == {"all-gather": 1, "all-reduce": 1 + anderson}, fwd
                assert _count(bwd) == {"all-reduce": 2 + anderson}, bwd

    class WideNet(nnx.Module):
        def __init__(self, solver=None):
            rngs = nnx.Rngs(0)
            self.deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(4, 16, w_scale=0.6, rngs=rngs),
                                    solver=solver or jdeq.FixedPointIteration(tol=1e-4, maxiter=30))
            self.head = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x, maxiter=None):
            z, stats = self.deq(x, maxiter=maxiter)
            return self.head(z), stats

    wide_data = {"inputs": rng.normal(size=(64, 4)).astype(np.float32), "labels": rng.integers(0, 4, 64)}
    eval_set = {"inputs": rng.normal(size=(21, 4)).astype(np.float32), "labels": rng.integers(0, 4, 21)}

    def model_sharded_fit_matches_single_device():
        runs = {}
        for name, mesh_arg in (("single", None), *meshes.items()):
            model = WideNet()
            hist = T.fit(model, optax.adam(1e-2), wide_data, steps=3, batch_size=16, log_every=1, progress=False,
                         mesh=mesh_arg, model_axis=None if mesh_arg is None else "model", min_shard_size=64,
                         eval_data={"test": eval_set} if name != "4x2" else None, eval_batch_size=8)
            runs[name] = (hist, nnx.state(model, nnx.Param))
        h1, p1 = runs.pop("single")
        for name, (h, params) in runs.items():
            ref_rows, rows = h1.train, h.train
            if h.eval:  # the evaluation inside fit ran on the mesh
                ref_rows, rows = ref_rows + [h1.eval[-1]["test"]], rows + [h.eval[-1]["test"]]
            assert len(rows) == len(ref_rows)
            for r1, r in zip(ref_rows, rows):
                for k in ("loss", "accuracy", "nsteps", "abs_residual", "rel_residual", "converged"):
                    np.testing.assert_allclose(r[k], r1[k], rtol=1e-4, atol=1e-5, err_msg=f"{name} {k}")
            for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(params)):
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
            # the parameters keep their layout after the steps: W (16x16), U (4x16) column-split,
            # the head's kernel (16x4) row-split, biases replicated
            spec = lambda v: v.get_value().sharding.spec  # noqa: E731
            cell = params["deq"]["cell"]
            assert spec(cell["w"]["kernel"]) == spec(cell["u"]["kernel"]) == P(None, "model"), name
            assert spec(params["head"]["kernel"]) == P("model"), name
            assert spec(cell["u"]["bias"]) == spec(params["head"]["bias"]) == P(), name
        # so do they after steps of unrolled pre-training (its phase compiles with the same layouts:
        # left to jit's propagation, the cell's bias comes out split along "model")
        model = WideNet()
        T.fit(model, optax.adam(1e-2), wide_data, steps=2, batch_size=16, progress=False, mesh=meshes["2x4"],
              model_axis="model", min_shard_size=64, pretrain=T.Pretrain(steps=2, depth=2))
        params = nnx.state(model, nnx.Param)
        cell = params["deq"]["cell"]
        assert spec(cell["w"]["kernel"]) == spec(cell["u"]["kernel"]) == P(None, "model")
        assert spec(params["head"]["kernel"]) == P("model")
        assert spec(cell["u"]["bias"]) == spec(params["head"]["bias"]) == P(), "pretrain"

    def model_sharded_train_step_collectives():
        model = WideNet()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        opt = optax.adam(1e-3)
        for name, m in meshes.items():
            psh = T.param_shardings(params, m, min_size=64)
            osh = T.optimizer_shardings(opt, opt.init(params), psh, m)

            def step(params, opt_state, batch):
                loss = lambda q: T.classification_loss(nnx.merge(graphdef, q, rest), batch)  # noqa: E731
                (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
                updates, opt_state = opt.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, metrics

            batch = T.shard_batch({k: v[:16] for k, v in wide_data.items()}, m)
            fn = jax.jit(step, in_shardings=(psh, osh, T.batch_sharding(m)),
                         out_shardings=(psh, osh, T.replicated(m)))
            compiled = fn.lower(params, opt.init(params), batch).compile()
            hlo = compiled.as_text()
            assert all(r["callbacks"] == 0 for r in loop_report(hlo))
            loops = loop_collectives(hlo)
            collectives[f"train step FixedPointIteration {name}"] = loops
            assert len(loops) == 2 and all(sum(_count(r).values()) <= 3 for r in loops), loops
            # the compiled step holds the intended layout of its outputs
            out_params = compiled.output_shardings[0]
            assert out_params["deq"]["cell"]["w"]["kernel"].get_value().spec == P(None, "model")

    def evaluate_and_predict_on_mesh():
        model = WideNet()
        seen = []
        original = T.evaluation._apply

        layouts = []  # the parameters' layout the call got: split along "model" as in fit, or replicated

        outs = []  # predict's output layout: replicated, so every process reads it

        def spy(graphdef, state, inputs, kwargs, out_sharding=None):
            seen.append(inputs.sharding)
            outs.append(out_sharding)
            layouts.append({tuple(leaf.sharding.spec) for leaf in jax.tree.leaves(state)})
            return original(graphdef, state, inputs, kwargs, out_sharding)

        evals = []  # evaluate's batches: (rows, their layout, the metrics' layout, the parameters' layouts)
        original_eval = T.evaluation._eval_batch

        def eval_spy(graphdef, loss_fn, state, batch, kwargs, out_sharding=None):
            evals.append((batch["inputs"].shape[0], batch["inputs"].sharding, out_sharding,
                          {tuple(leaf.sharding.spec) for leaf in jax.tree.leaves(state)}))
            return original_eval(graphdef, loss_fn, state, batch, kwargs, out_sharding)

        ref_eval = T.evaluate(model, eval_set, batch_size=8, maxiter=5)
        ref_pred = T.predict(model, eval_set["inputs"], batch_size=8, maxiter=5)
        T.evaluation._apply = spy
        T.evaluation._eval_batch = eval_spy
        try:
            # (a model axis of another name too: the layout follows the argument, not a default)
            tensor = T.model_mesh(4, model_axis="tensor")
            # and Explicit axes: the model axis runs as an Auto axis, as in fit (T.training_mesh;
            # left Explicit, the split matmuls are ambiguous shardings and raise)
            explicit = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
            for mesh_arg, axis in ((mesh, None), (meshes["2x4"], "model"), (tensor, "tensor"), (explicit, "model")):
                seen.clear()
                kw = dict(mesh=mesh_arg, model_axis=axis, min_shard_size=64, maxiter=5)
                evals.clear()
                got = T.evaluate(model, eval_set, batch_size=8, **kw)  # 21 = 8 + 8 + 5: a partial batch
                for k, v in ref_eval.items():
                    np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
                # evaluate's batches: split along the data axis when it divides them (the partial
                # 5 rows run whole on every device, not padded: metrics are batch means), the
                # metrics replicated (every process reads them), the weights laid out as in fit
                on = T.training_mesh(mesh_arg, axis)
                assert [e[0] for e in evals] == [8, 8, 5], evals
                for rows, layout, out, specs in evals:
                    want = P("data") if rows % on.shape["data"] == 0 else P()
                    assert layout.mesh == on and layout.spec == want, (rows, layout)
                    assert out is not None and out.mesh == on and out.spec == P(), out
                    assert any(axis is not None and axis in spec for spec in specs) == (axis is not None), specs
                logits, stats = T.predict(model, eval_set["inputs"], batch_size=8, **kw)
                assert logits.shape == (21, 4) and stats.nsteps.shape == (21,)
                np.testing.assert_allclose(logits, ref_pred[0], rtol=1e-5, atol=1e-5)
                np.testing.assert_array_equal(stats.nsteps, ref_pred[1].nsteps)
                assert int(stats.nsteps.max()) == 5  # the run-time budget reached the solver
                # every batch went in split along the data axis (the last one padded)
                placed = T.training_mesh(mesh_arg, axis)
                assert seen and all(s.spec == P("data") and s.mesh == placed for s in seen), seen
                assert outs and all(o is not None and o.spec == P() and o.mesh == placed for o in outs), outs
                outs.clear()
                split = [any(axis is not None and axis in spec for spec in specs) for specs in layouts]
                assert split and all(split) == (axis is not None) and any(split) == (axis is not None), layouts
                layouts.clear()
            # a data axis of another name: the batches are split along it
            rows = jax.make_mesh((8,), ("rows",))
            seen.clear()
            evals.clear()
            T.predict(model, eval_set["inputs"], batch_size=8, mesh=rows, data_axis="rows", maxiter=5)
            T.evaluate(model, eval_set, batch_size=8, mesh=rows, data_axis="rows", maxiter=5)
            assert seen and all(s.spec == P("rows") for s in seen), seen
            assert [e[1].spec for e in evals] == [P("rows"), P("rows"), P()], evals
            # a batch size that is no multiple of the data axis is rounded up (8 devices: 3 -> 8)
            seen.clear()
            logits, _ = T.predict(model, eval_set["inputs"], batch_size=3, mesh=mesh, maxiter=5)
            np.testing.assert_allclose(logits, ref_pred[0], rtol=1e-5, atol=1e-5)
            assert len(seen) == 3
        finally:
            T.evaluation._apply = original
            T.evaluation._eval_batch = original_eval

    def jaxopt_backward_on_data_mesh():
        for name in ("gmres", "bicgstab", "normal_cg"):
            def grads(p, z0, name=name):
                def loss(p):
                    sol = jdeq.fixed_point(f, z0, p, solver=jdeq.Anderson(tol=1e-6, maxiter=40),
                                           gradient=jdeq.Implicit(solver=name, tol=1e-7, maxiter=60))
                    return jnp.sum(sol.value**2)
                return jax.grad(loss)(p)

            single = jax.jit(grads)(p, z0)
            fn = jax.jit(grads, in_shardings=({"W": rep, "x": dat}, dat)).lower(p, z0).compile()
            g = fn(jax.device_put(p, {"W": rep, "x": dat}), jax.device_put(z0, dat))
            for k in ("W", "x"):
                np.testing.assert_allclose(np.asarray(g[k]), np.asarray(single[k]), rtol=1e-4, atol=1e-5, err_msg=name)
            assert g["x"].sharding.is_equivalent_to(dat, 2)
            hlo = fn.as_text()
            assert all(r["callbacks"] == 0 for r in loop_report(hlo))
            loops = loop_collectives(hlo)
            collectives[f"backward {name} (data mesh 8)"] = loops
            # the forward loop keeps its one stop-test all-reduce; jaxopt's loop treats the whole
            # batch as one linear system: its inner products and norms are global sums
            assert {"all-reduce": ["pred[]"]} in loops, loops
            assert any(len(r.get("all-reduce", [])) >= 2 for r in loops), loops
            assert all(set(r) <= {"all-reduce"} for r in loops), loops

    def checksums_of_arrays_on_two_meshes():
        """Checkpoint checksums (hash32) of arrays split over two meshes of disjoint devices:
        one compiled call per mesh, each value as on one device."""
        from jax.sharding import Mesh, NamedSharding

        from jdeq.train import _checksum

        devs = np.array(jax.devices())
        m1, m2 = Mesh(devs[:4], ("data",)), Mesh(devs[4:], ("data",))
        a = jnp.arange(32, dtype=jnp.float32).reshape(8, 4)
        b = jnp.arange(16, dtype=jnp.int32)
        split = [jax.device_put(a, NamedSharding(m1, P("data"))), jax.device_put(b, NamedSharding(m2, P("data"))),
                 jax.device_put(a + 1, NamedSharding(m1, P(None, "data")))]
        want = [_checksum._device_hashes([x])[0] for x in (a, b, a + 1)]
        assert _checksum._device_hashes(split) == want, (_checksum._device_hashes(split), want)

    for fn in (checksums_of_arrays_on_two_meshes, sharded_solve_matches_single_device, sharded_fit_matches_single_device,
               train_step_hlo_has_no_callback_in_loops, bad_batch_size_raises, param_shardings_rule,
               model_sharded_solve_matches_single_device, model_sharded_fit_matches_single_device,
               model_sharded_train_step_collectives, evaluate_and_predict_on_mesh, jaxopt_backward_on_data_mesh):
        check(fn)
    return results


if __name__ == "__main__":
    print("RESULTS " + json.dumps(_checks()))
    sys.exit(0)


# ----------------------------------------------------------------------------- tests

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import jdeq  # noqa: E402
from jdeq import train as T  # noqa: E402




def _run_8_devices():
    env = cpu_devices_env(NDEV)
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.fixture(scope="session")
def sharded(once):
    """The 8-device subprocess's results, computed once per test run (shared by xdist workers)."""
    return once("sharding_8_devices", _run_8_devices)


@pytest.mark.parametrize("name", [
    "checksums_of_arrays_on_two_meshes",
    "sharded_solve_matches_single_device",
    "sharded_fit_matches_single_device",
    "train_step_hlo_has_no_callback_in_loops",
    "bad_batch_size_raises",
    "param_shardings_rule",
    "model_sharded_solve_matches_single_device",
    "model_sharded_fit_matches_single_device",
    "model_sharded_train_step_collectives",
    "evaluate_and_predict_on_mesh",
    "jaxopt_backward_on_data_mesh",
])
def test_on_8_devices(sharded, name):
    assert sharded[name] == "ok", sharded[name]


def test_collectives_per_solver_iteration(sharded):
    """Prints the collectives counted per loop iteration (pytest -s) for the report."""
    assert sharded["collectives"]
    for name, loops in sharded["collectives"].items():
        print(f"{name}: {loops}")


def test_loop_report_finds_callbacks_and_collectives():
    def body(c):
        jax.debug.callback(lambda k: None, c)
        return c + 1

    hlo = jax.jit(lambda: jax.lax.while_loop(lambda c: c < 3, body, 0)).lower().compile().as_text()
    assert loop_report(hlo) == [{"all_reduce": 0, "other_collectives": 0, "callbacks": 1}]


def test_mesh_argument_errors():
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    data = {"inputs": np.ones((4, 2), np.float32), "labels": np.zeros(4, np.int32)}
    with pytest.raises(TypeError, match="`mesh` must be a jax.sharding.Mesh"):
        T.fit(model, optax.sgd(0.1), data, steps=1, batch_size=2, progress=False, mesh="data")
    with pytest.raises(ValueError, match="`data_axis`='batch' is not an axis"):
        T.fit(model, optax.sgd(0.1), data, steps=1, batch_size=2, progress=False,
              mesh=T.data_mesh(), data_axis="batch")


def test_model_axis_errors():
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    data = {"inputs": np.ones((4, 2), np.float32), "labels": np.zeros(4, np.int32)}
    kw = dict(steps=1, batch_size=2, progress=False, mesh=T.model_mesh(1))
    with pytest.raises(ValueError, match="`model_axis`='tensor' is not an axis"):
        T.fit(model, optax.sgd(0.1), data, model_axis="tensor", **kw)
    with pytest.raises(ValueError, match="`model_axis` must differ from `data_axis`"):
        T.fit(model, optax.sgd(0.1), data, model_axis="data", **kw)
    with pytest.raises(ValueError, match="`model_axis`='tensor' is not an axis"):
        T.predict(model, data["inputs"], mesh=T.model_mesh(1), model_axis="tensor")
    with pytest.raises(ValueError, match="`model` must be an int >= 1 dividing"):
        T.model_mesh(0)
    with pytest.raises(ValueError, match="`min_size` must be an int >= 0"):
        T.param_shardings({"w": jnp.ones(3)}, T.model_mesh(1), min_size=-1)


def test_model_mesh_of_one_device_runs_fit_evaluate_predict():
    # on one device a ("data", "model") mesh of shape (1, 1): the same code path as on a pod
    rng = np.random.default_rng(0)
    data = {"inputs": rng.normal(size=(12, 3)).astype(np.float32), "labels": rng.integers(0, 2, 12)}
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    ref = T.evaluate(model, data, batch_size=5)
    got = T.evaluate(model, data, batch_size=5, mesh=T.model_mesh(1), model_axis="model", min_shard_size=0)
    assert got == pytest.approx(ref, rel=1e-6)
    np.testing.assert_allclose(T.predict(model, data["inputs"], batch_size=5, mesh=T.model_mesh(1))[0],
                               T.predict(model, data["inputs"], batch_size=5)[0], rtol=1e-6)
    T.fit(model, optax.sgd(0.1), data, steps=2, batch_size=4, progress=False, mesh=T.model_mesh(1),
          model_axis="model", min_shard_size=0)
    assert model.kernel.get_value().sharding.mesh.axis_names == ("data", "model")


def test_host_shard_disjoint_blocks(monkeypatch):
    data = {"inputs": np.arange(22).reshape(11, 2), "labels": np.arange(11)}
    blocks = [T.host_shard(data, process_index=i, process_count=3) for i in range(3)]
    assert [len(b["labels"]) for b in blocks] == [3, 4, 4]
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in blocks]), data["labels"])
    for b in blocks:  # rows stay aligned across the arrays
        np.testing.assert_array_equal(b["inputs"][:, 0], 2 * b["labels"])
    # by default: this process's block, from jax.process_index() / jax.process_count()
    monkeypatch.setattr(jax, "process_index", lambda: 2)
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    np.testing.assert_array_equal(T.host_shard(data)["labels"], blocks[2]["labels"])
    np.testing.assert_array_equal(T.host_shard(np.arange(11)), [7, 8, 9, 10])
    # fit's global batch must split over the processes too
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        T.fit(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), optax.sgd(0.1), data, steps=1, batch_size=4,
              progress=False, mesh=T.data_mesh())


def test_host_shard_edges():
    """One process gets every row; as many rows as processes gives one each; the errors in full."""
    np.testing.assert_array_equal(T.host_shard(np.arange(5), process_index=0, process_count=1), np.arange(5))
    assert [T.host_shard(np.arange(3), process_index=i, process_count=3).tolist() for i in range(3)] == [[0], [1], [2]]
    for index, count in ((0, 0), (0, 2.0), (1.0, 2), (-1, 2), (2, 2), (True, 2)):
        with pytest.raises(ValueError) as e:
            T.host_shard(np.arange(4), process_index=index, process_count=count)
        assert str(e.value) == f"`process_index`={index!r} must be in [0, `process_count`={count!r}).", (index, count)
    for data, message in (({}, "`data` holds no arrays."),
                          ({"a": np.arange(4), "b": np.arange(5)}, "`data`'s arrays must share their leading (row) axis."),
                          (np.arange(2), "`data` has 2 rows, fewer than the 3 processes.")):
        with pytest.raises(ValueError) as e:
            T.host_shard(data, process_index=0, process_count=3)
        assert str(e.value) == message


def test_host_shard_errors():
    with pytest.raises(ValueError, match="`process_index`=3 must be in"):
        T.host_shard(np.arange(8), process_index=3, process_count=3)
    with pytest.raises(ValueError, match="fewer than the 4 processes"):
        T.host_shard(np.arange(3), process_index=0, process_count=4)
    with pytest.raises(ValueError, match="share their leading"):
        T.host_shard({"a": np.arange(4), "b": np.arange(5)}, process_index=0, process_count=2)


# ----------------------------------------------------------------------------- the rules, in process
# The 8-device run above checks the layouts on real meshes; these check the same rules in the
# test process (abstract meshes, or one device standing for several), where mutation testing
# sees them.


def _abstract(model=4, names=("data", "model")):
    from jax.sharding import AbstractMesh

    return AbstractMesh((2, model), names)


def _specs(tree, mesh, **kw):
    return {k: s.spec for k, s in T.param_shardings(tree, mesh, **kw).items()}


def test_param_shardings_rule_in_process():
    from jax.sharding import PartitionSpec as P

    m4 = _abstract()
    z = np.zeros
    tree = {"tall": z((16, 8)), "wide": z((8, 16)), "tie": z((8, 8)), "one_divisible": z((6, 8)),
            "indivisible": z((6, 7)), "at_axis_size": z((4, 3)), "vec": z(12), "scalar": z(()),
            "empty": z((0, 3)), "key": jax.random.key(0)}
    # the largest dimension divisible by the axis size (ties: the last), of at least its size
    assert _specs(tree, m4, min_size=0) == {
        "tall": P("model"), "wide": P(None, "model"), "tie": P(None, "model"), "one_divisible": P(None, "model"),
        "indivisible": P(), "at_axis_size": P("model"), "vec": P("model"), "scalar": P(), "empty": P(),
        "key": P()}
    # min_size: an array of exactly min_size elements splits, one element fewer does not
    assert _specs({"tie": z((8, 8))}, m4, min_size=64) == {"tie": P(None, "model")}
    assert _specs({"tie": z((8, 8))}, m4, min_size=65) == {"tie": P()}
    assert _specs({"w": z((256, 256)), "v": z((256, 255))}, m4) == {"w": P(None, "model"), "v": P()}
    assert T.MIN_SHARD_SIZE == 256 * 256
    # nothing to split along: no model axis, one absent from the mesh, or one of size 1
    for mesh, kw in [(m4, {"model_axis": None}), (m4, {"model_axis": "tensor"}), (_abstract(model=1), {})]:
        assert set(_specs(tree, mesh, min_size=0, **kw).values()) == {P()}, kw
    # a model axis of size 2 splits too (only size 1 has nothing to split)
    assert _specs({"w": z((6, 3)), "v": z((3, 3))}, _abstract(model=2), min_size=0) == {"w": P("model"), "v": P()}
    # another name for the model axis
    assert _specs({"w": z((8, 16))}, _abstract(names=("batch", "tensor")), model_axis="tensor", min_size=0) == {
        "w": P(None, "tensor")}
    assert all(s.mesh is m4 for s in jax.tree.leaves(T.param_shardings(tree, m4, min_size=0)))


def test_param_shardings_keep_the_models_annotations():
    """A weight annotated with nnx.with_partitioning keeps its names (flax stores them as
    out_sharding, or as sharding_names up to 0.12.3: the floors job runs this test there)."""
    from jax.sharding import PartitionSpec as P

    init = nnx.initializers.lecun_normal()

    class Net(nnx.Module):
        def __init__(self):
            part = lambda names: nnx.with_partitioning(init, names, eager_sharding=False)  # noqa: E731
            self.rows = nnx.Linear(8, 16, kernel_init=part(("model", None)), rngs=nnx.Rngs(0))
            self.foreign = nnx.Linear(8, 16, kernel_init=part(("tensor", "model")), rngs=nnx.Rngs(0))
            self.plain = nnx.Linear(8, 16, rngs=nnx.Rngs(0))
            self.stat = nnx.BatchStat(jnp.zeros(3))

    m4 = _abstract()
    state = nnx.state(Net())
    out = T.param_shardings(state, m4, min_size=0)
    assert type(out["rows"]["kernel"]) is nnx.Param and type(out["stat"]) is nnx.BatchStat  # Variables kept
    got = {k: out[k]["kernel"].get_value().spec for k in ("rows", "foreign", "plain")}
    # an annotation wins over the size rule (which splits the 16 columns); names the mesh lacks are dropped
    assert got == {"rows": P("model", None), "foreign": P(None, "model"), "plain": P(None, "model")}
    assert out["stat"].get_value().spec == P() and out["rows"]["bias"].get_value().spec == P("model")
    # also when the size rule would replicate the array, or with no model axis at all
    for kw in ({"min_size": 10**6}, {"model_axis": None}):
        out = T.param_shardings(state, m4, **kw)
        assert out["rows"]["kernel"].get_value().spec == P("model", None), kw
        assert out["plain"]["kernel"].get_value().spec == P() and out["rows"]["bias"].get_value().spec == P(), kw


def test_optimizer_shardings_follow_the_parameters_in_process():
    from jax.sharding import PartitionSpec as P

    m4 = _abstract()
    params = {"w": jnp.zeros((8, 16)), "b": jnp.zeros(3)}
    sh = T.param_shardings(params, m4, min_size=8)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    osh = T.optimizer_shardings(opt, opt.init(params), sh, m4)
    adam = osh[1][0]
    assert adam.mu["w"].spec == adam.nu["w"].spec == P(None, "model")
    assert adam.mu["b"].spec == P() and adam.count.spec == P()
    assert jax.tree.structure(osh) == jax.tree.structure(opt.init(params))
    assert all(s.mesh is m4 for s in jax.tree.leaves(osh))


def test_training_mesh_turns_only_the_model_axis_auto():
    from jax.sharding import AxisType

    E, A = AxisType.Explicit, AxisType.Auto
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(E, E))
    on = T.training_mesh(mesh, "model")
    assert on.axis_types == (E, A) and on.axis_names == mesh.axis_names and (on.devices == mesh.devices).all()
    assert T.training_mesh(mesh, "data").axis_types == (A, E)
    for axis in (None, "tensor"):  # no model axis, or one the mesh lacks: the mesh as it is
        assert T.training_mesh(mesh, axis) is mesh
    auto = jax.make_mesh((1, 1), ("data", "model"), axis_types=(E, A))
    assert T.training_mesh(auto, "model") is auto  # already Auto


def test_meshes_and_layouts_in_process():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    d = jax.devices()[0]
    rows = T.data_mesh([d], axis="rows")
    assert rows.axis_names == ("rows",) and rows.devices.tolist() == [d]
    assert T.data_mesh([d, d]).devices.shape == (2,)  # the devices given, not jax.devices()
    assert T.data_mesh().axis_names == ("data",) and T.data_mesh().devices.tolist() == jax.devices()
    # one device standing for four: the shapes, names and divisibility checks of model_mesh
    mm = T.model_mesh(2, [d] * 4, data_axis="batch", model_axis="tensor")
    assert dict(mm.shape) == {"batch": 2, "tensor": 2}
    assert dict(T.model_mesh(4, [d] * 4).shape) == {"data": 1, "model": 4}
    assert T.model_mesh(1).axis_names == ("data", "model")
    for bad in (3, 0, -2, 2.0, True):
        with pytest.raises(ValueError, match=re.escape(f"`model` must be an int >= 1 dividing the 4 devices, got {bad!r}.")):
            T.model_mesh(bad, [d] * 4)
    # check_mesh: the batch must split over the data axis
    two = Mesh(np.array([d, d]), ("data",))
    from jdeq.train.sharding import check_mesh

    check_mesh(two, "data", 4)
    with pytest.raises(ValueError, match=re.escape("`batch_size`=3 must be a multiple of the 2 devices of mesh axis 'data'.")):
        check_mesh(two, "data", 3)
    check_mesh(two, "data")  # no batch size: nothing to divide
    assert T.batch_sharding(rows, "rows").spec == P("rows") and T.batch_sharding(T.data_mesh()).spec == P("data")
    assert T.replicated(rows) == NamedSharding(rows, P())
    placed = T.replicate({"a": jnp.ones(2), "b": [jnp.zeros(3)]}, rows)
    assert jax.tree.structure(placed) == jax.tree.structure({"a": 0, "b": [0]})
    assert all(x.sharding == NamedSharding(rows, P()) for x in jax.tree.leaves(placed))
    # global_array and shard_batch (one process: the whole batch)
    value = np.arange(6.0).reshape(3, 2)
    g = T.global_array(value, NamedSharding(rows, P("rows")))
    assert g.sharding == NamedSharding(rows, P("rows")) and g.shape == (3, 2)
    np.testing.assert_array_equal(np.asarray(g), value)
    batch = T.shard_batch({"x": value, "y": np.arange(3)}, rows, "rows")
    assert set(batch) == {"x", "y"} and all(v.sharding.spec == P("rows") for v in batch.values())
    np.testing.assert_array_equal(np.asarray(batch["x"]), value)
    np.testing.assert_array_equal(np.asarray(batch["y"]), np.arange(3))
    assert T.shard_batch({"x": value}, T.data_mesh())["x"].sharding.spec == P("data")
    # host_value: a numpy copy of anything this process can read
    for x in (jnp.arange(3), [0, 1, 2], np.arange(3)):
        out = T.host_value(x)
        assert isinstance(out, np.ndarray)
        np.testing.assert_array_equal(out, [0, 1, 2])


# ----------------------------------------------------------------------------- bf16 policy


def _deq_pair(tol):
    cell = jdeq.models.MLPCell(8, 32, w_scale=0.7, rngs=nnx.Rngs(0))
    solver = jdeq.FixedPointIteration(tol=tol, maxiter=60)
    return jdeq.nnx.DEQ(cell, solver=solver), jdeq.nnx.DEQ(jdeq.models.MixedPrecision(cell), solver=solver)


def test_bf16_cell_close_to_float32_and_converges():
    x = jax.random.normal(jax.random.key(0), (16, 8))
    f32, bf16 = _deq_pair(tol=1e-2)  # bf16's relative residual floor is ~1e-3

    def loss(deq, x):
        z, stats = deq(x)
        return jnp.sum(z**2), (z, stats)

    grad = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    (_, (z32, s32)), g32 = grad(f32, x)
    (_, (z16, s16)), g16 = grad(bf16, x)
    assert z16.dtype == jnp.float32 and s16.rel_residual.dtype == jnp.float32
    assert bool(s16.converged.all())
    assert float(jnp.linalg.norm(z16 - z32) / jnp.linalg.norm(z32)) < 2e-2
    assert not np.array_equal(np.asarray(z16), np.asarray(z32))  # the cell did compute in bf16
    for a, b in zip(jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(g16)):
        assert b.dtype == jnp.float32
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 5e-2
    # the wrapped cell is untouched: it still computes in float32
    assert bf16.cell.cell.w.dtype == jnp.float32 and bf16.cell.cell.w.kernel[...].dtype == jnp.float32


def test_bf16_residual_floor_is_above_float32():
    x = jax.random.normal(jax.random.key(1), (16, 8))
    f32, bf16 = _deq_pair(tol=1e-9)
    call = nnx.jit(lambda deq, x: deq(x)[1])
    s32, s16 = call(f32, x), call(bf16, x)
    assert float(jnp.median(s32.rel_residual)) < 1e-5
    assert 1e-6 < float(jnp.median(s16.rel_residual)) < 1e-2


def test_mixed_precision_errors():
    with pytest.raises(TypeError, match="`cell` must be an nnx.Module"):
        jdeq.models.MixedPrecision(lambda z, x: z)
    with pytest.raises(ValueError, match="`compute_dtype` must be a floating dtype"):
        jdeq.models.MixedPrecision(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), compute_dtype=jnp.int32)
