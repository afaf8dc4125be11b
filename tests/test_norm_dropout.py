"""Normalization and variational dropout for DEQ cells: spectral norm keeps the effective
weight's spectral norm at the target through training (nnx and linen, u updated outside the
solve), calls never rewrite raw weights, weight norm matches g V / ||V||, and a dropout mask is
identical at every solver iteration of one forward and fresh at the next forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdeq

IN, D, N = 3, 8, 4


def effective_weight(layer, d=D):
    """The matrix of a bias-free linear map (rows: inputs)."""
    return layer(jnp.eye(d))


def test_nnx_spectral_norm_stays_at_target_through_training():
    cell = jdeq.models.MLPCell(IN, D, w_scale=2.0, rngs=nnx.Rngs(0))
    jdeq.models.apply_norm(cell, "spectral", names=("w",), target=0.9, rngs=nnx.Rngs(1))
    assert isinstance(cell.w, jdeq.models.SpectralNorm) and isinstance(cell.u, nnx.Linear)
    deq = jdeq.nnx.DEQ(cell, solver=jdeq.FixedPointIteration(tol=1e-5, maxiter=200))
    opt = nnx.Optimizer(deq, optax.sgd(0.5), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(0), (N, IN))
    y = jax.random.normal(jax.random.key(1), (N, D))

    @nnx.jit
    def step(deq, opt):
        jdeq.models.update_norm(deq)  # power iteration once per step, outside the solve

        def loss(deq):
            z, stats = deq(x)
            return jnp.mean((z - y) ** 2), stats

        (l, stats), g = nnx.value_and_grad(loss, has_aux=True)(deq)
        opt.update(deq, g)
        return l, stats

    kernel0 = np.asarray(cell.w.layer.kernel[...])
    for _ in range(15):
        _, stats = step(deq, opt)
    raw = cell.w.layer.kernel[...]
    assert not np.allclose(raw, kernel0)  # training moved the raw weight ...
    assert abs(float(jnp.linalg.norm(raw, 2)) - 0.9) > 0.1  # ... which is not normalized
    sigma = float(jnp.linalg.norm(effective_weight(cell.w), 2))
    assert abs(sigma - 0.9) < 0.01  # but the weight the cell uses is at the target
    assert bool(stats.converged.all())


def test_nnx_spectral_norm_call_is_side_effect_free_and_differentiable():
    lin = jdeq.models.SpectralNorm(nnx.Linear(D, D, use_bias=False, rngs=nnx.Rngs(0)),
                                   target=0.5, rngs=nnx.Rngs(1))
    k0 = np.asarray(lin.layer.kernel[...])
    u0 = np.asarray(lin.sn.batch_stats[("kernel", "u")][...])
    lin(jnp.ones((2, D)))
    np.testing.assert_array_equal(lin.layer.kernel[...], k0)  # Flax would write W / sigma here
    np.testing.assert_array_equal(lin.sn.batch_stats[("kernel", "u")][...], u0)  # no update
    for _ in range(30):
        jdeq.models.update_norm(lin)
    np.testing.assert_array_equal(lin.layer.kernel[...], k0)  # update touches only u / sigma
    np.testing.assert_allclose(jnp.linalg.norm(effective_weight(lin), 2), 0.5, rtol=1e-4)
    g = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, D))) ** 2))(lin)
    assert float(jnp.abs(g["sn"]["layer_instance"]["kernel"][...]).sum()) > 0


def test_linen_spectral_norm_update_outside_the_solve():
    class Cell(nn.Module):
        @nn.compact
        def __call__(self, z, x):
            wz = nn.SpectralNorm(nn.Dense(D, use_bias=False, name="w"))(0.9 * z, update_stats=False)
            return jnp.tanh(wz + nn.Dense(D)(x))

        def init_z(self, x):
            return jnp.zeros((x.shape[0], D))

    class Probe(nn.Module):  # the same normalized layer alone, to read the effective weight
        @nn.compact
        def __call__(self, z):
            return nn.SpectralNorm(nn.Dense(D, use_bias=False, name="w"))(0.9 * z, update_stats=False)

    deq = jdeq.linen.DEQ(cell=Cell(), solver=jdeq.FixedPointIteration(tol=1e-5, maxiter=200))
    x = jnp.ones((N, IN))
    variables = deq.init(jax.random.PRNGKey(0), x)
    big = jax.tree_util.tree_map(lambda a: 3.0 * a, variables["params"])  # ||W|| well above 1
    variables = {**variables, "params": big}
    new = jdeq.models.update_norm(variables, n_steps=30)
    np.testing.assert_array_equal(new["params"]["cell"]["w"]["kernel"], big["cell"]["w"]["kernel"])
    probe_vars = {
        "params": {"w": new["params"]["cell"]["w"]},
        "batch_stats": new["batch_stats"]["cell"],
    }
    w_eff = Probe().apply(probe_vars, jnp.eye(D))
    np.testing.assert_allclose(jnp.linalg.norm(w_eff, 2), 0.9, rtol=1e-3)
    z, stats = jax.jit(deq.apply)(new, x)
    assert bool(stats.converged.all())


def test_nnx_weight_norm_matches_formula_and_keeps_raw_weight():
    lin = jdeq.models.WeightNorm(nnx.Linear(IN, D, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
    v = np.asarray(lin.layer.kernel[...])
    x = jax.random.normal(jax.random.key(0), (2, IN))
    g = lin.wn.scales[("kernel",)][...]
    expected = x @ (g * v / np.linalg.norm(v, axis=0)) + lin.layer.bias[...]
    np.testing.assert_allclose(lin(x), expected, rtol=1e-5)
    np.testing.assert_array_equal(lin.layer.kernel[...], v)
    cell = jdeq.models.apply_norm(jdeq.models.MLPCell(IN, D, rngs=nnx.Rngs(0)), "weight",
                                  rngs=nnx.Rngs(1))
    assert isinstance(cell.w, jdeq.models.WeightNorm) and isinstance(cell.u, jdeq.models.WeightNorm)
    z, stats = jax.jit(lambda x: nnx.merge(*nnx.split(jdeq.nnx.DEQ(cell)))(x))(jnp.ones((N, IN)))
    assert bool(stats.converged.all())


def test_norm_bad_inputs_raise():
    cell = jdeq.models.MLPCell(IN, D, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kind"):
        jdeq.models.apply_norm(cell, "batch", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="names"):
        jdeq.models.apply_norm(cell, "spectral", names=("v",), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="target"):
        jdeq.models.SpectralNorm(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), target=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="model_or_variables"):
        jdeq.models.update_norm([1, 2])


_MASKS: list = []  # the masks a recording DropCell applied, one per call of the cell


class DropCell(nnx.Module):
    """MLP cell with variational dropout on the state; with ``record=True`` appends the mask it
    applies to ``_MASKS`` (a module-level list: Flax 0.12.1 copies a list held by a module when
    the layer splits it, so appends to an attribute would be lost)."""

    def __init__(self, rngs, record=False):
        self.inner = jdeq.models.MLPCell(IN, D, w_scale=0.5, rngs=rngs)
        self.drop = jdeq.models.VariationalDropout((D,), 0.25, rngs=rngs)
        self.record = record

    def __call__(self, z, x):
        if self.record:
            jax.debug.callback(lambda m: _MASKS.append(np.asarray(m)), self.drop.mask[...])
        return self.inner(self.drop(z), x)

    def init_z(self, x):
        return self.inner.init_z(x)


def test_variational_dropout_mask_identical_across_iterations():
    record = _MASKS
    record.clear()
    cell = DropCell(nnx.Rngs(0, dropout=1), record=True)
    deq = jdeq.nnx.DEQ(cell, solver=jdeq.FixedPointIteration(tol=1e-6, maxiter=100))
    x = jax.random.normal(jax.random.key(0), (N, IN))
    jdeq.models.reset_dropout(deq, N)
    z, stats = deq(x)
    jax.effects_barrier()  # wait for the debug callbacks (they may run asynchronously)
    assert len(record) >= 5  # several iterations ...
    for m in record[1:]:
        np.testing.assert_array_equal(m, record[0])  # ... all with the same mask
    mask = record[0]
    assert mask.shape == (N, D) and 0 < (mask == 0).mean() < 1
    np.testing.assert_allclose(np.unique(mask), [0.0, 4 / 3])
    assert bool(stats.converged.all())  # one fixed map: the iteration converges
    np.testing.assert_allclose(cell(z, x), z, atol=1e-4)  # z* is its fixed point with that mask
    record.clear()
    jdeq.models.reset_dropout(deq, N)  # next forward: a new mask
    deq(x)
    assert not np.array_equal(record[0], mask)


def test_variational_dropout_in_jit_eval_and_errors():
    cell = DropCell(nnx.Rngs(0, dropout=1))
    deq = jdeq.nnx.DEQ(cell, solver=jdeq.FixedPointIteration(tol=1e-6, maxiter=100))
    x = jnp.ones((N, IN))

    @nnx.jit
    def forward(deq, x):
        jdeq.models.reset_dropout(deq, x.shape[0])
        return deq(x)

    jdeq.models.reset_dropout(deq, N)  # mask shape (N, D) from here on: one compilation
    z1, _ = forward(deq, x)
    m1 = np.asarray(cell.drop.mask[...])
    z2, _ = forward(deq, x)
    assert not np.array_equal(m1, cell.drop.mask[...]) and not np.allclose(z1, z2)
    deq.eval()
    m2 = np.asarray(cell.drop.mask[...])
    ze, stats = forward(deq, x)
    np.testing.assert_array_equal(cell.drop.mask[...], m2)  # eval draws nothing ...
    assert bool(stats.converged.all())
    np.testing.assert_allclose(cell.inner(ze, x), ze, atol=1e-4)  # ... and drops nothing
    deq.train()
    with pytest.raises(ValueError, match="reset_dropout"):
        cell.drop(jnp.ones((N + 1, D)))
    with pytest.raises(ValueError, match="rate"):
        jdeq.models.VariationalDropout((D,), 1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="batch"):
        jdeq.models.reset_dropout(deq, 0)


def test_dropout_mask_function():
    m = jdeq.models.dropout_mask(jax.random.key(0), (200, 50), 0.3)
    assert m.shape == (200, 50)
    np.testing.assert_allclose(float(m.mean()), 1.0, atol=0.03)  # inverted dropout: mean 1
    np.testing.assert_allclose(float((m == 0).mean()), 0.3, atol=0.02)
    np.testing.assert_array_equal(jdeq.models.dropout_mask(jax.random.key(0), (2, 3), 0.0), 1.0)
    shared = jdeq.models.dropout_mask(jax.random.key(1), (4, 1, 1, 6), 0.5)
    assert shared.shape == (4, 1, 1, 6)
