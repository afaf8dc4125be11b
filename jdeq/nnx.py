"""Flax NNX adapters: ``jdeq.nnx.DEQ`` and ``jdeq.nnx.Unrolled``.

They only turn the cell (an ``nnx.Module`` called as ``cell(z, x)``) into a pure function
``f(z, (state, x))`` whose parameters travel as explicit arguments, then call the core.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jdeq._cells import initial_state
from jdeq._fixed_point import check_depth, check_options, fixed_point, unroll
from jdeq._gradients import Implicit
from jdeq._regularizers import jacobian_penalty
from jdeq._solvers import Anderson

__all__ = ["DEQ", "Unrolled"]


def _check_cell(cell) -> None:
    if not isinstance(cell, nnx.Module):
        raise TypeError(f"`cell` must be an nnx.Module called as cell(z, x), got {cell!r}.")


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

    Attributes:
      recorder: None, or a callable ``recorder(x, z_star)`` invoked after every solve (static:
        set it on a traced copy of the model). ``jdeq.train.fit(..., jac_reg=...)`` uses it to
        collect the equilibria it regularizes with :meth:`jacobian_penalty`.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> cell = jdeq.models.MLPCell(3, 16, rngs=nnx.Rngs(0))
      >>> deq = jdeq.nnx.DEQ(cell, solver=jdeq.Anderson(tol=1e-5))
      >>> z, stats = deq(jnp.ones((4, 3)))
    """

    def __init__(self, cell: nnx.Module, *, solver=Anderson(), gradient=Implicit(), throw: bool = False):
        _check_cell(cell)
        check_options(solver, gradient, throw)
        self.cell = cell
        self.solver = solver
        self.gradient = gradient
        self.throw = throw
        self.recorder = None

    def __call__(self, x, z0=None, *, maxiter=None) -> tuple[Any, Any]:
        z0 = initial_state(self.cell, x, z0)
        f, state = _pure(self.cell)
        sol = fixed_point(
            f, z0, (state, x), solver=self.solver, gradient=self.gradient, maxiter=maxiter, throw=self.throw
        )
        if self.recorder is not None:
            self.recorder(x, sol.value)
        return sol.value, sol.stats

    def jacobian_penalty(
        self, x, z_star, key, *, gamma: float, prob: float = 1.0, num_samples: int = 1, noise: str = "normal"
    ) -> jax.Array:
        """``gamma * mean_b ||d cell(z, x)/dz||_F^2 / dim`` at ``z_star`` (Bai et al. 2021).

        Calls ``jdeq.jacobian_penalty`` on this cell's pure function; ``z_star`` is taken
        through ``stop_gradient`` (the gradient reaches the cell's parameters and ``x``, not the
        solver).

        Args:
          x: the cell's input (as passed to the DEQ).
          z_star: the equilibrium returned by the DEQ for ``x``.
          key: PRNG key (coin flip and Hutchinson probes).
          gamma, prob, num_samples, noise: as in ``jdeq.jacobian_penalty``.

        Returns:
          A scalar to add to the loss.

        Example:
          >>> import jax, jax.numpy as jnp, jdeq
          >>> from flax import nnx
          >>> deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(3, 16, rngs=nnx.Rngs(0)))
          >>> x = jnp.ones((4, 3))
          >>> z, _ = deq(x)
          >>> reg = deq.jacobian_penalty(x, z, jax.random.key(0), gamma=0.1)
        """
        f, state = _pure(self.cell)
        return jacobian_penalty(
            f, jax.lax.stop_gradient(z_star), (state, x), key,
            gamma=gamma, prob=prob, num_samples=num_samples, noise=noise,
        )


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
        _check_cell(cell)
        check_depth(depth)
        self.cell = cell
        self.depth = depth
        self.remat = remat

    def __call__(self, x, z0=None) -> tuple[Any, Any]:
        z0 = initial_state(self.cell, x, z0)
        f, state = _pure(self.cell)
        sol = unroll(f, z0, (state, x), depth=self.depth, remat=self.remat)
        return sol.value, sol.stats
