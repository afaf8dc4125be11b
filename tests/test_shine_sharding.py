"""SHINE under Explicit mesh axes: the forward solver's state (laid out like z) reaches the
backward, and the gradient equals the one-device gradient. A subprocess with 4 simulated CPU
devices (XLA_FLAGS must be set before JAX starts)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from _devices import cpu_devices_env

WORKER = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, jdeq
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    jax.config.update("jax_enable_x64", True)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(0)
    d, n = 8, 8
    W = jnp.asarray(0.7 * rng.normal(size=(d, d)) / np.sqrt(d))
    x = jnp.asarray(rng.normal(size=(n, d)))
    f = lambda z, p: jnp.tanh(z @ p["W"].T + p["x"])
    def loss(p, solver, grad):
        z = jdeq.fixed_point(f, jnp.zeros_like(p["x"]), p, solver=solver, gradient=grad).value
        return jnp.sum(jnp.sin(z))
    grad_fn = jax.jit(jax.grad(loss), static_argnums=(1, 2))
    cases = [(jdeq.Broyden(tol=1e-8, maxiter=50), "fallback"), (jdeq.Broyden(tol=1e-8, maxiter=50), "refine"),
             (jdeq.Anderson(tol=1e-8, maxiter=50), "direct")]
    for solver, mode in cases:
        grad = jdeq.Implicit(shine=mode, shine_tol=0.3, tol=1e-10, maxiter=200)
        g1 = grad_fn({"W": W, "x": x}, solver, grad)
        with jax.set_mesh(mesh):
            p = {"W": jax.device_put(W, NamedSharding(mesh, P())),
                 "x": jax.device_put(x, NamedSharding(mesh, P("data")))}
            g2 = grad_fn(p, solver, grad)
        err = max(float(jnp.max(jnp.abs(g1[k] - g2[k]))) for k in g1)
        assert err < 1e-8, (type(solver).__name__, mode, err)
        assert jax.typeof(g2["x"]).sharding.spec[0] == "data"
    print("OK")
''')


def test_shine_under_explicit_axes_matches_one_device():
    env = cpu_devices_env(4)
    out = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
