"""Jacobian diagnostics and regularizers of a DEQ cell: ``||df/dz||_F`` and ``rho(df/dz)``.

Both act per example: ``f`` treats the rows of a batch independently, so its Jacobian on the whole
batch is block diagonal and one batched JVP gives every example's ``J_b v_b`` at once.

* :func:`jacobian_frobenius`: Hutchinson estimate of ``||J_b||_F^2 / dim`` (Bai, Koltun & Kolter,
  "Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021). Differentiable, cheap
  (one JVP per sample), meant to be added to a training loss.
* :func:`jacobian_penalty`: ``gamma * mean_b ||J_b||_F^2 / dim`` as a scalar loss term, applied
  every step or with probability ``p`` per step (skipped steps cost nothing).
* :func:`spectral_radius`: power-method estimate of ``rho(J_b)``, the quantity that decides whether
  plain fixed-point iteration converges locally (``rho < 1``). A diagnostic.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jdeq import _validate as V
from jdeq._flatten import batch_layout

__all__ = ["jacobian_frobenius", "jacobian_penalty", "spectral_radius"]

_NOISE = ("normal", "rademacher")


def _prepare(f, z, args):
    """``(layout, F)`` with ``F`` the map on the flat ``(batch, dim)`` matrix."""
    V.callable_(f, "f", usage="f(z, args)")
    layout = batch_layout(z, name="z")
    return layout, layout.wrap(f, args)


def jacobian_frobenius(
    f: Callable[[Any, Any], Any],
    z,
    args=None,
    key=None,
    *,
    num_samples: int = 1,
    noise: str = "normal",
) -> jax.Array:
    """Hutchinson estimate of ``||df/dz||_F^2 / dim`` at ``z``, per example.

    With ``v ~ N(0, I)`` (or Rademacher), ``E ||J v||^2 = ||J||_F^2``; the estimate averages
    ``||J_b v_b||^2 / dim`` over ``num_samples`` probes, each one forward-mode JVP of ``f`` on the
    whole batch (the probes are vmapped; ``f`` itself is evaluated once). ``dim`` is the number of
    state entries of one example, so the value is the mean squared entry of ``J_b`` and is
    comparable across state sizes.

    It is differentiable with respect to ``args`` (and to ``z`` when ``z`` is traced: pass
    ``jax.lax.stop_gradient(z_star)`` to penalize only the cell's direct dependence on its
    parameters, which avoids differentiating through the solver's implicit gradient again), and
    it runs inside ``jit``.

    Args:
      f: the cell as a pure function ``f(z, args) -> z`` (as for :func:`jdeq.fixed_point`).
      z: the state at which to measure (typically ``z*``); a pytree of ``(batch, ...)`` leaves.
      args: the cell's arguments (parameters, input injection).
      key: a PRNG key for the probes.
      num_samples: number of probe vectors per example (variance falls as ``1/num_samples``).
      noise: ``"normal"`` (Gaussian probes, as in Bai et al. 2021) or ``"rademacher"`` (+-1
        probes: lower variance, same mean).

    Returns:
      A ``(batch,)`` array: per example, the estimate of ``||J_b||_F^2 / dim``. Take ``.mean()``
      for the batch-mean regularizer of Bai et al. 2021 (or use :func:`jacobian_penalty`).

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> f = lambda z, p: jnp.tanh(z @ p["W"] + p["x"])
      >>> p = {"W": 0.3 * jnp.eye(4), "x": jnp.ones((8, 4))}
      >>> z = jdeq.fixed_point(f, jnp.zeros((8, 4)), p).value
      >>> jf = jdeq.jacobian_frobenius(f, z, p, jax.random.key(0), num_samples=4)
      >>> jf.shape
      (8,)

    Reference: Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
    Regularization", ICML 2021; Hutchinson, "A stochastic estimator of the trace of the influence
    matrix", 1990.
    """
    V.key(key)
    V.positive_int(num_samples, "num_samples")
    V.one_of(noise, "noise", _NOISE)
    layout, F = _prepare(f, z, args)
    zm = layout.flatten(z)
    shape = (num_samples,) + zm.shape
    if noise == "normal":
        probes = jax.random.normal(key, shape, zm.dtype)
    else:
        probes = jax.random.rademacher(key, shape, zm.dtype)
    jvps = jax.vmap(lambda v: jax.jvp(F, (zm,), (v,))[1])(probes)  # (samples, batch, dim)
    return jnp.mean(jnp.sum(jvps**2, axis=-1), axis=0) / layout.dim


def jacobian_penalty(
    f: Callable[[Any, Any], Any],
    z,
    args=None,
    key=None,
    *,
    gamma: float,
    prob: float = 1.0,
    num_samples: int = 1,
    noise: str = "normal",
) -> jax.Array:
    """The Jacobian regularization term ``gamma * mean_b ||J_b||_F^2 / dim``, for any loss.

    Applied at every call (``prob=1``) or, as Bai et al. 2021 do to save compute, with
    probability ``prob`` per call: a ``lax.cond`` skips the JVPs entirely on the other calls
    (the term is then 0, and so is its gradient). ``z`` is used as given: pass
    ``jax.lax.stop_gradient(z_star)`` to leave the solver's gradient out of the penalty's.

    Args:
      f, z, args, num_samples, noise: as in :func:`jacobian_frobenius`.
      key: PRNG key; split internally between the coin flip and the probes.
      gamma: weight of the term (``>= 0``).
      prob: probability in (0, 1] that this call computes the term (0 is rejected: to switch
        the term off, pass ``gamma=0`` or do not call it; ``jdeq.train.JacReg`` has the same
        rule).

    Returns:
      A scalar (float of ``z``'s dtype), to be added to the task loss.

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> f = lambda z, p: jnp.tanh(z @ p["W"] + p["x"])
      >>> p = {"W": 0.3 * jnp.eye(4), "x": jnp.ones((8, 4))}
      >>> def loss(p, key):
      ...     z = jdeq.fixed_point(f, jnp.zeros((8, 4)), p).value
      ...     reg = jdeq.jacobian_penalty(f, jax.lax.stop_gradient(z), p, key, gamma=0.1)
      ...     return jnp.mean(z**2) + reg
      >>> g = jax.jit(jax.grad(loss))(p, jax.random.key(0))

    Reference: Bai, Koltun & Kolter, ICML 2021 (they apply the term with a probability per step).
    """
    if not isinstance(gamma, jax.Array):  # an array (a schedule's value) may be traced
        V.nonnegative_number(gamma, "gamma")
    V.probability(prob, "prob")
    V.key(key)
    coin, probes = jax.random.split(key)

    def term(_):
        return gamma * jnp.mean(
            jacobian_frobenius(f, z, args, probes, num_samples=num_samples, noise=noise)
        )

    if prob == 1:
        return term(None)
    dtype = batch_layout(z, name="z").dtype
    return jax.lax.cond(
        jax.random.bernoulli(coin, prob), term, lambda _: jnp.zeros((), dtype), None
    )


def spectral_radius(
    f: Callable[[Any, Any], Any],
    z,
    args=None,
    key=None,
    *,
    iters: int = 50,
) -> jax.Array:
    """Power-method estimate of the spectral radius ``rho(df/dz)`` at ``z``, per example.

    Runs ``iters`` power iterations ``v <- J v / ||J v||`` per example (one batched JVP each,
    inside a ``lax.fori_loop``) and returns the geometric mean of the growth factors
    ``||J v||`` over the second half of the iterations. The geometric mean (rather than the
    last factor) also converges when the dominant eigenvalues are a complex pair, where single
    ratios oscillate; the error shrinks like ``1/iters`` in that case, geometrically otherwise.
    ``rho < 1`` at ``z*`` means plain fixed-point iteration converges near ``z*``. The value is
    a diagnostic: it carries no gradient.

    Args:
      f: the cell ``f(z, args) -> z``.
      z: the state (typically ``z*``), ``(batch, ...)`` leaves.
      args: the cell's arguments.
      key: PRNG key for the random start vector.
      iters: number of power iterations (``>= 2``).

    Returns:
      A ``(batch,)`` array of estimates of ``max |eig(J_b)|``.

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> f = lambda z, a: 0.5 * jnp.tanh(z) + a
      >>> rho = jdeq.spectral_radius(f, jnp.zeros((2, 3)), jnp.zeros((2, 3)), jax.random.key(0))
      >>> bool(jnp.allclose(rho, 0.5, atol=1e-3))
      True

    Reference: the power method (von Mises, 1929); used to monitor DEQs in Bai et al. 2021.
    """
    V.key(key)
    V.integer(iters, "iters", 2)
    layout, F = _prepare(f, jax.lax.stop_gradient(z), jax.lax.stop_gradient(args))
    zm = jax.lax.stop_gradient(layout.flatten(z))
    _, jvp = jax.linearize(F, zm)
    tiny = jnp.finfo(zm.dtype).tiny
    v = jax.random.normal(key, zm.shape, zm.dtype)  # (its own scale is not counted: see burn)
    burn = iters // 2  # >= 1: the first growth factor, which depends on the start's norm, never counts

    def body(i, carry):
        v, log_growth = carry
        w = jvp(v)
        norm = jnp.linalg.norm(w, axis=1)
        log_growth = log_growth + jnp.where(i >= burn, jnp.log(norm + tiny), 0.0)
        return w / (norm[:, None] + tiny), log_growth

    _, log_growth = jax.lax.fori_loop(0, iters, body, (v, jnp.zeros(zm.shape[0], zm.dtype)))
    return jnp.exp(log_growth / (iters - burn))
