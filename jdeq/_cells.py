"""Shared helper of the Flax adapters: the starting state of a cell."""

from __future__ import annotations

__all__ = ["initial_state"]


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
