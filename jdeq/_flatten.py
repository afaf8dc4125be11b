"""Batch-preserving flattening of pytree states to one ``(batch, dim)`` matrix.

Solvers work on a single matrix whose row ``b`` holds every entry of example ``b``; these helpers
move between that matrix and the user's pytree. All leaves share the leading batch axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["BatchLayout", "batch_layout"]


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How a pytree of ``(batch, ...)`` leaves maps to a ``(batch, dim)`` matrix."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    batch: int
    dtype: Any  # common dtype of the flat matrix

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s[1:]) for s in self.shapes)

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def flatten(self, tree) -> jax.Array:
        leaves = jax.tree_util.tree_leaves(tree)
        mats = [jnp.reshape(x, (self.batch, -1)).astype(self.dtype) for x in leaves]
        return jnp.concatenate(mats, axis=1)  # (one leaf: jnp returns it as is, no copy op)

    def unflatten(self, mat: jax.Array):
        leaves, start = [], 0
        for shape, dtype, size in zip(self.shapes, self.dtypes, self.sizes):
            leaves.append(mat[:, start : start + size].reshape(shape).astype(dtype))
            start += size
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def wrap(self, f: Callable, args) -> Callable[[jax.Array], jax.Array]:
        """``f(z, args)`` on pytrees as a function of the flat matrix."""
        return lambda zmat: self.flatten(f(self.unflatten(zmat), args))


def batch_layout(tree, *, name: str = "z0") -> BatchLayout:
    """Checks that ``tree`` is a floating-point pytree with a shared batch axis; returns its layout.

    Raises:
      TypeError: a leaf is not floating point.
      ValueError: no leaves, a leaf without a leading axis, leading axes that differ, a batch of
        size 0, or examples with no entries.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves:
        raise ValueError(f"`{name}` has no array leaves.")
    shapes, dtypes = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        where = jax.tree_util.keystr(path) or "<root>"
        try:
            dtype = jnp.result_type(leaf)
        except TypeError:
            raise TypeError(
                f"`{name}` must be a pytree of arrays; leaf {where} is a {type(leaf).__name__}: {leaf!r}."
            ) from None
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"`{name}` must be floating point; leaf {where} has dtype {dtype}. "
                "Cast it (e.g. `z0.astype(jnp.float32)`)."
            )
        shape = tuple(jnp.shape(leaf))
        if len(shape) < 1:
            raise ValueError(
                f"`{name}` needs a leading batch axis on every leaf; leaf {where} is a scalar. "
                "To solve one problem, give it a leading axis of 1."
            )
        shapes.append(shape)
        dtypes.append(dtype)
    batches = {s[0] for s in shapes}
    if len(batches) != 1:
        raise ValueError(
            f"every leaf of `{name}` needs the same leading batch axis; got leading sizes "
            f"{[s[0] for s in shapes]}."
        )
    if shapes[0][0] == 0:
        raise ValueError(f"`{name}` has batch size 0 (leading axis of shape {shapes[0]}): nothing to solve.")
    if all(math.prod(s[1:]) == 0 for s in shapes):
        raise ValueError(
            f"`{name}` has no entries per example (leaf shapes {shapes}): the state of an example "
            "must hold at least one number."
        )
    return BatchLayout(treedef, tuple(shapes), tuple(dtypes), shapes[0][0], jnp.result_type(*dtypes))
