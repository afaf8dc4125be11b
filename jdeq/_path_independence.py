"""Path independence of a DEQ: initial states and the asymptotic-alignment (AA) score.

Anil et al., "Path Independent Equilibrium Models Can Better Exploit Test-Time Computation",
NeurIPS 2022. A DEQ is path independent when the state it reaches does not depend on where the
solve starts. The AA score measures it: solve each input again, started from *another* input's
fixed point, and compare the state reached with the input's own fixed point by cosine
similarity (1: the same state, whatever the start).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jdeq import _validate as V
from jdeq._fixed_point import fixed_point
from jdeq._flatten import batch_layout
from jdeq._solvers import Anderson
from jdeq._stats import SolverStats

__all__ = ["AAScore", "aa_score", "initial_states"]

_KINDS = ("zeros", "normal", "mixed")


def initial_states(kind: str, like, key=None, *, scale: float = 1.0):
    """Starting states for a DEQ solve, shaped like ``like`` (a batched pytree).

    Args:
      kind: ``"zeros"``; ``"normal"`` (i.i.d. ``N(0, scale^2)`` entries); or ``"mixed"``
        (TorchDEQ's: the first half of the batch, ``ceil(batch / 2)`` examples, drawn normal,
        the rest zeros).
      like: a pytree of ``(batch, ...)`` floating arrays (or shape-dtype structs).
      key: a ``jax.random`` key, needed by ``"normal"`` and ``"mixed"``.
      scale: standard deviation of the normal draws.

    Returns:
      A pytree with the structure, shapes and dtypes of ``like``.

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> z0 = jdeq.initial_states("mixed", jnp.zeros((4, 3)), jax.random.key(0))
      >>> bool((z0[2:] == 0).all()) and bool((z0[:2] != 0).all())
      True
    """
    V.one_of(kind, "kind", _KINDS)
    leaves, treedef = jax.tree_util.tree_flatten(like)
    if kind == "zeros":
        return jax.tree_util.tree_unflatten(treedef, [jnp.zeros(x.shape, x.dtype) for x in leaves])
    if key is None:
        raise ValueError(f"`key` is needed for kind={kind!r} (a jax.random key).")
    V.key(key)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, x in zip(keys, leaves):
        draw = scale * jax.random.normal(k, x.shape, x.dtype)
        if kind == "mixed":
            n = x.shape[0]
            keep = (jnp.arange(n) < (n + 1) // 2).reshape((n,) + (1,) * (len(x.shape) - 1))
            draw = jnp.where(keep, draw, jnp.zeros_like(draw))
        out.append(draw)
    return jax.tree_util.tree_unflatten(treedef, out)


class AAScore(NamedTuple):
    """Result of :func:`aa_score`.

    Attributes:
      per_example: ``(batch,)`` cosine similarity of each example's re-solved state with its own
        fixed point.
      mean: the mean of ``per_example``.
      value: the re-solved states (the structure of ``z_star``).
      stats: the :class:`jdeq.SolverStats` of the re-solve.
      perm: ``(batch,)`` int, example ``i`` was started from ``z_star[perm[i]]``.
    """

    per_example: jax.Array
    mean: jax.Array
    value: Any
    stats: SolverStats
    perm: jax.Array


def aa_score(f, args, z_star, *, solver=Anderson(), key=None, maxiter=None, eps: float = 1e-12) -> AAScore:
    """Asymptotic-alignment score (Anil et al. 2022): path independence, per example.

    Re-solves ``z = f(z, args)`` for every example started from another example's fixed point
    (``z_star`` permuted over the batch), then takes the cosine similarity (over all the
    example's state entries) between the state reached and the example's own ``z_star``. A map
    with a unique attracting fixed point scores 1; a map whose state depends on the start
    (several attractors) scores less. No gradient flows through the score.

    Args:
      f: the cell, ``f(z, args) -> z`` on the batch (as in :func:`jdeq.fixed_point`).
      args: its arguments (input injection, parameters).
      z_star: the batched fixed points from the ordinary solve (batch >= 2).
      solver: the forward solver of the re-solve (use the model's own).
      key: ``None`` (default): start example ``i`` from example ``i + 1``'s fixed point (a
        cyclic shift, deterministic). A ``jax.random`` key: from a random permutation with no
        fixed points (a random cyclic shift of a random order).
      maxiter: run-time budget override of the re-solve.
      eps: added to the norms' product in the cosine.

    Returns:
      An :class:`jdeq.AAScore` (``per_example``, ``mean``, ``value``, ``stats``, ``perm``).

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> f = lambda z, x: 0.5 * jnp.tanh(z) + x
      >>> x = jnp.linspace(-1, 1, 12).reshape(4, 3)
      >>> z = jdeq.fixed_point(f, jnp.zeros((4, 3)), x).value
      >>> round(float(jdeq.aa_score(f, x, z).mean), 4)
      1.0

    Reference: Anil et al., "Path Independent Equilibrium Models Can Better Exploit Test-Time
    Computation", NeurIPS 2022.
    """
    layout = batch_layout(z_star, name="z_star")
    n = layout.batch
    if n < 2:
        raise ValueError(f"`z_star` needs a batch of at least 2 examples (one starts from another's), got {n}.")
    z_star = jax.lax.stop_gradient(z_star)
    if key is None:
        perm = (jnp.arange(n) + 1) % n
    else:
        k1, k2 = jax.random.split(key)
        order = jax.random.permutation(k1, n)
        shift = jax.random.randint(k2, (), 1, n)
        perm = jnp.zeros(n, jnp.int32).at[order].set(order[(jnp.arange(n) + shift) % n])
    z0 = jax.tree_util.tree_map(lambda x: x[perm], z_star)
    # no gradient flows (the start and args are cut off): fixed_point's gradient plays no part
    sol = fixed_point(f, z0, jax.lax.stop_gradient(args), solver=solver, maxiter=maxiter)
    a, b = layout.flatten(sol.value), layout.flatten(z_star)
    cos = jnp.sum(a * b, axis=1) / (jnp.linalg.norm(a, axis=1) * jnp.linalg.norm(b, axis=1) + eps)
    return AAScore(per_example=cos, mean=jnp.mean(cos), value=sol.value, stats=sol.stats, perm=perm)
