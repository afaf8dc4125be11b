"""Shared helpers of the Flax adapters: the starting state of a cell, per-call options, and the
non-finite input guard."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jdeq._stats import Solution

__all__ = ["guard_nonfinite_inputs", "initial_state", "mask_bad_examples"]


def initial_state(cell, x, z0):
    """``z0`` if given, else ``cell.init_z(x)``; a clear error if the cell has no ``init_z``."""
    if z0 is not None:
        return z0
    init_z = getattr(cell, "init_z", None)
    if not callable(init_z):
        raise TypeError(
            f"`z0` is None and the cell {type(cell).__name__} has no `init_z(x)` method: pass "
            "`z0` explicitly or give the cell an `init_z(x)` that returns the starting state."
        )
    return init_z(x)


def _rows_bad(leaf, batch: int | None) -> jax.Array | None:
    """Per-example ``~all(isfinite)`` of one input leaf (None for leaves that do not count)."""
    if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.inexact):
        return None
    if batch is None:  # one example
        return ~jnp.all(jnp.isfinite(leaf))
    if jnp.ndim(leaf) < 1 or leaf.shape[0] != batch or leaf.size == 0:
        return None  # (an empty batch is left for fixed_point's own error; rows of no entry count as finite)
    return ~jnp.all(jnp.isfinite(leaf.reshape(batch, -1)), axis=1)


def guard_nonfinite_inputs(x, batch: int | None):
    """``(x_safe, bad)``: ``bad`` flags the examples whose input ``x`` holds NaN/inf (``(batch,)``,
    or a scalar for one example with ``batch=None`` or when no leaf is floating point) and
    ``x_safe`` has those examples' entries
    set to 0, so that no derivative of the cell is ever evaluated at a non-finite input.

    Why: a zero cotangent is not enough in reverse mode. The VJP of a batched cell with respect
    to shared weights sums over examples, and one example's ``0 * NaN`` partial derivative makes
    the whole sum NaN. Only leaves with the batch as leading axis (floating point) are examined.
    """
    flags = [b for b in (_rows_bad(leaf, batch) for leaf in jax.tree_util.tree_leaves(x)) if b is not None]
    if not flags:  # nothing can hold NaN (e.g. token ids): a scalar False, broadcast by its users
        return x, jnp.asarray(False)
    bad = flags[0]
    for b in flags[1:]:
        bad = bad | b

    def clean(leaf):
        if _rows_bad(leaf, batch) is None:
            return leaf
        mask = bad if batch is None else bad.reshape((batch,) + (1,) * (leaf.ndim - 1))
        return jnp.where(mask, jnp.zeros_like(leaf), leaf)

    return jax.tree_util.tree_map(clean, x), bad


def mask_bad_examples(sol: Solution, z0, bad) -> Solution:
    """The solution with the examples flagged in ``bad`` (non-finite input) reported as what an
    unguarded solve gives them: the value is ``z0`` (no finite iterate), with no gradient;
    ``nonfinite`` is True, ``converged`` False, the residuals NaN and ``nsteps`` 1."""
    def pick(new, old):
        mask = jnp.reshape(bad, jnp.shape(bad) + (1,) * (jnp.ndim(new) - jnp.ndim(bad)))
        return jnp.where(mask, old, new)

    # z0 has the solution's dtypes: fixed_point refuses a cell that changes a leaf's dtype
    value = jax.tree_util.tree_map(lambda v, z: pick(v, jax.lax.stop_gradient(z)), sol.value, z0)
    st = sol.stats
    stats = dataclasses.replace(
        st,
        nsteps=jnp.where(bad, 1, st.nsteps),
        abs_residual=jnp.where(bad, jnp.nan, st.abs_residual),
        rel_residual=jnp.where(bad, jnp.nan, st.rel_residual),
        converged=st.converged & ~bad,
        nonfinite=st.nonfinite | bad,
    )
    return Solution(value=value, stats=stats)
