"""Gradient modes of a DEQ: implicit, phantom, Jacobian-free and unrolled.

``Implicit``, ``Phantom`` and ``JacobianFree`` attach a ``jax.custom_jvp`` to the (stop-gradient)
fixed point: the primal value is ``z*`` itself and only the tangent rule differs, so they work in
forward mode (``jax.jvp``) and, because every tangent rule is linear and transposable, in reverse
mode too, including second order (Hessian-vector products). ``Unrolled`` is handled by
:func:`jdeq.fixed_point` directly: it differentiates through the solver's iterations.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jdeq._flatten import batch_layout
from jdeq._jaxopt import LINEAR_SOLVERS, JaxoptSolver, linear_solve
from jdeq._loop import residuals
from jdeq._solvers import _Solver, check_maxiter
from jdeq._stats import SolverStats

__all__ = ["Implicit", "JacobianFree", "Phantom", "Unrolled"]


def _convert(f, z, args):
    """``f`` with closed-over tracers hoisted into explicit parameters: ``fn(z, params)``."""
    f_conv, consts = jax.closure_convert(f, z, args)
    return (lambda z, p: f_conv(z, p[0], *p[1])), (args, tuple(consts))


def _tree_sub(a, b):
    return jax.tree_util.tree_map(jnp.subtract, a, b)


# ----------------------------------------------------------------------------- implicit


@dataclasses.dataclass(frozen=True, kw_only=True)
class Implicit:
    """Implicit-function-theorem gradient: O(1) memory in the number of solver iterations.

    At ``z* = f(z*, a)``, ``dz*/da = (I - J)^{-1} df/da`` with ``J = df/dz(z*)``. Reverse mode
    solves the adjoint system ``u = J^T u + g`` (forward mode solves ``t = J t + df/da . da``),
    then takes one VJP (JVP) to ``a``. The linear solve is a ``lax.custom_linear_solve``, so both
    modes work and nothing of the forward solver's iterates is stored.

    Args:
      solver: the backward solver. ``None`` (default): the forward solver's algorithm, with its
        ``tol``, ``maxiter`` (the effective one, including a run-time override) and
        ``stop_mode``. A jdeq solver instance (e.g. ``jdeq.Anderson(memory=8)``): that
        iteration on the fixed-point form of the linear system, per example. ``"gmres"``,
        ``"bicgstab"`` or ``"normal_cg"``: jaxopt's linear solvers, which treat the batch as one
        system with one global norm (``nsteps`` is reported as -1 for them: unknown).
      tol, maxiter, stop_mode: override the chosen solver's options. Mind an inherited
        ``stop_mode="abs"``: the backward right-hand side is the loss cotangent, often orders of
        magnitude smaller than ``z*``, so an absolute ``tol`` chosen for the forward pass is
        loose there (measured: forward abs 1e-4 gave a 4e-3 relative gradient error on a
        width-256 MLP cell; ``Implicit(stop_mode="rel", tol=1e-3)`` gave 7e-4 for one more
        iteration). The default ``stop_mode="rel"`` is scale-free and has no such trap.
      callback: called on the host, once per backward (or tangent) solve, with the solve's
        ``SolverStats`` (``nsteps``, residuals of the linear system, ``converged``), so that a
        failing backward pass is visible. Runs through ``jax.debug.callback`` after the solve
        (never inside its loop); leave ``None`` for no host traffic at all.

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> f = lambda z, a: 0.5 * jnp.tanh(z) + a
      >>> loss = lambda a: jdeq.fixed_point(f, jnp.zeros((2, 3)), a,
      ...                                   gradient=jdeq.Implicit()).value.sum()
      >>> g = jax.grad(loss)(jnp.ones((2, 3)))

    Reference: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    solver: Any = None
    tol: float | None = None
    maxiter: int | None = None
    stop_mode: str | None = None
    callback: Callable[[SolverStats], Any] | None = None

    def __post_init__(self):
        s = self.solver
        if not (s is None or isinstance(s, (_Solver, JaxoptSolver)) or s in LINEAR_SOLVERS):
            raise ValueError(
                "`solver` must be None, a jdeq solver or one of "
                f"{sorted(LINEAR_SOLVERS)}; got {s!r}."
            )
        if self.tol is not None and not (isinstance(self.tol, numbers.Number) and self.tol > 0):
            raise ValueError(f"`tol` must be > 0, got {self.tol!r}.")
        if self.maxiter is not None:
            check_maxiter(self.maxiter)
        if self.stop_mode not in (None, "abs", "rel"):
            raise ValueError(f"`stop_mode` must be 'abs' or 'rel', got {self.stop_mode!r}.")
        if self.callback is not None and not callable(self.callback):
            raise TypeError(f"`callback` must be callable, got {self.callback!r}.")

    def _linear_solver(self, forward_solver, static_maxiter=None) -> Callable:
        """``solve(matvec, b, maxiter) -> x`` for ``matvec(x) = b`` (batched like ``z``)."""
        callback = self.callback
        if isinstance(self.solver, str):
            name, tol = self.solver, self.tol if self.tol is not None else forward_solver.tol

            def solve(matvec, b, maxiter):
                x = linear_solve(name, matvec, b, tol=tol, maxiter=maxiter)
                if callback is not None:
                    layout = batch_layout(b, name="cotangent")
                    bm, rm = layout.flatten(b), layout.flatten(matvec(x))
                    abs_res, _ = residuals(rm, bm)
                    rel_res = abs_res / (jnp.linalg.norm(bm, axis=1) + 1e-30)
                    n = bm.shape[0]
                    jax.debug.callback(
                        callback,
                        SolverStats(jnp.full((n,), -1, jnp.int32), abs_res, rel_res, rel_res <= tol),
                    )
                return x

            return solve

        base = self.solver if self.solver is not None else forward_solver
        overrides = {k: getattr(self, k) for k in ("tol", "stop_mode") if getattr(self, k) is not None}
        if isinstance(base, JaxoptSolver):
            overrides.pop("stop_mode", None)
            if isinstance(static_maxiter, numbers.Integral):  # jaxopt needs a static maxiter
                overrides["maxiter"] = int(static_maxiter)
            solver = JaxoptSolver(base.jaxopt_class, **{**base.options, **overrides})
        else:
            solver = dataclasses.replace(base, trace=False, **overrides)

        def solve(matvec, b, maxiter):
            layout = batch_layout(b, name="cotangent")
            bm = layout.flatten(b)

            def fixed_point_form(um):  # u = u - (A u - b): fixed point at A u = b
                return bm + um - layout.flatten(matvec(layout.unflatten(um)))

            run_maxiter = None if isinstance(solver, JaxoptSolver) else maxiter  # static: in options
            um, stats = solver.solve(fixed_point_form, jnp.zeros_like(bm), run_maxiter)
            if callback is not None:
                jax.debug.callback(callback, stats)
            return layout.unflatten(um)

        return solve

    def attach(self, f, z_star, args, *, forward_solver, maxiter):
        fn, params = _convert(f, z_star, args)
        if self.maxiter is not None:
            maxiter = self.maxiter
        elif isinstance(self.solver, (_Solver, JaxoptSolver)):
            maxiter = self.solver.maxiter
        return _implicit_identity(
            fn, self._linear_solver(forward_solver, maxiter), z_star, params, jnp.asarray(maxiter, jnp.int32)
        )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _implicit_identity(fn, solve, z_star, params, maxiter):
    del fn, solve, params, maxiter
    return z_star


@_implicit_identity.defjvp
def _implicit_jvp(fn, solve, primals, tangents):
    z_star, params, maxiter = primals
    _, dparams, _ = tangents
    # Re-enter the rule so that z* is itself differentiable when this rule is (2nd order).
    z_star = _implicit_identity(fn, solve, z_star, params, maxiter)
    _, rhs = jax.jvp(lambda p: fn(z_star, p), (params,), (dparams,))
    _, jz = jax.linearize(lambda z: fn(z, params), z_star)
    dz = jax.lax.custom_linear_solve(
        lambda v: _tree_sub(v, jz(v)),
        rhs,
        solve=lambda mv, b: solve(mv, b, maxiter),
        transpose_solve=lambda mv, b: solve(mv, b, maxiter),
    )
    return z_star, dz


# ----------------------------------------------------------------------------- phantom / JFB


def _damped_steps(fn, steps: int, damping: float, z, params):
    for _ in range(steps):
        fz = fn(z, params)
        z = jax.tree_util.tree_map(lambda a, b: (1.0 - damping) * a + damping * b, z, fz)
    return z


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _phantom_identity(fn, steps, damping, z_star, params):
    del fn, steps, damping, params
    return z_star


@_phantom_identity.defjvp
def _phantom_jvp(fn, steps, damping, primals, tangents):
    z_star, params = primals
    _, dparams = tangents
    z_star = _phantom_identity(fn, steps, damping, z_star, params)  # differentiable (2nd order)
    _, dz = jax.jvp(lambda p: _damped_steps(fn, steps, damping, z_star, p), (params,), (dparams,))
    return z_star, dz


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phantom:
    """Phantom gradient: differentiate ``k`` damped steps ``z <- (1-l) z + l f(z)`` from ``z*``.

    The forward value stays ``z*`` exactly; the gradient is that of ``k`` damped steps started
    at ``stop_gradient(z*)``, an inexact but cheap estimate of the implicit gradient that
    approaches it as ``k`` grows (for a contractive ``f``). Memory grows as O(k), not with the
    number of solver iterations.

    Args:
      steps: ``k >= 1``, the number of differentiated steps.
      damping: ``l`` in (0, 1].

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> f = lambda z, a: 0.5 * jnp.tanh(z) + a
      >>> g = jax.grad(lambda a: jdeq.fixed_point(f, jnp.zeros((2, 3)), a,
      ...              gradient=jdeq.Phantom(steps=5)).value.sum())(jnp.ones((2, 3)))

    Reference: Geng et al., "On Training Implicit Models", NeurIPS 2021.
    """

    steps: int = 5
    damping: float = 1.0

    def __post_init__(self):
        if not isinstance(self.steps, numbers.Integral) or self.steps < 1:
            raise ValueError(f"`steps` must be an int >= 1, got {self.steps!r}.")
        if not isinstance(self.damping, numbers.Number) or not 0 < self.damping <= 1:
            raise ValueError(f"`damping` must be in (0, 1], got {self.damping!r}.")

    def attach(self, f, z_star, args, *, forward_solver, maxiter):
        del forward_solver, maxiter
        fn, params = _convert(f, z_star, args)
        return _phantom_identity(fn, self.steps, float(self.damping), z_star, params)


@dataclasses.dataclass(frozen=True)
class JacobianFree:
    """Jacobian-free backprop (JFB): the gradient of one step ``f(z*)``, i.e. ``Phantom(1, 1)``.

    Drops the ``(I - J)^{-1}`` factor of the implicit gradient: a descent direction under mild
    conditions, at the cost of one VJP of ``f``; memory O(1).

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> f = lambda z, a: 0.5 * jnp.tanh(z) + a
      >>> g = jax.grad(lambda a: jdeq.fixed_point(f, jnp.zeros((2, 3)), a,
      ...              gradient=jdeq.JacobianFree()).value.sum())(jnp.ones((2, 3)))

    Reference: Fung et al., "JFB: Jacobian-Free Backpropagation for Implicit Networks", AAAI 2022.
    """

    def attach(self, f, z_star, args, *, forward_solver, maxiter):
        return Phantom(steps=1, damping=1.0).attach(
            f, z_star, args, forward_solver=forward_solver, maxiter=maxiter
        )


@dataclasses.dataclass(frozen=True)
class Unrolled:
    """Backpropagate through every solver iteration (the reference and the unrolled baseline).

    The loop runs as a ``lax.scan`` of exactly ``maxiter - 1`` steps after the first evaluation
    (examples that converged stay frozen, their steps masked), so ``maxiter`` must be static and
    memory grows as O(maxiter).

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> f = lambda z, a: 0.5 * jnp.tanh(z) + a
      >>> g = jax.grad(lambda a: jdeq.fixed_point(f, jnp.zeros((2, 3)), a,
      ...              gradient=jdeq.Unrolled()).value.sum())(jnp.ones((2, 3)))
    """
