"""Jacobian regularizers and diagnostics: Hutchinson ||J||_F^2 against the exact value from
jax.jacfwd (within the estimator's own standard deviation), its gradient against finite
differences, the probabilistic penalty, and the power method against jnp.linalg.eigvals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jdeq

N, D = 3, 5


def cell(z, p):
    return jnp.tanh(z @ p["W"].T + p["x"])


def make_params(seed=0, dtype=np.float64, scale=0.9):
    rng = np.random.default_rng(seed)
    p = {"W": scale * rng.normal(size=(D, D)) / np.sqrt(D), "x": rng.normal(size=(N, D))}
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), p)


def exact_jacobians(p, z):
    """Per-example Jacobians (N, D, D) of the cell by forward mode."""
    return jax.vmap(jax.jacfwd(lambda zz, x: jnp.tanh(zz @ p["W"].T + x)))(z, p["x"])


@pytest.mark.parametrize("noise", ["normal", "rademacher"])
def test_hutchinson_matches_exact_frobenius(x64, noise):
    p = make_params()
    z = jnp.asarray(np.random.default_rng(3).normal(size=(N, D)))
    J = exact_jacobians(p, z)
    exact = jnp.sum(J**2, axis=(1, 2)) / D
    samples = 20000
    est = jdeq.jacobian_frobenius(cell, z, p, jax.random.key(0), num_samples=samples, noise=noise)
    assert est.shape == (N,)
    # Gaussian probes: Var ||Jv||^2 = 2 ||J^T J||_F^2 (Rademacher has less); 5 sigma bound.
    A = jnp.einsum("nij,nik->njk", J, J)
    std = jnp.sqrt(2.0 * jnp.sum(A**2, axis=(1, 2)) / samples) / D
    np.testing.assert_array_less(jnp.abs(est - exact), 5 * std)
    # and it is a real estimate, not a constant: a few samples disagree between keys
    a = jdeq.jacobian_frobenius(cell, z, p, jax.random.key(1), noise=noise)
    b = jdeq.jacobian_frobenius(cell, z, p, jax.random.key(2), noise=noise)
    assert not np.allclose(a, b)


def test_hutchinson_pytree_state_and_jit():
    def f(z, a):
        return {"u": 0.5 * z["v"] + a, "v": 0.25 * z["u"]}

    z = {"u": jnp.ones((2, 2)), "v": jnp.ones((2, 2))}
    est = jax.jit(lambda k: jdeq.jacobian_frobenius(f, z, 0.0, k, num_samples=4000))(jax.random.key(0))
    # J = [[0, .5 I], [.25 I, 0]] on dim 4: ||J||_F^2 / dim = (2 * .25 + 2 * .0625) / 4
    assert est.shape == (2,)
    np.testing.assert_allclose(est, (0.5 + 0.125) / 4, rtol=0.1)


def test_regularizer_gradient_matches_finite_differences(x64):
    p = make_params()
    z = jax.lax.stop_gradient(jdeq.fixed_point(cell, jnp.zeros((N, D)), p).value)
    key = jax.random.key(0)

    def reg(w, x):
        return jnp.mean(jdeq.jacobian_frobenius(cell, z, {"W": w, "x": x}, key, num_samples=3))

    check_grads(reg, (p["W"], p["x"]), order=1, modes=("rev", "fwd"))
    # and with respect to the state too (z traced)
    check_grads(
        lambda zz: jnp.mean(jdeq.jacobian_frobenius(cell, zz, p, key, num_samples=2)),
        (z,), order=1, modes=("rev",),
    )


def test_penalty_every_step_and_with_probability():
    p = make_params(dtype=np.float32)
    z = jnp.ones((N, D), jnp.float32)
    key = jax.random.key(4)
    _, probes = jax.random.split(key)
    full = jdeq.jacobian_penalty(cell, z, p, key, gamma=0.3)
    direct = 0.3 * jnp.mean(jdeq.jacobian_frobenius(cell, z, p, probes))
    np.testing.assert_allclose(full, direct, rtol=1e-6)

    step = jax.jit(jax.value_and_grad(
        lambda p, k: jdeq.jacobian_penalty(cell, z, p, k, gamma=0.3, prob=0.4)))
    values, on = [], 0
    for i in range(40):
        k = jax.random.key(100 + i)
        v, g = step(p, k)
        values.append(float(v))
        coin = bool(jax.random.bernoulli(jax.random.split(k)[0], 0.4))
        on += coin
        if coin:
            assert v > 0 and float(jnp.abs(g["W"]).sum()) > 0
        else:
            assert v == 0 and float(jnp.abs(g["W"]).sum()) == 0
    assert 0 < on < 40


def test_spectral_radius_matches_eigvals(x64):
    p = make_params(seed=1, scale=1.2)
    z = jnp.asarray(np.random.default_rng(5).normal(size=(N, D)))
    J = exact_jacobians(p, z)
    rho = jnp.max(jnp.abs(jax.vmap(jnp.linalg.eigvals)(J)), axis=1)
    est = jdeq.spectral_radius(cell, z, p, jax.random.key(0), iters=400)
    assert est.shape == (N,)
    np.testing.assert_allclose(est, rho, rtol=0.03)


def test_spectral_radius_symmetric_is_tight(x64):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(D, D))
    S = jnp.asarray(0.3 * (a + a.T))
    f = lambda z, s: z @ s
    rho = jnp.max(jnp.abs(jnp.linalg.eigvalsh(S)))
    est = jdeq.spectral_radius(f, jnp.ones((2, D)), S, jax.random.key(0), iters=300)
    np.testing.assert_allclose(est, rho, rtol=1e-3)


@pytest.mark.parametrize("iters", [2, 5, 8, None])  # None: the default, 50
def test_spectral_radius_is_the_documented_power_method(x64, iters):
    """The docstring's estimate, step for step: ``iters`` power iterations ``v <- J v / ||J v||``
    from a normal start (per example), the geometric mean of ``||J v||`` over the last
    ``iters - iters // 2`` of them. Few iterations on a non-normal map, where every detail
    (how many run, which count) changes the number."""
    rng = np.random.default_rng(3)
    A = jnp.asarray(rng.normal(size=(2, D, D)) * 0.4)  # one matrix per example
    f = lambda z, a: jnp.einsum("bij,bj->bi", a, z)  # noqa: E731
    key = jax.random.key(7)
    est = jdeq.spectral_radius(f, jnp.ones((2, D)), A, key, **({} if iters is None else {"iters": iters}))
    iters = 50 if iters is None else iters
    v = np.asarray(jax.random.normal(key, (2, D), jnp.float64))
    logs = []
    for _ in range(iters):
        w = np.einsum("bij,bj->bi", np.asarray(A), v)
        n = np.linalg.norm(w, axis=1)
        logs.append(np.log(n))
        v = w / n[:, None]
    want = np.exp(np.mean(logs[iters // 2:], axis=0))
    np.testing.assert_allclose(est, want, rtol=1e-10)


def test_spectral_radius_of_a_constant_map_is_zero():
    # J = 0: every growth factor is 0, and the estimate is 0, not log(0)'s NaN
    est = jdeq.spectral_radius(lambda z, a: a, jnp.ones((2, D)), jnp.full((2, D), 0.5), jax.random.key(0), iters=6)
    np.testing.assert_array_equal(est, [0.0, 0.0])


def test_bad_inputs_raise():
    p = make_params(dtype=np.float32)
    z = jnp.ones((N, D))
    key = jax.random.key(0)
    with pytest.raises(TypeError, match="key"):
        jdeq.jacobian_frobenius(cell, z, p, None)
    with pytest.raises(ValueError, match="num_samples"):
        jdeq.jacobian_frobenius(cell, z, p, key, num_samples=0)
    with pytest.raises(ValueError, match="noise"):
        jdeq.jacobian_frobenius(cell, z, p, key, noise="uniform")
    with pytest.raises(TypeError, match="`f`"):
        jdeq.jacobian_frobenius("cell", z, p, key)
    with pytest.raises(ValueError, match="gamma"):
        jdeq.jacobian_penalty(cell, z, p, key, gamma=-1.0)
    with pytest.raises(ValueError, match="prob"):
        jdeq.jacobian_penalty(cell, z, p, key, gamma=1.0, prob=0.0)
    with pytest.raises(ValueError, match="iters"):
        jdeq.spectral_radius(cell, z, p, key, iters=1)
    with pytest.raises(ValueError, match="batch axis"):
        jdeq.spectral_radius(cell, jnp.ones(()), p, key)


def test_penalty_with_probability_keeps_the_state_dtype():
    """``prob < 1``: a skipped call returns a zero of the state's dtype, like a computed one
    (bfloat16 here), so the two branches of its ``lax.cond`` agree and the penalty adds to a
    bfloat16 loss without promotion."""
    p = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), make_params(dtype=np.float32))
    z = jnp.ones((N, D), jnp.bfloat16)
    step = jax.jit(lambda k: jdeq.jacobian_penalty(cell, z, p, k, gamma=0.3, prob=0.5))
    seen = set()
    for i in range(12):
        k = jax.random.key(i)
        v = step(k)
        assert v.dtype == jnp.bfloat16 and v.shape == ()
        seen.add(bool(jax.random.bernoulli(jax.random.split(k)[0], 0.5)))
    assert seen == {True, False}  # both branches ran


def test_jacobian_frobenius_probes_take_the_state_dtype(x64):
    """The probes have the state's dtype, not JAX's default float (float64 here, with x64 on):
    a float32 state gets a float32 estimate; with many probes on a linear map it is near the
    exact value (0.5^2 + 0.5^2 + 3^2) / 2 per example."""
    A = jnp.array([[0.5, 0.0], [0.5, 3.0]], jnp.float32)
    f = lambda z, a: z @ A.T + a  # noqa: E731
    z = jnp.zeros((3, 2), jnp.float32)
    est = jdeq.jacobian_frobenius(f, z, jnp.ones((3, 2), jnp.float32), jax.random.key(0), num_samples=4000)
    assert est.dtype == jnp.float32 and est.shape == (3,)
    np.testing.assert_allclose(est, (0.25 + 0.25 + 9.0) / 2, rtol=0.1)


@pytest.mark.parametrize("dtype,x64_on", [("float32", True), ("bfloat16", False)], ids=["float32-x64", "bfloat16"])
def test_spectral_radius_takes_the_state_dtype(dtype, x64_on):
    """The estimate has the state's dtype (no float64 for a float32 state with x64 on, no
    float32 for a bfloat16 one) and is still near the exact radius 0.5 of a diagonal map."""
    with jax.enable_x64(x64_on):
        d = jnp.array([0.5, -0.3, 0.2], dtype)
        f = lambda z, a: z * d + a  # noqa: E731
        z = jnp.ones((2, 3), dtype)
        est = jdeq.spectral_radius(f, z, jnp.zeros((2, 3), dtype), jax.random.key(0), iters=40)
        assert est.dtype == jnp.dtype(dtype) and est.shape == (2,)
        np.testing.assert_allclose(np.asarray(est, np.float32), 0.5, rtol=0.02)
