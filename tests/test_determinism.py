"""Same seed, same results (bit for bit, same backend); another seed, other results.

Covers ``fit`` (parameters and every logged metric), model initialization, ``fixed_point`` with
each solver (value, stats and the implicit gradient), the randomized diagnostics, and the data
generators. Across processes (another Python hash seed, a fresh compile) the kill/resume test
in tests/test_resume.py compares runs bitwise too. Where XLA does not promise this (GPU
atomics, other device counts or shardings, other backends or versions): docs/reliability.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _resume_worker as W
import jdeq
from jdeq import train
from jdeq.data import arithmetic, digits


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _bitwise_equal(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(la, lb)
    )


def _fit(seed):
    from flax import nnx

    net = W.Net("deq")
    hist = train.fit(net, W.optimizer(), W.data(), steps=6, batch_size=32, seed=seed, log_every=1,
                     progress=False, eval_data={"train": W.data()})
    metrics = [{k: v for k, v in r.items() if k != "time"} for r in hist.train]
    return nnx.state(net, nnx.Param), metrics, hist.eval


def test_fit_same_seed_is_bitwise_repeatable_other_seed_differs():
    from flax import nnx

    params, metrics, evals = _fit(seed=3)
    params2, metrics2, evals2 = _fit(seed=3)
    assert _bitwise_equal(params, params2)
    assert metrics == metrics2 and evals == evals2  # floats compared exactly
    assert {"loss", "nsteps"} <= set(metrics[0])
    other, other_metrics, _ = _fit(seed=4)  # another batch order
    assert not _bitwise_equal(params, other) and metrics != other_metrics
    init = [nnx.state(W.Net("deq", seed=s), nnx.Param) for s in (0, 0, 1)]  # initial weights
    assert _bitwise_equal(init[0], init[1]) and not _bitwise_equal(init[0], init[2])


def _problem(key):
    kw, kx = jax.random.split(key)
    w = 0.5 * jax.random.normal(kw, (6, 6)) / np.sqrt(6)
    x = jax.random.normal(kx, (4, 6))
    return (lambda z, a: jnp.tanh(z @ a[0] + a[1])), (w, x)


@pytest.mark.parametrize("solver", [jdeq.FixedPointIteration(), jdeq.Anderson(), jdeq.Broyden()],
                         ids=["picard", "anderson", "broyden"])
def test_fixed_point_same_inputs_bitwise_repeatable(solver):
    def solve(args, f):
        return jdeq.fixed_point(f, jnp.zeros_like(args[1]), args, solver=solver)

    def loss(args, f):
        return jnp.sum(solve(args, f).value ** 2)

    f, args = _problem(jax.random.key(0))
    solve_jit = jax.jit(solve, static_argnums=1)
    grad_jit = jax.jit(jax.grad(loss), static_argnums=1)
    runs = [solve_jit(args, f) for _ in range(2)]
    assert _bitwise_equal(runs[0], runs[1])  # value and every stats field
    assert _bitwise_equal(grad_jit(args, f), grad_jit(args, f))
    _, other_args = _problem(jax.random.key(1))
    assert not _bitwise_equal(solve_jit(other_args, f).value, runs[0].value)


def test_randomized_diagnostics_follow_their_key():
    f, args = _problem(jax.random.key(0))
    z = jdeq.fixed_point(f, jnp.zeros_like(args[1]), args).value
    frob = [jdeq.jacobian_frobenius(f, z, args, jax.random.key(k)) for k in (5, 5, 6)]
    rho = [jdeq.spectral_radius(f, z, args, jax.random.key(k), iters=6) for k in (5, 5, 6)]
    for a, b, c in (frob, rho):
        assert _bitwise_equal(a, b) and not _bitwise_equal(a, c)


def test_data_generators_follow_their_seed():
    a, b, c = (arithmetic.generate(64, length=12, seed=s).arrays() for s in (1, 1, 2))
    assert _bitwise_equal(a, b) and not _bitwise_equal(a, c)
    d, e, g = (digits.load(seed=s) for s in (1, 1, 2))
    assert _bitwise_equal((d.train, d.test), (e.train, e.test))
    assert not _bitwise_equal((d.train, d.test), (g.train, g.test))
    pytest.importorskip("mnist1d")
    from jdeq.data import mnist1d

    m, n, o = (mnist1d.load(num_samples=200, seed=s) for s in (1, 1, 2))
    assert _bitwise_equal((m.train, m.test), (n.train, n.test))
    assert not _bitwise_equal((m.train, m.test), (o.train, o.test))
