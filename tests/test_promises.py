"""Promises that docstrings make, each held by a test that fails when the option or promise is
ignored (issue [6]: mutation testing found options that were accepted, validated and then
unchecked). Each test names the docstring it holds to."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jdeq


def _linear(a):
    """``f(z, c) = a z + c`` per example: fixed point ``c / (1 - a)``."""
    return lambda z, c: a * z + c


# ---- FixedPointIteration(damping=b): "z <- (1 - b) z + b f(z)" -------------------------------


@pytest.mark.parametrize("damping", [1.0, 0.5, 0.25])
def test_fpi_damping_is_the_documented_step(damping):
    f = _linear(-0.9)
    c = jnp.array([[1.0, -2.0, 0.5]])
    solver = jdeq.FixedPointIteration(damping=damping)
    z = jnp.array([[0.3, 0.1, -0.4]])
    state = solver.init(z)
    for k in range(1, 4):  # k: evaluations of f so far (the loop's first update has k=1)
        fz = f(z, c)
        new, state = solver.update(state, k, z, fz)
        np.testing.assert_allclose(new, (1 - damping) * z + damping * fz, rtol=1e-6)
        z = new


def test_fpi_damping_changes_the_iteration_count():
    """On ``a = -0.9`` plain iteration contracts by 0.9 per step, damping 0.5 by 0.05: the
    damped solve must take far fewer steps (and both reach the same fixed point)."""
    f = _linear(-0.9)
    c = jnp.ones((2, 4))
    plain = jdeq.fixed_point(f, jnp.zeros((2, 4)), c, solver=jdeq.FixedPointIteration(tol=1e-5, maxiter=400))
    damped = jdeq.fixed_point(f, jnp.zeros((2, 4)), c,
                              solver=jdeq.FixedPointIteration(tol=1e-5, maxiter=400, damping=0.5))
    assert bool(jnp.all(plain.stats.converged)) and bool(jnp.all(damped.stats.converged))
    assert int(jnp.max(damped.stats.nsteps)) * 5 < int(jnp.min(plain.stats.nsteps))
    np.testing.assert_allclose(damped.value, plain.value, rtol=1e-4)
    np.testing.assert_allclose(damped.value, c / 1.9, rtol=1e-4)


def test_anderson_first_step_is_damped():
    """Anderson: "Mixing starts at the second iteration", so the first step is the damped
    fixed-point step; with a history of one it stays ``z + b g``."""
    f = _linear(0.5)
    c = jnp.array([[1.0, 2.0]])
    z = jnp.array([[0.3, -0.2]])
    for damping in (1.0, 0.4):
        solver = jdeq.Anderson(damping=damping, memory=3)
        state = solver.init(z)
        new, _ = solver.update(state, 1, z, f(z, c))
        np.testing.assert_allclose(new, z + damping * (f(z, c) - z), rtol=1e-6)


# ---- a run-time maxiter reaches the backward pass (Implicit's docstring: "the effective one,
# including a run-time override") ------------------------------------------------------------


def test_runtime_maxiter_override_reaches_the_implicit_backward():
    seen = []
    grad_mode = jdeq.Implicit(callback=lambda stats: seen.append(int(np.max(stats.nsteps))))
    W = jnp.eye(4) * 0.95  # slow: the backward needs many iterations to converge
    x = jnp.ones((2, 4))

    def loss(x, maxiter):
        sol = jdeq.fixed_point(lambda z, x: z @ W + 0.05 * jnp.tanh(x), jnp.zeros_like(x), x,
                               solver=jdeq.FixedPointIteration(tol=1e-7, maxiter=200),
                               gradient=grad_mode, maxiter=maxiter)
        return jnp.sum(sol.value)

    jax.grad(loss)(x, None)
    jax.block_until_ready(jax.grad(loss)(x, 3))
    jax.effects_barrier()
    assert len(seen) == 2, seen
    assert seen[0] > 3 and seen[1] <= 3, seen


def test_runtime_maxiter_override_of_the_nnx_layer_reaches_the_backward():
    seen = []
    cell = jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0))
    deq = jdeq.nnx.DEQ(cell, solver=jdeq.FixedPointIteration(tol=1e-9, maxiter=60),
                       gradient=jdeq.Implicit(callback=lambda s: seen.append(int(np.max(s.nsteps)))))
    x = jnp.ones((2, 3))
    nnx.grad(lambda m: jnp.sum(m(x, maxiter=2)[0]))(deq)
    jax.effects_barrier()
    assert seen and seen[-1] <= 2, seen


# ---- throw=True raises through every layer --------------------------------------------------


def _slow_nnx_cell():
    return jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0))


def test_throw_raises_through_the_nnx_layer_and_its_override():
    x = jnp.ones((2, 3))
    solver = jdeq.FixedPointIteration(tol=1e-12, maxiter=2)  # cannot converge in 2 steps
    strict = jdeq.nnx.DEQ(_slow_nnx_cell(), solver=solver, throw=True)
    with pytest.raises(RuntimeError, match="throw=True"):
        strict(x)
    with pytest.raises(RuntimeError, match="throw=True"):
        nnx.jit(lambda m, x: m(x)[0])(strict, x)
    strict(x, throw=False)  # the per-call override wins
    lenient = jdeq.nnx.DEQ(_slow_nnx_cell(), solver=solver)
    lenient(x)
    with pytest.raises(RuntimeError, match="throw=True"):
        lenient(x, throw=True)


def test_throw_raises_through_the_linen_layer_and_its_override():
    x = jnp.ones((2, 3))
    solver = jdeq.FixedPointIteration(tol=1e-12, maxiter=2)
    layer = jdeq.linen.DEQ(jdeq.models.linen.MLPCell(features=8), solver=solver, throw=True)
    variables = layer.init(jax.random.key(0), x, throw=False)
    with pytest.raises(RuntimeError, match="throw=True"):
        layer.apply(variables, x)
    with pytest.raises(RuntimeError, match="throw=True"):
        jax.jit(lambda v, x: layer.apply(v, x)[0])(variables, x)
    layer.apply(variables, x, throw=False)
    lenient = jdeq.linen.DEQ(jdeq.models.linen.MLPCell(features=8), solver=solver)
    lenient.apply(variables, x)
    with pytest.raises(RuntimeError, match="throw=True"):
        lenient.apply(variables, x, throw=True)


# ---- remat: "recompute each layer in the backward pass instead of storing its activations" ---


def _grad_temp_bytes(fn, *args) -> int:
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


@pytest.mark.parametrize("flavour", ["nnx", "linen"])
def test_remat_lowers_the_compiled_memory_of_the_unrolled_baseline(flavour):
    depth, width, batch = 24, 64, 32
    x = jnp.ones((batch, width))
    if flavour == "nnx":
        net = jdeq.nnx.Unrolled(jdeq.models.MLPCell(width, width, rngs=nnx.Rngs(0)), depth=depth)
        graphdef, state = nnx.split(net)

        def loss(state, x, remat):
            return jnp.sum(nnx.merge(graphdef, state)(x, remat=remat)[0] ** 2)
    else:
        net = jdeq.linen.Unrolled(cell=jdeq.models.linen.MLPCell(features=width), depth=depth)
        state = net.init(jax.random.key(0), x)

        def loss(state, x, remat):
            return jnp.sum(net.apply(state, x, remat=remat)[0] ** 2)

    stored = _grad_temp_bytes(jax.grad(lambda s, x: loss(s, x, False)), state, x)
    recomputed = _grad_temp_bytes(jax.grad(lambda s, x: loss(s, x, True)), state, x)
    # measured (CPU, JAX 0.10): 4x less; the promise is only that it is lower by a clear margin
    assert recomputed * 2 < stored, (recomputed, stored)


# ---- checkpoint checksums: "a change anywhere in an array" is caught ------------------------


DTYPES = [jnp.float32, jnp.bfloat16, jnp.int8, jnp.uint8, jnp.int32, jnp.bool_]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_checksums_catch_a_change_at_every_position(dtype):
    from jdeq.train import _checksum

    base = (jnp.arange(12).reshape(3, 4) % 3).astype(dtype)
    flipped = [base.at[np.unravel_index(i, base.shape)].set(
        (~base[np.unravel_index(i, base.shape)]) if dtype == jnp.bool_ else base[np.unravel_index(i, base.shape)] + 1)
        for i in range(base.size)]
    hashes = _checksum._device_hashes([base, *flipped])
    assert len(set(hashes)) == len(hashes), "hash32 missed a one-entry change"
    prints = _checksum.fingerprint([base])
    for x in flipped:
        assert _checksum.mismatch([x], prints) == 0
    assert _checksum.mismatch([base], prints) is None


def test_checksums_of_negative_small_ints_depend_on_their_bits():
    """int8 -1 and 255 are different values of different types; -1 and -2 must differ."""
    from jdeq.train import _checksum

    a = jnp.array([-1, 3], jnp.int8)
    b = jnp.array([-2, 3], jnp.int8)
    ha, hb = _checksum._device_hashes([a, b])
    assert ha != hb
    assert ha == _checksum._device_hashes([jnp.array([255, 3], jnp.uint8)])[0]  # same bytes, same hash


def test_checksums_cover_prng_key_arrays():
    from jdeq.train import _checksum

    keys = jax.random.split(jax.random.key(0), 3)
    other = keys.at[1].set(jax.random.key(7))
    h = _checksum._device_hashes([keys, other])
    assert h[0] != h[1]
    assert h[0] == _checksum._device_hashes([jax.random.split(jax.random.key(0), 3)])[0]
    prints = _checksum.fingerprint([keys])
    assert _checksum.mismatch([other], prints) == 0 and _checksum.mismatch([keys], prints) is None


def test_hash32_tells_every_position_of_a_3d_array_apart():
    """Swapping any two entries of a (2, 3, 4) array changes hash32: the flat position of every
    entry takes part (a stride error only shows from three axes on)."""
    from jdeq.train import _checksum

    base = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    swapped = []
    for i in range(24):
        for j in range(i + 1, 24):
            x = base.reshape(-1).copy()
            x[i], x[j] = x[j], x[i]
            swapped.append(x.reshape(2, 3, 4))
    hashes = np.asarray(jax.jit(jax.vmap(_checksum._hash32))(jnp.asarray(np.stack([base, *swapped]))))
    assert len(set(hashes.tolist())) == len(hashes), "two layouts of the same values collide"


def test_checkpoint_entry_without_a_checksum_is_accepted():
    """A checkpoint written by an older jdeq has no checksum for some arrays: they are checked
    for shape and dtype only, not reported as corrupt."""
    from jdeq.train import _checksum

    x = jnp.arange(6, dtype=jnp.int32)
    assert _checksum.mismatch([x], [{"shape": [6], "dtype": "int32"}]) is None
    assert _checksum.mismatch([x], [{"shape": [6], "dtype": "float32"}]) == 0


def test_checksums_catch_a_change_of_shape_or_dtype_with_equal_bytes():
    from jdeq.train import _checksum

    x = jnp.arange(6, dtype=jnp.int32)
    prints = _checksum.fingerprint([x])
    assert _checksum.mismatch([x.reshape(2, 3)], prints) == 0
    assert _checksum.mismatch([jax.lax.bitcast_convert_type(x, jnp.float32)], prints) == 0
    assert _checksum.mismatch([x, x], prints + prints) is None
    assert _checksum.mismatch([x, x + 1], prints + prints) == 1  # the index of the first mismatch


# ---- fit's skip rule: "a step whose loss, gradients, updated parameters or updated optimizer
# state hold a NaN/inf is skipped" (each part alone; tests/test_train.py covers the rest) --------


@jax.custom_vjp
def _nan_gradient(x):
    return x


_nan_gradient.defvjp(lambda x: (x, None), lambda _, g: (g * jnp.nan,))


@pytest.mark.parametrize("bad", ["loss_only", "gradients_only"])
def test_step_skips_when_only_the_loss_or_only_the_gradients_are_nonfinite(bad):
    import optax

    from jdeq import train as T

    def loss_fn(model, batch):
        pred = model(batch["x"])
        if bad == "gradients_only":
            pred = _nan_gradient(pred)
        loss = jnp.mean((pred - batch["y"]) ** 2)
        if bad == "loss_only":
            loss = loss + jax.lax.stop_gradient(jnp.inf)  # the gradients stay finite
        return loss, {"loss": loss}

    opt = optax.sgd(0.1)
    state = T.TrainState.create(nnx.Linear(2, 1, rngs=nnx.Rngs(0)), opt)
    new, metrics = jax.jit(T.make_train_step(loss_fn, opt))(state, {"x": jnp.ones((4, 2)), "y": jnp.zeros((4, 1))})
    assert float(metrics["skipped"]) == 1.0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(a, b)


def test_crc32_depends_on_values_not_on_memory_layout():
    from jdeq.train import _checksum

    c = np.arange(12, dtype=np.float32).reshape(3, 4)
    f = np.asfortranarray(c)
    t = np.ascontiguousarray(c.T).T  # a transposed view: neither C- nor F-ordered copy of c
    assert _checksum.fingerprint([c]) == _checksum.fingerprint([f]) == _checksum.fingerprint([t])
    assert _checksum.fingerprint([np.float32(3.0)])[0]["crc32"] == _checksum.fingerprint([np.array([3.0], np.float32)])[0]["crc32"]


def test_split_arrays_get_hash32_and_are_verified_by_it(monkeypatch):
    """The bookkeeping of arrays split over processes (``hash32`` instead of ``crc32``), run in
    one process by declaring some arrays unreadable (``_readable`` is the only place that looks at
    the layout; ``tests/test_multiprocess.py`` covers real split arrays)."""
    from jdeq.train import _checksum

    a, b, c = jnp.arange(3.0), jnp.arange(5.0), jnp.ones((2, 2), jnp.int32)
    monkeypatch.setattr(_checksum, "_readable", lambda x: np.shape(x) != (5,))
    prints = _checksum.fingerprint([a, b, c])
    assert set(prints[0]) == set(prints[2]) == {"shape", "dtype", "crc32"}
    assert set(prints[1]) == {"shape", "dtype", "hash32"}
    assert prints[1]["hash32"] == _checksum._device_hashes([b])[0]
    assert _checksum.mismatch([a, b, c], prints) is None
    assert _checksum.mismatch([a, b.at[4].add(1.0), c], prints) == 1
    assert _checksum.mismatch([a.at[0].add(1.0), b, c], prints) == 0
    assert _checksum.mismatch([a, b, c.at[1, 1].set(7)], prints) == 2
    # saved whole (crc32), restored split: gathered and checked against the crc32
    monkeypatch.setattr(_checksum, "_readable", lambda x: True)
    saved = _checksum.fingerprint([a, b])
    monkeypatch.setattr(_checksum, "_readable", lambda x: np.shape(x) != (5,))
    assert _checksum.mismatch([a, b], saved) is None
    assert _checksum.mismatch([a, b.at[0].add(1.0)], saved) == 1


# ---- TrainState.rest: "what the model writes to it (RNG counters, so that dropout draws a new
# mask every step; warm-start caches) is kept by the step" ------------------------------------


class _DropoutNet(nnx.Module):
    def __init__(self):
        self.lin = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
        self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=1))
        self.head = nnx.Linear(4, 2, rngs=nnx.Rngs(2))

    def __call__(self, x):
        return self.head(self.drop(self.lin(x)))


def test_dropout_draws_a_new_mask_every_step():
    import optax

    from jdeq import train as T

    def loss_fn(model, batch):
        out = model(batch["x"])
        return jnp.sum(out), {"out": out}

    opt = optax.sgd(0.0)  # parameters fixed: only the mask can change the output
    state = T.TrainState.create(_DropoutNet(), opt)
    step = jax.jit(T.make_train_step(loss_fn, opt))
    batch = {"x": jnp.ones((8, 4))}
    outs = []
    for _ in range(3):
        state, metrics = step(state, batch)
        outs.append(np.asarray(metrics["out"]))
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[1], outs[2])


def test_resume_with_dropout_equals_uninterrupted(tmp_path):
    import optax

    from jdeq import train as T

    x = np.asarray(jax.random.normal(jax.random.key(0), (32, 4)), np.float32)
    data = {"inputs": x, "labels": (x[:, 0] > 0).astype(np.int32)}
    kw = dict(steps=6, batch_size=8, progress=False, log_every=1)
    full = _DropoutNet()
    T.fit(full, optax.sgd(0.1), data, **kw)

    class Stop(Exception):
        pass

    def stop_at_3(step, metrics):
        if step == 3:
            raise Stop

    part = _DropoutNet()
    with pytest.raises(Stop):
        T.fit(part, optax.sgd(0.1), data, checkpoint_dir=tmp_path, checkpoint_every=3, callback=stop_at_3, **kw)
    resumed = _DropoutNet()
    T.fit(resumed, optax.sgd(0.1), data, checkpoint_dir=tmp_path, checkpoint_every=3, **kw)
    for a, b in zip(jax.tree.leaves(nnx.state(full)), jax.tree.leaves(nnx.state(resumed))):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)


def test_checksum_values_are_stable_across_versions():
    """A checkpoint records ``crc32``/``hash32`` values, and a later jdeq must verify it: the
    functions are part of the checkpoint format. Golden values recorded with jdeq 0.2 (any change
    to the hash's constants, mixing or position scheme breaks every saved checkpoint)."""
    from jdeq.train import _checksum

    xs = [jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7, jnp.array([-1, 3, 127], jnp.int8),
          jnp.array([[True, False], [False, True]]), jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3, 1)]
    assert _checksum._device_hashes(xs) == [4199979084, 1962030141, 261885025, 1952279150]
    assert [f["crc32"] for f in _checksum.fingerprint(xs)] == [2835306869, 2857292433, 4009724143, 987767219]
