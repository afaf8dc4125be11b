"""Amortized warm starts across steps: the pure gather/scatter of a per-example fixed-point cache.

Huang, Bai & Kolter 2021, "(Implicit)^2: Implicit Layers for Implicit Representations"
(NeurIPS): when the same example comes back (an implicit representation fits the same
coordinates every epoch; any epoch-based training knows each example's index), start its
forward solve from the fixed point it reached the last time instead of from ``z0``. The
weights moved a little since, so the old ``z*`` is close to the new one and the solver needs
fewer evaluations of the cell.

This module holds the pure functions (arrays in, arrays out; no Flax): a cache is a pair
``(values, filled)`` with ``values`` a pytree whose leaves are ``(num_examples, ...)`` and
``filled`` a ``(num_examples,)`` bool mask. ``jdeq.nnx.FixedPointCache`` holds them as module
state and ``jdeq.nnx.DEQ(..., cache=...)`` calls them around its solve.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdeq._solvers import explicit_sharding, row_sharding

__all__ = ["check_index", "lookup", "store"]


def check_index(index, num_examples: int, batch: int) -> None:
    """Host-side checks of a batch of example indices (shape, dtype, and range when concrete).

    Raises:
      TypeError: ``index`` is not an integer array.
      ValueError: it is not ``(batch,)``, or (when its values are known) out of
        ``[0, num_examples)``.
    """
    dtype = jnp.result_type(index)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"`index` must be an integer array of example indices, got dtype {dtype}.")
    shape = jnp.shape(index)
    if len(shape) != 1 or shape[0] != batch:
        raise ValueError(f"`index` must have shape ({batch},) (one example index per row of the batch), got {shape}.")
    if not isinstance(index, jax.core.Tracer):
        values = np.asarray(index)
        if values.size and (values.min() < 0 or values.max() >= num_examples):
            raise ValueError(
                f"`index` holds indices in [{values.min()}, {values.max()}], outside [0, {num_examples}) "
                f"(the warm-start cache holds {num_examples} examples: build it with the size of the training set)."
            )


def _gather(table, index):
    """``table[index]``; under Explicit axes laid out like ``index`` (a replicated table gathered by
    sharded indices is otherwise an ambiguous sharding)."""
    return table.at[index].get(out_sharding=row_sharding(index))  # None: jax's default layout


def _scatter(table, index, rows):
    """``table.at[index].set(rows)``; under Explicit axes the result keeps ``table``'s layout."""
    return table.at[index].set(rows, out_sharding=explicit_sharding(table))  # None: jax's default layout


def lookup(values: Any, filled: jax.Array, index: jax.Array, default: Any) -> Any:
    """The starting states of a batch: each example's cached ``z*`` where it has one, else its
    ``default`` (no gradient flows through the result).

    Args:
      values: the cache, leaves ``(num_examples, ...)``.
      filled: ``(num_examples,)`` bool, which rows hold a fixed point.
      index: ``(batch,)`` int, the examples of the batch.
      default: the starting states without a cache (leaves ``(batch, ...)``, same tree as
        ``values``).

    Returns:
      A pytree like ``default``.

    Example:
      >>> import jax.numpy as jnp
      >>> z = lookup(jnp.arange(6.0).reshape(3, 2), jnp.array([True, False, True]),
      ...            jnp.array([2, 1]), jnp.zeros((2, 2)))
      >>> z.tolist()
      [[4.0, 5.0], [0.0, 0.0]]
    """
    hit = _gather(filled, index)

    def one(cached, start):
        row = _gather(cached, index).astype(start.dtype)
        return jax.lax.stop_gradient(jnp.where(hit.reshape((-1,) + (1,) * (start.ndim - 1)), row, start))

    return jax.tree.map(one, values, default)


def store(values: Any, filled: jax.Array, index: jax.Array, z: Any, ok: jax.Array | None = None) -> tuple[Any, jax.Array]:
    """The cache after writing a batch's fixed points ``z`` at ``index`` (rows with ``ok``
    False keep what they held; the indices of one batch must be distinct).

    Args:
      values, filled: the cache (see :func:`lookup`).
      index: ``(batch,)`` int.
      z: the batch's fixed points (leaves ``(batch, ...)``), taken through ``stop_gradient``.
      ok: ``(batch,)`` bool, which rows to write (default all), e.g. the finite ones.

    Returns:
      ``(values, filled)`` updated.

    Example:
      >>> import jax.numpy as jnp
      >>> v, f = store(jnp.zeros((3, 2)), jnp.zeros(3, bool), jnp.array([2, 0]), jnp.ones((2, 2)),
      ...              jnp.array([True, False]))
      >>> v.tolist(), f.tolist()
      ([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]], [False, False, True])
    """
    ok = jnp.ones(jnp.shape(index), bool) if ok is None else ok

    def one(cached, new):
        new = jax.lax.stop_gradient(new).astype(cached.dtype)
        old = _gather(cached, index)
        return _scatter(cached, index, jnp.where(ok.reshape((-1,) + (1,) * (new.ndim - 1)), new, old))

    values = jax.tree.map(one, values, z)
    return values, _scatter(filled, index, _gather(filled, index) | ok)
