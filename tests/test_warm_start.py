"""Amortized warm starts (jdeq.nnx.FixedPointCache, Huang, Bai & Kolter 2021): the cache's
gather/scatter, what a warm start changes (the start only: same z* up to tol, same implicit
gradient, fewer iterations), the training step returning the cache (also on a skipped step),
fit's checkpoint/resume with the cache (bitwise equal to an uninterrupted run), data meshes
(Auto and Explicit axes, in a subprocess with 4 CPU devices), and the errors on bad input.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdeq
from jdeq import train as T
from _devices import cpu_devices_env

N, D, H = 64, 4, 12


class _CachedDEQ(nnx.Module):
    """MLP-cell DEQ with a warm-start cache over N examples + a linear head."""

    def __init__(self, seed=0, cache=True, solver=None, num_examples=N, dtype=jnp.float32, gradient=None):
        rngs = nnx.Rngs(seed)
        cell = jdeq.models.MLPCell(D, H, dtype=dtype, rngs=rngs)
        self.deq = jdeq.nnx.DEQ(cell, solver=solver or jdeq.Anderson(tol=1e-6, maxiter=60),
                                gradient=gradient or jdeq.Implicit(),
                                cache=jdeq.nnx.FixedPointCache(num_examples, (H,), dtype=dtype) if cache else None)
        self.head = nnx.Linear(H, 3, param_dtype=dtype, rngs=rngs)

    def __call__(self, x, index=None):
        z, stats = self.deq(x, index=index)
        return self.head(z), stats


def _loss(model, batch):
    return T.classification_loss(model, batch, index=batch["index"])


@pytest.fixture
def data():
    x = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
    return {"inputs": x, "labels": (np.abs(x[:, 0]) * 2).astype(np.int32) % 3, "index": np.arange(N)}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


# ----------------------------------------------------------------------------- the cache itself


def test_lookup_and_update_by_index():
    cache = jdeq.nnx.FixedPointCache(5, (2,))
    default = jnp.full((2, 2), -1.0)
    np.testing.assert_array_equal(cache.lookup(jnp.array([3, 1]), default), default)  # empty: the default
    with warnings.catch_warnings():  # writes through the installed flax's own API (no deprecated path)
        warnings.simplefilter("error", DeprecationWarning)
        cache.update(jnp.array([3, 1]), jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([True, False]))
    got = cache.lookup(jnp.array([1, 3, 0]), jnp.zeros((3, 2)))
    np.testing.assert_array_equal(got, [[0, 0], [1, 2], [0, 0]])  # 1 was not ok: not stored
    assert float(cache.fraction_filled()) == pytest.approx(0.2)


def test_pytree_state():
    like = {"a": jax.ShapeDtypeStruct((2,), jnp.float32), "b": jax.ShapeDtypeStruct((1, 3), jnp.float32)}
    cache = jdeq.nnx.FixedPointCache(4, like)
    z = {"a": jnp.ones((2, 2)), "b": jnp.full((2, 1, 3), 2.0)}
    cache.update(jnp.array([0, 2]), z)
    got = cache.lookup(jnp.array([2, 1]), jax.tree.map(jnp.zeros_like, z))
    np.testing.assert_array_equal(got["b"][:, 0, 0], [2.0, 0.0])


def test_a_tuple_shape_is_stored_in_float32_by_default_even_under_x64():
    """``dtype``: "default float32" for a tuple ``shape``, whatever JAX's default float is."""
    with jax.enable_x64(True):
        assert jdeq.nnx.FixedPointCache(4, (2,)).values[0].dtype == jnp.float32
        assert jdeq.nnx.FixedPointCache(4, (2,), dtype=jnp.float64).values[0].dtype == jnp.float64


def test_cache_in_another_dtype_than_the_state():
    # a bfloat16 cache (half the memory) of a float32 DEQ: it stores the states rounded, without
    # jax's warning for an unsafe cast (a future error), and hands back states of the solve's dtype
    cache = jdeq.nnx.FixedPointCache(4, (2,), dtype=jnp.bfloat16)
    z = jnp.array([[1.001, 2.0], [3.0, 4.0]], jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.update(jnp.array([0, 2]), z)
        got = cache.lookup(jnp.array([2, 0, 1]), jnp.full((3, 2), -1.0, jnp.float32))
    assert cache.values[0].dtype == jnp.bfloat16 and got.dtype == jnp.float32
    np.testing.assert_array_equal(got, [[3.0, 4.0], [1.0, 2.0], [-1.0, -1.0]])  # 1.001 rounds to 1 in bf16
    # and the other way round: a float32 cache of a bfloat16 solve
    wide = jdeq.nnx.FixedPointCache(4, (2,))
    wide.update(jnp.array([1, 3]), z.astype(jnp.bfloat16))
    assert wide.lookup(jnp.array([3, 0]), jnp.zeros((2, 2), jnp.bfloat16)).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- what a warm start changes


def test_warm_start_same_fixed_point_fewer_steps():
    model = _CachedDEQ(solver=jdeq.Anderson(tol=1e-6, maxiter=100))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, D)))
    idx = jnp.arange(8) * 3
    z_cold, s_cold = model.deq(x, index=idx)
    # the weights move a little, as between two training steps
    model.deq.cell.w.kernel[...] = model.deq.cell.w.kernel[...] * 1.01
    z_ref, s_ref = model.deq(x)  # cold start at the new weights (no index: cache unused)
    z_warm, s_warm = model.deq(x, index=idx)
    np.testing.assert_allclose(z_warm, z_ref, atol=1e-5)
    assert bool(s_warm.converged.all()) and bool(s_ref.converged.all())
    assert int(s_warm.nsteps.sum()) < int(s_ref.nsteps.sum())
    assert int(s_cold.nsteps.sum()) >= int(s_ref.nsteps.sum()) - 8


@pytest.mark.parametrize("gradient", [jdeq.Implicit(), jdeq.Phantom(steps=3, damping=0.8)])
def test_gradient_unchanged_by_warm_start(x64, gradient):
    model = _CachedDEQ(dtype=jnp.float64, solver=jdeq.Anderson(tol=1e-11, maxiter=100), gradient=gradient)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(6, D)))
    idx = jnp.arange(6)
    # a cache holding z* at other weights (a genuinely different start)
    other = nnx.clone(model)
    other.deq.cell.w.kernel[...] = other.deq.cell.w.kernel[...] * 0.9
    other.deq(x, index=idx)
    model.deq.cache = other.deq.cache

    def loss(m, use_index):
        logits, _ = m(x, index=idx if use_index else None)
        return jnp.sum(jnp.sin(logits))

    g_cold = nnx.grad(lambda m: loss(m, False))(nnx.clone(model))
    g_warm = nnx.grad(lambda m: loss(m, True))(nnx.clone(model))
    for a, b in zip(_leaves(g_cold), _leaves(g_warm)):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)
    # and the implicit gradient matches finite differences along one direction
    if isinstance(gradient, jdeq.Implicit):
        w = model.deq.cell.w.kernel[...]
        v = jnp.asarray(np.random.default_rng(3).normal(size=w.shape))
        eps = 1e-6

        def at(scale):
            m = nnx.clone(model)
            m.deq.cell.w.kernel[...] = w + scale * eps * v
            return float(loss(m, True))

        fd = (at(1) - at(-1)) / (2 * eps)
        np.testing.assert_allclose(float(jnp.vdot(g_warm["deq"]["cell"]["w"]["kernel"][...], v)), fd, rtol=1e-5)


class _VecCell(nnx.Module):
    """``tanh(z W + x U)`` on one example or a batch (for per-example code under vmap)."""

    def __init__(self, rngs):
        self.w = nnx.Param(0.3 * jax.random.normal(rngs.params(), (H, H)) / np.sqrt(H))
        self.u = nnx.Param(jax.random.normal(rngs.params(), (D, H)) / 2)

    def __call__(self, z, x):
        return jnp.tanh(z @ self.w[...] + x @ self.u[...])


def test_per_example_code_under_vmap_with_lookup_outside():
    # the documented pattern for batched=False: gather the starts outside the vmap, store after it
    cell, cache = _VecCell(nnx.Rngs(0)), jdeq.nnx.FixedPointCache(16, (H,))
    solver = jdeq.Anderson(tol=1e-6)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, D)), jnp.float32)
    idx = jnp.arange(8) * 2
    z_batched, s_batched = jdeq.nnx.DEQ(cell, solver=solver)(x, jnp.zeros((8, H)))
    cache.update(idx, z_batched)
    per_example = nnx.vmap(lambda m, xi, zi: m(xi, zi), in_axes=(None, 0, 0))
    z, stats = per_example(jdeq.nnx.DEQ(cell, solver=solver, batched=False), x, cache.lookup(idx, jnp.zeros((8, H))))
    np.testing.assert_allclose(z, z_batched, atol=1e-5)
    assert int(stats.nsteps.max()) < int(s_batched.nsteps.min())  # started at z*: converged at once
    cache.update(idx, z)


# ----------------------------------------------------------------------------- training step, fit, resume


@pytest.mark.parametrize("jac_reg", [None, T.JacReg(gamma=0.5)], ids=["plain", "jac_reg"])
def test_train_step_returns_cache_and_skip_keeps_it(data, jac_reg):
    model = _CachedDEQ()
    opt = optax.adam(1e-2)
    state = T.TrainState.create(model, opt)
    step = jax.jit(T.make_train_step(_loss, opt, jac_reg=jac_reg))
    batch = {k: jnp.asarray(v[:16]) for k, v in data.items()}
    state, m1 = step(state, batch)
    filled = np.asarray(state.cache()["deq"]["cache"]["filled"][...])
    assert filled[:16].all() and not filled[16:].any()
    state, m2 = step(state, batch)
    assert float(m2["nsteps"]) < float(m1["nsteps"])  # warm: fewer forward evaluations
    before = _leaves(state.cache())
    bad = {**batch, "inputs": batch["inputs"].at[0, 0].set(jnp.nan)}
    bad_step = jax.jit(T.make_train_step(lambda mdl, b: (jnp.sum(mdl(b["inputs"], index=b["index"])[0]) * jnp.nan,
                                                         {}), opt))
    state2, m3 = bad_step(state, bad)
    assert float(m3["skipped"]) == 1.0
    for a, b in zip(before, _leaves(state2.cache())):
        np.testing.assert_array_equal(a, b)


def test_fit_fills_cache_and_lowers_nfe(data):
    kw = dict(steps=16, batch_size=16, log_every=4, progress=False)
    warm, cold = _CachedDEQ(), _CachedDEQ()
    h_warm = T.fit(warm, optax.adam(1e-2), data, loss_fn=_loss, **kw)
    h_cold = T.fit(cold, optax.adam(1e-2), data, loss_fn=T.classification_loss, **kw)
    assert float(warm.deq.cache.fraction_filled()) == 1.0  # fit wrote the cache back into the model
    assert float(cold.deq.cache.fraction_filled()) == 0.0
    late_warm = np.mean([r["nsteps"] for r in h_warm.train[1:]])
    late_cold = np.mean([r["nsteps"] for r in h_cold.train[1:]])
    assert late_warm < late_cold


class _Stop(Exception):
    pass


def test_resume_equals_uninterrupted_with_cache(tmp_path, data):
    kw = dict(steps=10, batch_size=16, seed=3, log_every=1, progress=False, loss_fn=_loss)
    full = _CachedDEQ()
    T.fit(full, optax.adam(1e-2), data, **kw)

    def stop_at_6(step, metrics):
        if step == 6:
            raise _Stop()

    first = _CachedDEQ()
    with pytest.raises(_Stop):
        T.fit(first, optax.adam(1e-2), data, checkpoint_dir=tmp_path, checkpoint_every=3, callback=stop_at_6, **kw)
    second = _CachedDEQ()  # fresh parameters, empty cache: both come from the checkpoint
    hist = T.fit(second, optax.adam(1e-2), data, checkpoint_dir=tmp_path, **kw)
    assert hist.resumed_from == 6
    assert float(second.deq.cache.fraction_filled()) == 1.0
    for a, b in zip(_leaves(nnx.state(full)), _leaves(nnx.state(second))):
        np.testing.assert_array_equal(a, b)  # bitwise, parameters and cache
    # the same run resumed without the cache in the checkpoint would differ (the test can fail)
    third = _CachedDEQ()
    ckpt = T.restore_checkpoint(tmp_path, T.fit.__globals__["_saved"](T.TrainState.create(third, optax.adam(1e-2))),
                                step=6)
    assert ckpt is not None and len(ckpt.tree) == 3


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument(data):
    model = _CachedDEQ()
    x = jnp.ones((4, D))
    with pytest.raises(ValueError) as e:
        jdeq.nnx.DEQ(jdeq.models.MLPCell(D, 8, rngs=nnx.Rngs(0)), cache=jdeq.nnx.FixedPointCache(N, (H,)))(
            x, index=jnp.arange(4))
    assert str(e.value) == (  # one state array: its shapes shown as shapes, not lists of one
        f"`cache` stores states of shape ({H},) per example, but the solve's state has (8,) per example: "
        "build the FixedPointCache with the shape of one example's z (without the batch axis).")
    for index in (jnp.arange(5), jnp.arange(4)[:, None]):
        with pytest.raises(ValueError) as e:
            model.deq(x, index=index)
        assert str(e.value) == ("`index` must have shape (4,) (one example index per row of the batch), "
                                f"got {index.shape}.")
    with pytest.raises(TypeError) as e:
        model.deq(x, index=jnp.arange(4.0))
    assert str(e.value) == "`index` must be an integer array of example indices, got dtype float32."
    for index, lo, hi in (([0, 1, 2, 64], 0, 64), ([-1, 0, 1, 2], -1, 2)):  # one past the end; negative
        with pytest.raises(ValueError) as e:
            model.deq(x, index=jnp.array(index))
        assert str(e.value) == (f"`index` holds indices in [{lo}, {hi}], outside [0, 64) (the warm-start cache "
                                "holds 64 examples: build it with the size of the training set).")
    with pytest.raises(ValueError) as e:
        _CachedDEQ(cache=False).deq(x, index=jnp.arange(4))
    assert str(e.value) == ("`index` warm-starts from a cache: build the DEQ with "
                            "`cache=jdeq.nnx.FixedPointCache(num_examples, shape)`.")
    with pytest.raises(TypeError, match="`cache` must be None or a jdeq.nnx.FixedPointCache"):
        jdeq.nnx.DEQ(jdeq.models.MLPCell(D, H, rngs=nnx.Rngs(0)), cache=jnp.zeros((N, H)))
    with pytest.raises(ValueError, match="`num_examples`"):
        jdeq.nnx.FixedPointCache(0, (H,))
    with pytest.raises(TypeError) as e:
        jdeq.nnx.FixedPointCache(4, "16")
    assert str(e.value) == ("`shape` must be a tuple of ints or an array/jax.ShapeDtypeStruct (or a pytree of them) "
                            "giving one example's state, got '16'.")
    with pytest.raises(TypeError, match="`shape` must be a tuple of ints or an array"):
        jdeq.nnx.FixedPointCache(4, (True, 2))  # a bool is not a size
    with pytest.raises(ValueError) as e:
        jdeq.nnx.FixedPointCache(4, (3, -1))
    assert str(e.value) == "`shape` must be a tuple of ints >= 0, got (3, -1)."
    assert jdeq.nnx.FixedPointCache(4, (0, 2)).values[0].shape == (4, 0, 2)  # a size 0 is allowed
    for dtype_not_shape in (jnp.float32, np.dtype("float32")):  # a dtype given in shape's place
        with pytest.raises(TypeError, match="`shape` must be a tuple of ints or an array"):
            jdeq.nnx.FixedPointCache(4, dtype_not_shape)
    # a pytree state: the shapes of every leaf, in the message
    tree = jdeq.nnx.FixedPointCache(4, {"a": jax.ShapeDtypeStruct((3,), jnp.float32),
                                        "b": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(ValueError) as e:
        tree.check({"a": jnp.zeros((2, 3)), "b": jnp.zeros((2, 5))}, jnp.arange(2))
    assert str(e.value) == (
        "`cache` stores states of shape [(3,), (2,)] per example, but the solve's state has [(3,), (5,)] per "
        "example: build the FixedPointCache with the shape of one example's z (without the batch axis).")
    with pytest.raises(ValueError) as e:
        model.deq(x[0], index=jnp.arange(1), batched=False)
    assert str(e.value) == ("`index` needs `batched=True` (a batch of examples per call): under vmap of "
                            "per-example code, call `cache.lookup`/`cache.update` outside the vmap.")
    small = _CachedDEQ(num_examples=N // 2)  # a cache of the wrong size for the data
    with pytest.raises(ValueError, match="`data\\['index'\\]` runs over \\[0, 63\\].*holds 32 examples"):
        T.fit(small, optax.adam(1e-2), data, steps=1, batch_size=8, loss_fn=_loss, progress=False)
    past = {**data, "index": np.arange(1, N + 1)}  # one past the cache's last slot
    with pytest.raises(ValueError) as e:
        T.fit(_CachedDEQ(), optax.adam(1e-2), past, steps=1, batch_size=8, loss_fn=_loss, progress=False)
    assert str(e.value) == (f"`data['index']` runs over [1, {N}] but the model's FixedPointCache holds {N} "
                            f"examples: build it with num_examples > {N}.")
    twice = {**data, "index": np.concatenate([np.arange(N - 1), [0]])}  # example 0's slot used twice
    with pytest.raises(ValueError) as e:
        T.fit(_CachedDEQ(), optax.adam(1e-2), twice, steps=1, batch_size=8, loss_fn=_loss, progress=False)
    assert str(e.value) == "`data['index']` must hold distinct example indices (one per example)."
    with pytest.raises(TypeError) as e:
        T.fit(_CachedDEQ(), optax.adam(1e-2), {**data, "index": data["index"] * 1.0}, steps=1, batch_size=8,
              loss_fn=_loss, progress=False)
    assert str(e.value) == "`data['index']` must be a 1-D integer array of example indices, got float64 of shape (64,)."


# ----------------------------------------------------------------------------- data meshes (subprocess)

NDEV = 4


def _mesh_worker() -> dict:
    """Runs in a subprocess with NDEV CPU devices: fit with the cache on a data mesh (Auto and
    Explicit axes) against one device; returns {check: error or None}."""
    from jax.sharding import AxisType

    x = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
    d = {"inputs": x, "labels": (np.abs(x[:, 0]) * 2).astype(np.int32) % 3, "index": np.arange(N)}
    kw = dict(steps=8, batch_size=16, log_every=1, progress=False, loss_fn=_loss)
    ref = _CachedDEQ()
    h_ref = T.fit(ref, optax.adam(1e-2), d, **kw)
    out = {}
    for kind, axis_type in (("auto", AxisType.Auto), ("explicit", AxisType.Explicit)):
        try:
            mesh = jax.make_mesh((NDEV,), ("data",), axis_types=(axis_type,))
            model = _CachedDEQ()
            hist = T.fit(model, optax.adam(1e-2), d, mesh=mesh, **kw)
            for a, b in zip(_leaves(nnx.state(ref)), _leaves(nnx.state(model))):
                np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
            np.testing.assert_array_equal(np.asarray(model.deq.cache.filled[...]), np.ones(N, bool))
            assert [r["nsteps"] for r in hist.train] == pytest.approx([r["nsteps"] for r in h_ref.train], abs=0.2)
            out[kind] = None
        except Exception as e:  # noqa: BLE001 - reported to the parent test
            out[kind] = f"{type(e).__name__}: {e}"[:2000]
    return out


@pytest.fixture(scope="module")
def mesh_results():
    env = cpu_devices_env(NDEV)
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_data_mesh_equals_one_device(mesh_results, kind):
    assert mesh_results[kind] is None, mesh_results[kind]


if __name__ == "__main__":
    print(json.dumps(_mesh_worker()))
