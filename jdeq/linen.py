"""Flax Linen adapters: ``jdeq.linen.DEQ`` and ``jdeq.linen.Unrolled``.

The cell's variables are created by one ordinary call at initialization; afterwards the cell is
unbound and its variables passed to the core as explicit arguments (never by closure).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jdeq._cells import guard_nonfinite_inputs, initial_state, mask_bad_examples
from jdeq import _validate as V
from jdeq._fixed_point import check_options, fixed_point, unroll
from jdeq._gradients import Implicit
from jdeq._regularizers import jacobian_penalty
from jdeq._solvers import Anderson

__all__ = ["DEQ", "Unrolled"]


def _pure(module: nn.Module, x, z0):
    """``(z0, f, variables)`` for the bound submodule ``module`` (a ``cell(z, x)``)."""
    V.instance(module, "cell", nn.Module, "a flax.linen.Module called as cell(z, x)")
    z0 = initial_state(module, x, z0)
    if module.is_initializing():
        module(z0, x)  # create the cell's variables in its own scope
    cell, variables = module.unbind()
    return z0, (lambda z, args: cell.apply(args[0], z, args[1])), variables


def _config(module: nn.Module, name: str, config):
    """``config`` with its arrays (e.g. a learned solver's weights) held as the Linen params
    ``name`` of ``module`` (trainable by ``jdeq.hyper_loss`` or through ``jdeq.Unrolled()``; the
    fixed-point gradients give them zero); built-in configs have none."""
    leaves, treedef = jax.tree_util.tree_flatten(config)
    if not leaves:
        return config
    return jax.tree_util.tree_unflatten(treedef, module.param(name, lambda _: leaves))


class DEQ(nn.Module):
    """A deep equilibrium layer (Linen): returns ``z* = cell(z*, x)`` and the solver's stats.

    Attributes:
      cell: a Linen module called as ``cell(z, x)``, with ``init_z(x)`` when ``z0`` is None.
        Its variables must not be mutated by the call (no BatchNorm statistics).
      solver: a :class:`jdeq.Solver` (default ``jdeq.Anderson()``); its arrays (a learned
        solver's weights) become the params ``"solver"`` of this layer.
      gradient: a :class:`jdeq.Gradient` (default ``jdeq.Implicit()``); arrays: ``"gradient"``.
      throw: raise at run time when a solve does not converge.
      batched: inputs carry a leading batch axis (default); False: one example per call (for
        ``jax.vmap``/``nn.vmap`` of per-example code, see ``jdeq.fixed_point``).

    Call: ``z_star, stats = deq.apply(variables, x, z0=None, *, maxiter=None, solver=None,
    gradient=None, throw=None, batched=None)``; the keywords override the attributes for this
    call (a call-time ``solver``/``gradient`` is used as given, arrays included). When the
    ``"intermediates"`` collection is mutable, each call sows ``(x, z*)`` as ``"equilibria"``
    (for :meth:`jacobian_penalty`). An example whose ``x`` holds NaN/inf is reported non-finite
    with value ``z0`` and a zero gradient (see ``jdeq.nnx.DEQ``).

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> deq = jdeq.linen.DEQ(jdeq.models.linen.MLPCell(features=16))
      >>> variables = deq.init(jax.random.PRNGKey(0), jnp.ones((4, 3)))
      >>> z, stats = deq.apply(variables, jnp.ones((4, 3)))
      >>> z8, _ = deq.apply(variables, jnp.ones((4, 3)), maxiter=8)
    """

    cell: nn.Module
    solver: Any = Anderson()
    gradient: Any = Implicit()
    throw: bool = False
    batched: bool = True

    @nn.compact
    def __call__(self, x, z0=None, *, maxiter=None, solver=None, gradient=None, throw=None, batched=None):
        check_options(self.solver, self.gradient, self.throw, self.batched)
        own_solver = _config(self, "solver", self.solver)
        own_gradient = _config(self, "gradient", self.gradient)
        solver = own_solver if solver is None else solver
        gradient = own_gradient if gradient is None else gradient
        throw = self.throw if throw is None else throw
        batched = self.batched if batched is None else batched
        check_options(solver, gradient, throw, batched)
        z0, f, variables = _pure(self.cell, x, z0)
        batch = jax.tree_util.tree_leaves(z0)[0].shape[0] if batched else None
        x_safe, bad = guard_nonfinite_inputs(x, batch)
        sol = fixed_point(
            f, z0, (variables, x_safe), solver=solver, gradient=gradient, maxiter=maxiter,
            throw=throw, batched=batched,
        )
        sol = mask_bad_examples(sol, z0, bad)
        self.sow("intermediates", "equilibria", (x_safe, sol.value))
        return sol.value, sol.stats

    def jacobian_penalty(
        self, x, z_star, key, *, gamma: float, prob: float = 1.0, num_samples: int = 1, noise: str = "normal"
    ):
        """``gamma * mean_b ||d cell(z, x)/dz||_F^2 / dim`` at ``stop_gradient(z_star)``
        (Bai et al. 2021); call it as a method of the bound layer.

        Args:
          x, z_star: an input and its equilibrium (e.g. from the sown ``"equilibria"``).
          key: PRNG key; gamma, prob, num_samples, noise: as in ``jdeq.jacobian_penalty``.

        Returns:
          A scalar to add to the loss.

        Example:
          >>> import jax, jax.numpy as jnp, jdeq
          >>> deq = jdeq.linen.DEQ(jdeq.models.linen.MLPCell(features=16))
          >>> x = jnp.ones((4, 3))
          >>> variables = deq.init(jax.random.PRNGKey(0), x)
          >>> z, _ = deq.apply(variables, x)
          >>> reg = deq.apply(variables, x, z, jax.random.key(0), gamma=0.1,
          ...                 method=jdeq.linen.DEQ.jacobian_penalty)
        """
        z0, f, variables = _pure(self.cell, x, z_star)
        return jacobian_penalty(
            f, jax.lax.stop_gradient(z_star), (variables, x), key,
            gamma=gamma, prob=prob, num_samples=num_samples, noise=noise,
        )


class Unrolled(nn.Module):
    """The explicit weight-tied baseline (Linen): ``depth`` applications of the same cell.

    Attributes:
      cell: a Linen module called as ``cell(z, x)``.
      depth: number of layers.
      remat: recompute each layer in the backward pass.

    Call: ``net.apply(variables, x, z0=None, *, depth=None, remat=None)`` (per-call
    overrides, static).

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> net = jdeq.linen.Unrolled(jdeq.models.linen.MLPCell(features=16), depth=8)
      >>> variables = net.init(jax.random.PRNGKey(0), jnp.ones((4, 3)))
      >>> z12, stats = net.apply(variables, jnp.ones((4, 3)), depth=12)
    """

    cell: nn.Module
    depth: int = 1
    remat: bool = False

    @nn.compact
    def __call__(self, x, z0=None, *, depth=None, remat=None):
        depth = self.depth if depth is None else depth
        remat = self.remat if remat is None else remat
        V.positive_int(depth, "depth")
        z0, f, variables = _pure(self.cell, x, z0)
        sol = unroll(f, z0, (variables, x), depth=depth, remat=remat)
        return sol.value, sol.stats
