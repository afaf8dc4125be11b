"""Data-parallel DEQs on a Mesh (jdeq.train.sharding, fit(mesh=...)) and the bf16 cell policy.

The multi-device checks need 8 devices, which XLA only gives the CPU backend when
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set before jax is imported, so they
run once, together, in a subprocess (this file run as a script) that reports one result per
check as JSON; each test below asserts its own check.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import traceback

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


def loop_report(hlo: str) -> list[dict]:
    """Per ``while`` of a compiled HLO module: its collectives and host callbacks per iteration
    (body and condition, with everything they call)."""
    comps = _computations(hlo)
    out = []
    for lines in comps.values():
        for line in lines:
            m = re.search(r" while\(.*condition=%([\w.\-]+), body=%([\w.\-]+)", line)
            if not m:
                continue
            body = [ln for c in _reachable(comps, m.groups()) for ln in comps[c]]
            out.append({
                "all_reduce": sum(bool(re.search(r" all-reduce(-start)?\(", ln)) for ln in body),
                "other_collectives": sum(
                    bool(re.search(r" (all-gather|all-to-all|collective-permute|reduce-scatter)(-start)?\(", ln))
                    for ln in body
                ),
                "callbacks": sum("callback" in ln and "custom-call" in ln for ln in body),
            })
    return out


# ----------------------------------------------------------------------------- subprocess checks


def _checks() -> dict[str, str]:  # runs with 8 CPU devices
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

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

    for fn in (sharded_solve_matches_single_device, sharded_fit_matches_single_device,
               train_step_hlo_has_no_callback_in_loops, bad_batch_size_raises):
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


@pytest.fixture(scope="module")
def sharded():
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={NDEV}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("name", [
    "sharded_solve_matches_single_device",
    "sharded_fit_matches_single_device",
    "train_step_hlo_has_no_callback_in_loops",
    "bad_batch_size_raises",
])
def test_on_8_devices(sharded, name):
    assert sharded[name] == "ok", sharded[name]


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
