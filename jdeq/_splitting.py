"""Operator splitting for monotone DEQs: forward-backward and Peaceman-Rachford, run by jdeq.

A monotone DEQ (Winston & Kolter 2020) is ``z = prox(W z + c)`` where ``prox`` is the proximal
operator of a convex function ``g`` (ReLU is the prox of the indicator of the nonnegative
orthant) and ``I - W`` is *strongly monotone*: ``<(I - W) v, v> >= m ||v||^2``. Then the fixed
point exists, is unique, and is the zero of the sum of two monotone operators
``0 in F(z) + dg(z)`` with ``F(z) = (I - W) z - c``. Splitting methods find it with a
guaranteed linear rate:

- :class:`ForwardBackward`: ``z <- prox_{a g}((1 - a) z + a (W z + c))``; a contraction of
  factor ``sqrt(1 - 2 a m + a^2 L^2)`` (``L >= ||I - W||_2``), so for any ``0 < a < 2m / L^2``.
  Default ``a = m / L^2`` (factor ``sqrt(1 - m^2 / L^2)``).
- :class:`PeacemanRachford`: on ``u``, ``x = prox_{a g}(u)``, ``y = J_{aF}(2x - u)``,
  ``u <- u + 2 (y - x)``, and ``z = prox_{a g}(u)``. ``J_{aF}(v) = ((1 + a) I - a W)^{-1}
  (v + a c)`` needs a linear solve (a ``resolvent`` from the problem). The reflected resolvent of
  an ``m``-strongly monotone, ``L``-Lipschitz ``F`` is a contraction of factor
  ``sqrt(1 - 4 a m / (1 + a L)^2)`` and the reflected prox is nonexpansive, so the iteration
  contracts for *every* ``a > 0``; default ``a = 1 / L`` (factor ``sqrt(1 - m / L)``).
  ``jdeq.FixedPointIteration(damping=0.5)`` on it is Douglas-Rachford.

How it plugs into jdeq (the only core addition): :func:`monotone_fixed_point` builds the
splitting operator ``T`` as an ordinary function ``T(state, args)`` and hands it to
:func:`jdeq.fixed_point`. So the splitting runs in jdeq's shared per-example loop (per-example
residuals, freezing, lowest-residual iterate, stats, ``throw``, run-time ``maxiter``), can be
accelerated by any jdeq solver (``FixedPointIteration()`` is the plain, guaranteed splitting;
``Anderson()`` accelerates it), and every jdeq gradient mode applies unchanged. ``T`` has the
same fixed point as the cell and the implicit-function-theorem derivative of that fixed point
does not depend on which map defines it, so ``Implicit()`` gives the exact gradient of ``z*``;
its backward linear solve inherits the contraction of ``T`` (``||J_T|| < 1``), so it converges
too.

Reference: Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020; Giselsson &
Boyd, "Linear convergence and metric selection for Douglas-Rachford splitting and ADMM", IEEE
TAC 2017 (the contraction factors).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jdeq import _validate as V
from jdeq._fixed_point import fixed_point
from jdeq._gradients import Implicit
from jdeq._solvers import FixedPointIteration, Solver
from jdeq._stats import Solution

__all__ = [
    "ForwardBackward",
    "MonotoneProblem",
    "PeacemanRachford",
    "monotone_fixed_point",
    "relu_prox",
]

_tm = jax.tree_util.tree_map


def relu_prox(v, alpha):
    """ReLU: the proximal operator of the indicator of ``{z >= 0}`` (the same for every step
    ``alpha``, which is why it suits splitting with any step)."""
    del alpha
    return _tm(jax.nn.relu, v)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MonotoneProblem:
    """The structure a splitting solver needs of a monotone cell ``z = prox(W z + c)``.

    All callables are pure functions of their arguments (the parameters travel in ``args``).

    Args:
      linear: ``linear(z, args) -> W z``, linear in ``z`` (pytree in, same pytree out), acting on
        each example of the batch separately.
      monotonicity: ``m > 0`` such that ``<(I - W) v, v> >= m ||v||^2`` for every ``v`` (per
        example). The cell's parametrization must guarantee it.
      lipschitz: ``lipschitz(args) -> L``, an *upper bound* of ``||I - W||_2`` (a scalar); used
        for the default step sizes. Optional when every step size is given explicitly.
      resolvent: ``(setup, apply)`` for Peaceman-Rachford: ``aux = setup(alpha, args)`` runs
        once per solve (e.g. a matrix inverse), ``apply(v, aux)`` returns
        ``((1 + alpha) I - alpha W)^{-1} v`` for a batch ``v``.
      prox: ``prox(v, alpha)``, the proximal operator of ``alpha * g`` (default ReLU).

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> W = 0.5 * jnp.eye(3)   # I - W = 0.5 I: m = L = 0.5
      >>> problem = jdeq.MonotoneProblem(linear=lambda z, w: z @ w.T, monotonicity=0.5,
      ...                                lipschitz=lambda w: 0.5)
      >>> sol = jdeq.monotone_fixed_point(problem, jnp.ones((2, 3)), jnp.zeros((2, 3)), W)
    """

    linear: Callable[[Any, Any], Any]
    monotonicity: float
    lipschitz: Callable[[Any], Any] | None = None
    resolvent: tuple[Callable, Callable] | None = None
    prox: Callable[[Any, Any], Any] = relu_prox

    def __post_init__(self):
        V.callable_(self.linear, "linear", usage="linear(z, args)")
        V.positive_number(self.monotonicity, "monotonicity")
        V.callable_(self.lipschitz, "lipschitz", usage="lipschitz(args)", none=True)
        r = self.resolvent
        if r is not None and not (isinstance(r, tuple) and len(r) == 2 and all(map(callable, r))):
            raise TypeError(f"`resolvent` must be None or a pair (setup, apply) of callables, got {r!r}.")
        V.callable_(self.prox, "prox", usage="prox(v, alpha)")


def _need_lipschitz(problem: MonotoneProblem, name: str):
    if problem.lipschitz is None:
        raise ValueError(
            f"{name}(alpha=None) picks its step from the problem's Lipschitz bound, but the "
            "problem has `lipschitz=None`: give `alpha` or the problem's `lipschitz`."
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ForwardBackward:
    """Forward-backward splitting ``z <- prox_{a g}((1 - a) z + a (W z + c))``.

    Args:
      alpha: step ``a``. ``None`` (default): ``m / L^2`` from the problem's monotonicity ``m``
        and Lipschitz bound ``L`` (computed per solve), the step with the best guaranteed
        contraction ``sqrt(1 - m^2 / L^2)``. A fixed ``a`` contracts iff ``a < 2 m / L^2``.

    Example:
      >>> import jdeq
      >>> fb = jdeq.ForwardBackward()            # guaranteed step m / L^2
      >>> fb_fast = jdeq.ForwardBackward(alpha=0.2)

    Reference: Winston & Kolter, NeurIPS 2020 (Algorithm 1).
    """

    alpha: float | None = None

    def __post_init__(self):
        V.positive_number(self.alpha, "alpha", none=True)

    def step(self, problem: MonotoneProblem, args):
        """The step ``a`` (a Python float or a stop-gradient scalar)."""
        if self.alpha is not None:
            return self.alpha
        _need_lipschitz(problem, "ForwardBackward")
        lip = jax.lax.stop_gradient(jnp.asarray(problem.lipschitz(args)))
        return problem.monotonicity / lip**2

    def contraction(self, problem: MonotoneProblem, alpha, lipschitz):
        """The guaranteed contraction factor ``sqrt(max(0, 1 - 2 a m + a^2 L^2))``."""
        m = problem.monotonicity
        return jnp.sqrt(jnp.maximum(0.0, 1.0 - 2.0 * alpha * m + (alpha * lipschitz) ** 2))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeacemanRachford:
    """Peaceman-Rachford splitting on ``u``: ``u <- u + 2 (J_{aF}(2 prox(u) - u) - prox(u))``,
    ``z = prox(u)``. Needs the problem's ``resolvent``.

    Args:
      alpha: step ``a > 0`` (every step contracts). ``None`` (default): ``1 / L`` from the
        problem's Lipschitz bound, giving the factor ``sqrt(1 - m / L)``.

    Example:
      >>> import jdeq
      >>> pr = jdeq.PeacemanRachford(alpha=1.0)
      >>> dr = jdeq.FixedPointIteration(damping=0.5)   # as solver: Douglas-Rachford

    Reference: Winston & Kolter, NeurIPS 2020 (Algorithm 2); Peaceman & Rachford 1955.
    """

    alpha: float | None = None

    def __post_init__(self):
        V.positive_number(self.alpha, "alpha", none=True)

    def step(self, problem: MonotoneProblem, args):
        """The step ``a`` (a Python float or a stop-gradient scalar)."""
        if self.alpha is not None:
            return self.alpha
        _need_lipschitz(problem, "PeacemanRachford")
        lip = jax.lax.stop_gradient(jnp.asarray(problem.lipschitz(args)))
        return 1.0 / lip

    def contraction(self, problem: MonotoneProblem, alpha, lipschitz):
        """The guaranteed contraction factor ``sqrt(1 - 4 a m / (1 + a L)^2)``."""
        m = problem.monotonicity
        return jnp.sqrt(jnp.maximum(0.0, 1.0 - 4.0 * alpha * m / (1.0 + alpha * lipschitz) ** 2))


_SPLITTINGS = (ForwardBackward, PeacemanRachford)


def _forward_backward(problem: MonotoneProblem):
    def T(z, packed):
        args, bias, alpha = packed
        wz = problem.linear(z, args)
        v = _tm(lambda a, b, c: (1.0 - alpha) * a + alpha * (b + c), z, wz, bias)
        return problem.prox(v, alpha)

    return T


def _peaceman_rachford(problem: MonotoneProblem):
    _, apply = problem.resolvent

    def T(u, packed):
        aux, bias, alpha = packed
        x = problem.prox(u, alpha)
        y = apply(_tm(lambda xi, ui, ci: 2.0 * xi - ui + alpha * ci, x, u, bias), aux)
        return _tm(lambda ui, yi, xi: ui + 2.0 * (yi - xi), u, y, x)

    return T


def monotone_fixed_point(
    problem: MonotoneProblem,
    bias,
    z0,
    args=None,
    *,
    splitting=ForwardBackward(),
    solver=FixedPointIteration(tol=1e-4, maxiter=200),
    gradient=Implicit(),
    maxiter=None,
    throw: bool = False,
) -> Solution:
    """Solves the monotone DEQ ``z = prox(W z + bias)`` by operator splitting, through jdeq.

    The splitting operator ``T`` is a plain jdeq fixed-point map, run by ``solver`` in jdeq's
    per-example loop and differentiated by ``gradient``. With ``FixedPointIteration()`` (the
    default) and the default step, convergence from any ``z0`` is guaranteed at the rates given
    in :class:`ForwardBackward` / :class:`PeacemanRachford`.

    Args:
      problem: the cell's structure, a :class:`MonotoneProblem`.
      bias: ``c``, the input injection (``U x + b``), a pytree like ``z0``; gradients flow to it.
      z0: starting point (pytree of ``(batch, ...)`` leaves). For Peaceman-Rachford it starts
        ``u``; any ``z0`` converges.
      args: the parameters, passed to ``problem.linear`` / ``lipschitz`` / ``resolvent``;
        gradients flow to them.
      splitting: :class:`ForwardBackward` (default) or :class:`PeacemanRachford`.
      solver: the jdeq solver that iterates ``T`` (``FixedPointIteration`` = plain splitting;
        ``Anderson`` accelerates it). Its ``tol`` applies to ``||T(s) - s||`` on the splitting
        state ``s`` (``z`` for forward-backward, ``u`` for Peaceman-Rachford).
      gradient, maxiter, throw: as in :func:`jdeq.fixed_point`.

    Returns:
      A :class:`jdeq.Solution` whose ``value`` is ``z*`` and whose stats describe the solve of
      ``T`` (``nsteps`` = iterations of the splitting).

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> A = 0.3 * jax.random.normal(jax.random.key(0), (4, 4))
      >>> W = 0.9 * jnp.eye(4) - A.T @ A               # I - W = 0.1 I + A^T A: m = 0.1
      >>> problem = jdeq.MonotoneProblem(
      ...     linear=lambda z, w: z @ w.T, monotonicity=0.1,
      ...     lipschitz=lambda w: jnp.linalg.norm(jnp.eye(4) - w, 2))
      >>> sol = jdeq.monotone_fixed_point(problem, jnp.ones((2, 4)), jnp.zeros((2, 4)), W,
      ...                                 solver=jdeq.FixedPointIteration(tol=1e-5, maxiter=500))
      >>> bool(sol.stats.converged.all())
      True

    Reference: Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
    """
    V.instance(problem, "problem", MonotoneProblem, "a jdeq.MonotoneProblem")
    V.instance(splitting, "splitting", _SPLITTINGS, "jdeq.ForwardBackward or jdeq.PeacemanRachford")
    V.instance(solver, "solver", Solver, "a jdeq solver (FixedPointIteration, Anderson or Broyden) to iterate the splitting operator")
    if jax.tree_util.tree_structure(bias) != jax.tree_util.tree_structure(z0):
        raise ValueError("`bias` must have the pytree structure of `z0`.")
    for b, z in zip(jax.tree_util.tree_leaves(bias), jax.tree_util.tree_leaves(z0)):
        if jnp.shape(b) != jnp.shape(z):
            raise ValueError(f"`bias` leaves must have the shapes of `z0`: {jnp.shape(b)} vs {jnp.shape(z)}.")
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(z0))
    alpha = jax.lax.stop_gradient(jnp.asarray(splitting.step(problem, args), dtype))
    if isinstance(splitting, ForwardBackward):
        T, packed = _forward_backward(problem), (args, bias, alpha)
        sol = fixed_point(T, z0, packed, solver=solver, gradient=gradient, maxiter=maxiter, throw=throw)
        return sol
    if problem.resolvent is None:
        raise ValueError(
            "PeacemanRachford needs the problem's `resolvent=(setup, apply)` (a solve with "
            "(1 + alpha) I - alpha W); this problem has none: use ForwardBackward."
        )
    setup, _ = problem.resolvent
    aux = setup(alpha, args)
    T, packed = _peaceman_rachford(problem), (aux, bias, alpha)
    sol = fixed_point(T, z0, packed, solver=solver, gradient=gradient, maxiter=maxiter, throw=throw)
    return Solution(value=problem.prox(sol.value, alpha), stats=sol.stats)
