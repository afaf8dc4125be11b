"""Flax Linen adapters: ``jdeq.linen.DEQ`` and ``jdeq.linen.Unrolled``.

The cell's variables are created by one ordinary call at initialization; afterwards the cell is
unbound and its variables passed to the core as explicit arguments (never by closure).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from jdeq._cells import initial_state
from jdeq._fixed_point import fixed_point, unroll
from jdeq._gradients import Implicit
from jdeq._solvers import Anderson

__all__ = ["DEQ", "Unrolled"]


def _pure(module: nn.Module, x, z0):
    """``(z0, f, variables)`` for the bound submodule ``module`` (a ``cell(z, x)``)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"`cell` must be a flax.linen.Module called as cell(z, x), got {module!r}.")
    z0 = initial_state(module, x, z0)
    if module.is_initializing():
        module(z0, x)  # create the cell's variables in its own scope
    cell, variables = module.unbind()
    return z0, (lambda z, args: cell.apply(args[0], z, args[1])), variables


class DEQ(nn.Module):
    """A deep equilibrium layer (Linen): returns ``z* = cell(z*, x)`` and the solver's stats.

    Attributes:
      cell: a Linen module called as ``cell(z, x)``, with ``init_z(x)`` when ``z0`` is None.
        Its variables must not be mutated by the call (no BatchNorm statistics).
      solver: a jdeq solver (default ``jdeq.Anderson()``).
      gradient: a jdeq gradient mode (default ``jdeq.Implicit()``).
      throw: raise at run time when a solve does not converge.

    Call: ``z_star, stats = deq.apply(variables, x, z0=None, maxiter=None)``.

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> deq = jdeq.linen.DEQ(jdeq.models.linen.MLPCell(features=16))
      >>> variables = deq.init(jax.random.PRNGKey(0), jnp.ones((4, 3)))
      >>> z, stats = deq.apply(variables, jnp.ones((4, 3)))
    """

    cell: nn.Module
    solver: Any = Anderson()
    gradient: Any = Implicit()
    throw: bool = False

    @nn.compact
    def __call__(self, x, z0=None, *, maxiter=None):
        z0, f, variables = _pure(self.cell, x, z0)
        sol = fixed_point(
            f, z0, (variables, x), solver=self.solver, gradient=self.gradient, maxiter=maxiter, throw=self.throw
        )
        return sol.value, sol.stats


class Unrolled(nn.Module):
    """The explicit weight-tied baseline (Linen): ``depth`` applications of the same cell.

    Attributes:
      cell: a Linen module called as ``cell(z, x)``.
      depth: number of layers.
      remat: recompute each layer in the backward pass.

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> net = jdeq.linen.Unrolled(jdeq.models.linen.MLPCell(features=16), depth=8)
      >>> variables = net.init(jax.random.PRNGKey(0), jnp.ones((4, 3)))
    """

    cell: nn.Module
    depth: int = 1
    remat: bool = False

    @nn.compact
    def __call__(self, x, z0=None):
        z0, f, variables = _pure(self.cell, x, z0)
        sol = unroll(f, z0, (variables, x), depth=self.depth, remat=self.remat)
        return sol.value, sol.stats
