"""Flax NNX adapters: ``jdeq.nnx.DEQ`` and ``jdeq.nnx.Unrolled``.

They only turn the cell (an ``nnx.Module`` called as ``cell(z, x)``) into a pure function
``f(z, (state, x))`` whose parameters travel as explicit arguments, then call the core.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from jdeq._cells import initial_state
from jdeq._fixed_point import fixed_point, unroll
from jdeq._gradients import Implicit
from jdeq._solvers import Anderson

__all__ = ["DEQ", "Unrolled"]


def _pure(cell: nnx.Module):
    """``(f, state)`` with ``f(z, (state, x)) == cell(z, x)``; the state is an explicit argument."""
    graphdef, state = nnx.split(cell)

    def f(z, args):
        state, x = args
        return nnx.merge(graphdef, state)(z, x)

    return f, state


class DEQ(nnx.Module):
    """A deep equilibrium layer: returns ``z* = cell(z*, x)`` and the solver's stats.

    The cell is stateless inside the solve: normalization must not keep running statistics
    (use ``nnx.LayerNorm``/``nnx.GroupNorm``) and dropout masks must be drawn once outside the
    loop and passed in through ``x``.

    Args:
      cell: an ``nnx.Module`` called as ``cell(z, x)``; with ``init_z(x)`` when ``z0`` is None.
      solver: a jdeq solver (default ``jdeq.Anderson()``).
      gradient: a jdeq gradient mode (default ``jdeq.Implicit()``).
      throw: raise at run time when a solve does not converge (see ``jdeq.fixed_point``).

    Call: ``z_star, stats = deq(x, z0=None, *, maxiter=None)``; ``maxiter`` overrides the
    solver's budget at run time (a traced int: train and eval budgets without recompiling).

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> cell = jdeq.models.MLPCell(3, 16, rngs=nnx.Rngs(0))
      >>> deq = jdeq.nnx.DEQ(cell, solver=jdeq.Anderson(tol=1e-5))
      >>> z, stats = deq(jnp.ones((4, 3)))
    """

    def __init__(self, cell: nnx.Module, *, solver=Anderson(), gradient=Implicit(), throw: bool = False):
        self.cell = cell
        self.solver = solver
        self.gradient = gradient
        self.throw = throw

    def __call__(self, x, z0=None, *, maxiter=None) -> tuple[Any, Any]:
        z0 = initial_state(self.cell, x, z0)
        f, state = _pure(self.cell)
        sol = fixed_point(
            f, z0, (state, x), solver=self.solver, gradient=self.gradient, maxiter=maxiter, throw=self.throw
        )
        return sol.value, sol.stats


class Unrolled(nnx.Module):
    """The explicit weight-tied baseline: ``depth`` applications of the same cell.

    Same call signature and stats type as :class:`DEQ` (see ``jdeq.unroll`` for the stats), so
    a benchmark swaps one for the other and changes nothing else.

    Args:
      cell: an ``nnx.Module`` called as ``cell(z, x)``.
      depth: number of layers (static).
      remat: recompute each layer in the backward pass instead of storing its activations.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> net = jdeq.nnx.Unrolled(jdeq.models.MLPCell(3, 16, rngs=nnx.Rngs(0)), depth=8)
      >>> z, stats = net(jnp.ones((4, 3)))
    """

    def __init__(self, cell: nnx.Module, *, depth: int, remat: bool = False):
        self.cell = cell
        self.depth = depth
        self.remat = remat

    def __call__(self, x, z0=None) -> tuple[Any, Any]:
        z0 = initial_state(self.cell, x, z0)
        f, state = _pure(self.cell)
        sol = unroll(f, z0, (state, x), depth=self.depth, remat=self.remat)
        return sol.value, sol.stats
