"""Gradient modes of a DEQ: the public base class ``Gradient`` and the built-in modes.

``Implicit``, ``Phantom`` and ``JacobianFree`` attach a ``jax.custom_jvp`` to the (stop-gradient)
fixed point: the primal value is ``z*`` itself and only the tangent rule differs, so they work in
forward mode (``jax.jvp``) and, because every tangent rule is linear and transposable, in reverse
mode too, including second order (Hessian-vector products). ``Unrolled`` overrides
:meth:`Gradient.solve` instead: it differentiates through the solver's iterations.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jdeq import _validate as V
from jdeq._flatten import batch_layout
from jdeq._loop import REL_EPS, residuals
from jdeq._protocols import Gradient, Solver, hoist_closure
from jdeq._stats import Solution, SolverStats

__all__ = ["Gradient", "Implicit", "JacobianFree", "LINEAR_SOLVERS", "Phantom", "Unrolled"]

LINEAR_SOLVERS = ("gmres", "bicgstab", "normal_cg")  # jaxopt's, imported on first use
SHINE_MODES = (None, "direct", "fallback", "refine")  # Implicit(shine=...)


def linear_solve(name: str, matvec, b, *, tol: float, maxiter):
    """jaxopt's ``solve_<name>`` (imported here, on first use: jaxopt is not loaded by
    ``import jdeq``).

    jaxopt's inner products contract over the batch axis, which is ambiguous for Explicit mesh
    axes (JAX asks for an output sharding); under such axes the solve runs in Auto mode
    (``jax.sharding.auto_axes``) and returns ``b``'s layout."""
    from jdeq._jaxopt import linear_solve as solve

    run = lambda b: solve(name, matvec, b, tol=tol, maxiter=maxiter)  # noqa: E731
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return run(b)
    specs = jax.tree_util.tree_map(lambda x: jax.typeof(x).sharding.spec, b)
    # matvec closes over Explicit-mode values: it runs in Explicit mode on b's layout
    explicit_matvec = jax.sharding.explicit_axes(matvec, in_sharding=specs)
    run = lambda b: solve(name, explicit_matvec, b, tol=tol, maxiter=maxiter)  # noqa: E731
    return jax.sharding.auto_axes(run, out_sharding=specs)(b)


def _tree_sub(a, b):
    return jax.tree_util.tree_map(jnp.subtract, a, b)


def _ok_mask(z_star, stats) -> jax.Array:
    """Per-example ``(batch,)`` bool: the forward solve of the example stayed finite."""
    if stats is None:
        return jnp.ones((batch_layout(z_star).batch,), bool)
    return ~jnp.asarray(stats.nonfinite, bool)


def _zero_rows(ok, tree):
    """``tree`` with the examples (leading-axis rows) where ``ok`` is False set to zero.

    A select, not a product: NaN/inf rows become exact zeros, and the map stays linear in
    ``tree`` (``ok`` is a constant of it), so it transposes to the same select in reverse mode.
    """
    def leaf(x):
        return jnp.where(jnp.reshape(ok, (-1,) + (1,) * (jnp.ndim(x) - 1)), x, jnp.zeros_like(x))

    return jax.tree_util.tree_map(leaf, tree)


# ----------------------------------------------------------------------------- implicit


@dataclasses.dataclass(frozen=True, kw_only=True)
class Implicit(Gradient):
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
        ``SolverStats`` (``nsteps``, residuals of the linear system, ``converged``,
        ``nonfinite``), so that a failing backward pass is visible. With jdeq's solvers the
        residuals are those of the fixed point ``u = J^T u + b`` (relative to ``||J^T u + b||``,
        as in the forward solve); with jaxopt's linear solvers, of ``(I - J^T) u = b``
        (relative to ``||b||``; ``nsteps`` is -1: jaxopt does not report it). Runs through
        ``jax.debug.callback`` after the solve (never inside its loop); leave ``None`` for no
        host traffic at all.
      shine: reuse the forward solver's inverse-Jacobian estimate in the backward pass (SHINE,
        Ramzi et al. 2022). The forward solver must keep one: ``jdeq.Broyden`` (its low-rank
        ``B ~ (J - I)^{-1}``, so ``(I - J)^{-T} g ~ -B^T g``) or ``jdeq.Anderson`` (the
        multisecant estimate of its history, the inverse Jacobian its type-II mixing uses);
        another solver raises ``ValueError`` at the call. The forward loop then carries its
        final state out (each example's frozen at its own last step); without ``shine``
        nothing is kept. Modes, per example:

        * ``"direct"``: the estimate is the adjoint, no iterations at all (the paper's SHINE;
          an approximate gradient, like ``JacobianFree`` but closer to the exact one);
        * ``"fallback"``: one matvec checks each example's adjoint residual
          ``||g - (I - J^T) u0|| / ||g||``; examples at most ``shine_tol`` keep the estimate,
          the others run the full backward solve (from zero, as by default), which is skipped
          when every example passed;
        * ``"refine"``: the backward iterations start from the estimate (same ``tol``: the
          exact gradient, from a better start).

        Forward mode uses the non-transposed estimate. With ``shine``, ``callback``'s
        ``nsteps`` counts matvecs: 0 for ``"direct"`` (its residual is computed only for the
        callback), 1 for an example accepted by ``"fallback"`` (reported converged); for the
        examples that kept the estimate, ``rel_residual`` is ``||g - (I - J^T) u0|| / ||g||``. Where no
        forward state reaches :meth:`attach` (``jdeq.fixed_point_states``), the default
        backward runs. Not with jaxopt's linear solvers (``ValueError``).
      shine_tol: ``"fallback"``'s acceptance threshold on the relative adjoint residual. The
        default 0.5 keeps an estimate that at least halves the residual of the zero start (and
        of JFB's ``u = g`` on a cell with ``||J|| <= 0.5``); lower it for a more exact gradient
        (benchmarks/README.md, section "shine", has the measured residuals: on the MLP and MDEQ
        cells there, 0.1 meant falling back for every example, 0.5 for none).

    Non-finite policy (never silent NaN gradients): per example, the cotangent (tangent) of
    ``z*`` is set to exactly zero when the example's forward solve met a non-finite value
    (``SolverStats.nonfinite``) or when its adjoint (tangent) solve did, so that example adds
    nothing to the gradient of ``args`` while the other examples of the batch get their exact
    implicit gradient. The backward stats given to ``callback`` then have ``nonfinite=True``
    for that example (its cotangent was zeroed). This is a select after the solve, nothing
    per iteration. Two limits: the returned ``z*`` is the lowest-residual finite iterate, so
    ``f`` and its derivatives are finite there unless no iterate was finite (``f(z0)``
    non-finite), where a zero cotangent can still meet an infinite partial derivative
    (``0 * inf``); and jaxopt's linear solvers (``"gmres"``, ...) treat the batch as one
    system, so a non-finite adjoint there zeroes every example. What a zero cotangent cannot
    fix: the VJP with respect to *shared* arguments (weights) sums over examples, so an
    example whose own input in ``args`` is NaN/inf still contributes ``0 * NaN``. The Flax
    layers guard against it (such an example's input is zeroed before the solve and the
    example reported non-finite); in the pure core, sanitize such inputs before the call.
    Training: ``jdeq.train.fit`` skips any step whose gradients are still non-finite.

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> f = lambda z, a: 0.5 * jnp.tanh(z) + a
      >>> loss = lambda a: jdeq.fixed_point(f, jnp.zeros((2, 3)), a,
      ...                                   gradient=jdeq.Implicit()).value.sum()
      >>> g = jax.grad(loss)(jnp.ones((2, 3)))

      SHINE, with a fall-back for the examples whose estimate is poor:

      >>> g = jax.grad(lambda a: jdeq.fixed_point(f, jnp.zeros((2, 3)), a, solver=jdeq.Broyden(),
      ...              gradient=jdeq.Implicit(shine="fallback")).value.sum())(jnp.ones((2, 3)))

    Reference: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019. SHINE: Ramzi,
    Mannel, Banert & Ciuciu, "SHINE: SHaring the INverse Estimate from the forward pass for
    bi-level optimization and implicit models", ICLR 2022.
    """

    solver: Any = None
    tol: float | None = None
    maxiter: int | None = None
    stop_mode: str | None = None
    callback: Callable[[SolverStats], Any] | None = None
    shine: str | None = None
    shine_tol: float = 0.5

    def __post_init__(self):
        V.one_of(self.shine, "shine", SHINE_MODES)
        V.positive_number(self.shine_tol, "shine_tol")
        if self.shine is not None and isinstance(self.solver, str):
            raise ValueError(
                f"`shine={self.shine!r}` needs jdeq's per-example backward loop (solver=None or "
                f"a jdeq solver), not jaxopt's {self.solver!r}."
            )
        s = self.solver
        if not (s is None or isinstance(s, Solver) or (isinstance(s, str) and s in LINEAR_SOLVERS)):
            raise ValueError(
                "`solver` must be None, a jdeq solver or one of "
                f"{sorted(LINEAR_SOLVERS)}; got {s!r}."
            )
        V.positive_number(self.tol, "tol", none=True)
        V.positive_int(self.maxiter, "maxiter", none=True)
        V.stop_mode(self.stop_mode, none=True)
        V.callable_(self.callback, "callback", usage="callback(stats)", none=True)

    def _linear_solver(self, forward_solver, static_maxiter=None) -> Callable:
        """``solve(matvec, b, maxiter, ok) -> x`` for ``matvec(x) = b`` (batched like ``z``).

        Examples where ``ok`` is False (forward solve non-finite) get ``b = 0`` and ``x = 0``;
        so do examples whose own solve met a non-finite value (see the class docstring).
        """
        callback = self.callback
        if isinstance(self.solver, str):
            name, tol = self.solver, self.tol if self.tol is not None else forward_solver.tol

            def solve(matvec, b, maxiter, ok, fstate=None, transpose=False):
                del fstate, transpose  # (shine is rejected with jaxopt's solvers)
                layout = batch_layout(b, name="cotangent")
                b = _zero_rows(ok, b)
                x = linear_solve(name, matvec, b, tol=tol, maxiter=maxiter)
                finite = jnp.all(jnp.isfinite(layout.flatten(x)), axis=1)
                x = _zero_rows(finite, x)
                if callback is not None:
                    bm, rm = layout.flatten(b), layout.flatten(matvec(x))
                    abs_res, _ = residuals(rm, bm)
                    rel_res = abs_res / (jnp.linalg.norm(bm, axis=1) + 1e-30)
                    n = bm.shape[0]
                    jax.debug.callback(
                        callback,
                        SolverStats(
                            nsteps=jnp.full((n,), -1, jnp.int32),
                            abs_residual=abs_res,
                            rel_residual=rel_res,
                            converged=(rel_res <= tol) & finite & ok,
                            nonfinite=~(finite & ok),
                        ),
                    )
                return x

            return solve

        base = self.solver if self.solver is not None else forward_solver
        overrides = {k: getattr(self, k) for k in ("tol", "stop_mode") if getattr(self, k) is not None}
        static_budget = getattr(base, "static_budget", False)
        if static_budget and isinstance(static_maxiter, numbers.Integral):
            overrides["maxiter"] = int(static_maxiter)  # e.g. jaxopt's loops: a static budget
        solver = base.backward(**overrides)

        mode, shine_tol = self.shine, self.shine_tol

        def solve(matvec, b, maxiter, ok, fstate=None, transpose=False):
            layout = batch_layout(b, name="cotangent")
            bm = jnp.where(ok[:, None], layout.flatten(b), 0)

            def fixed_point_form(um):  # u = u - (A u - b): fixed point at A u = b
                return bm + um - layout.flatten(matvec(layout.unflatten(um)))

            run_maxiter = None if static_budget else maxiter  # static: in the options
            if mode is None or fstate is None:
                um, stats = solver.solve(fixed_point_form, jnp.zeros_like(bm), run_maxiter)
            else:  # SHINE: the forward solver's estimate of the solution
                u0 = forward_solver.inverse_estimate(fstate, bm, transpose=transpose)
                um, stats = _shine_solve(
                    mode, shine_tol, solver, fixed_point_form, bm, u0, run_maxiter,
                    want_stats=callback is not None,
                )
            bad = stats.nonfinite | ~ok  # the loop already flags non-finite: no extra pass
            um = jnp.where(bad[:, None], 0, um)
            if callback is not None:
                jax.debug.callback(
                    callback,
                    dataclasses.replace(stats, converged=stats.converged & ~bad, nonfinite=bad),
                )
            return layout.unflatten(um)

        return solve

    def uses_forward_state(self, solver) -> bool:
        """True with ``shine``: the forward solver's final state is carried to :meth:`attach`.
        Raises ``ValueError`` (naming ``shine``) if ``solver`` keeps no inverse-Jacobian
        estimate."""
        if self.shine is None:
            return False
        if not (isinstance(solver, Solver) and solver.has_inverse_estimate):
            raise ValueError(
                f"`shine={self.shine!r}` reuses the forward solver's inverse-Jacobian estimate, "
                f"which {type(solver).__name__} does not keep: use solver=jdeq.Broyden(...) or "
                "jdeq.Anderson(...) for the forward solve, or drop `shine`."
            )
        return True

    def attach(self, f, z_star, args, *, solver, maxiter, stats=None, forward_state=None):
        """Returns ``z_star`` carrying the implicit gradient (examples flagged in
        ``stats.nonfinite`` get a zero tangent/cotangent). ``forward_state``: the forward
        solver's final state, for ``shine`` (without it the default backward runs)."""
        fn, params = hoist_closure(f, z_star, args)
        if self.maxiter is not None:
            maxiter = self.maxiter
        elif isinstance(self.solver, Solver):
            maxiter = self.solver.maxiter
        if self.shine is None:
            forward_state = None
        return _implicit_identity(
            fn,
            self._linear_solver(solver, maxiter),
            z_star,
            params,
            jnp.asarray(maxiter, jnp.int32),
            _ok_mask(z_star, stats),
            forward_state,
        )


def _shine_solve(mode, shine_tol, solver, F, bm, u0, maxiter, *, want_stats):
    """The backward solve of ``u = F(u)`` (``F(u) = b + u - A u``) from SHINE's estimate ``u0``.

    ``"direct"``: ``u0`` itself (stats only if asked: one more matvec). ``"refine"``: the
    solver's iterations started at ``u0``. ``"fallback"``: one matvec checks each example's
    residual ``||b - A u0|| / ||b||``; an example at most ``shine_tol`` keeps ``u0``, the others
    run the full solve from zero (skipped when every example passed). A non-finite estimate
    counts as failed (``"direct"``: the example is flagged non-finite).

    Returns:
      ``(u, stats)``; ``nsteps`` counts matvecs (1 for an example accepted by the check); for
      the examples that kept the estimate, ``rel_residual`` is ``||b - A u0|| / ||b||``, the
      quantity the check tests.
    """
    finite = jnp.all(jnp.isfinite(u0), axis=1)
    u0 = jnp.where(finite[:, None], u0, 0)
    if mode == "refine":
        return solver.solve(F, u0, maxiter)
    zeros_i = jnp.zeros_like(finite, jnp.int32)  # (laid out like the rows: batch sharding)
    if mode == "direct":
        if not want_stats:  # (without a callback only `nonfinite` is read)
            return u0, SolverStats(None, None, None, None, ~finite)
        abs_res = jnp.linalg.norm(F(u0) - u0, axis=1)
        rel_res = abs_res / (jnp.linalg.norm(bm, axis=1) + REL_EPS)
        metric = rel_res if solver.stop_mode == "rel" else abs_res
        return u0, SolverStats(zeros_i, abs_res, rel_res, (metric < solver.tol) & finite, ~finite)
    # "fallback": one matvec, the residual of the estimate relative to the right-hand side
    abs0 = jnp.linalg.norm(F(u0) - u0, axis=1)
    rel0 = abs0 / (jnp.linalg.norm(bm, axis=1) + REL_EPS)
    accept = finite & (rel0 <= shine_tol)
    start = jnp.where(accept[:, None], u0, 0)

    def run(start):  # accepted examples are fixed points of this map: frozen from the start
        return solver.solve(lambda um: jnp.where(accept[:, None], um, F(um)), start, maxiter)

    def skip(start):
        ones = jnp.ones_like(finite)
        return start, SolverStats(zeros_i, abs0, rel0, ones, ~ones)

    um, stats = jax.lax.cond(jnp.any(~accept), run, skip, start)
    stats = SolverStats(
        nsteps=jnp.where(accept, 1, stats.nsteps + 1),
        abs_residual=jnp.where(accept, abs0, stats.abs_residual),
        rel_residual=jnp.where(accept, rel0, stats.rel_residual),
        converged=accept | stats.converged,
        nonfinite=~accept & stats.nonfinite,
    )
    return um, stats


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _implicit_identity(fn, solve, z_star, params, maxiter, ok, fstate=None):
    del fn, solve, params, maxiter, ok, fstate
    return z_star


@_implicit_identity.defjvp
def _implicit_jvp(fn, solve, primals, tangents):
    z_star, params, maxiter, ok, fstate = primals
    _, dparams, _, _, _ = tangents
    # Re-enter the rule so that z* is itself differentiable when this rule is (2nd order).
    z_star = _implicit_identity(fn, solve, z_star, params, maxiter, ok, fstate)
    _, rhs = jax.jvp(lambda p: fn(z_star, p), (params,), (dparams,))
    _, jz = jax.linearize(lambda z: fn(z, params), z_star)
    # ``solve`` zeroes the examples that are not ``ok`` (or whose own solve went non-finite)
    # on the way in and out: in reverse mode, on the cotangent before the adjoint solve.
    dz = jax.lax.custom_linear_solve(
        lambda v: _tree_sub(v, jz(v)),
        rhs,
        solve=lambda mv, b: solve(mv, b, maxiter, ok, fstate, False),
        transpose_solve=lambda mv, b: solve(mv, b, maxiter, ok, fstate, True),
    )
    return z_star, dz


# ----------------------------------------------------------------------------- phantom / JFB


def _damped_steps(fn, steps: int, damping: float, z, params):
    """``steps`` damped steps from ``z``; returns ``(z_k, finite)``.

    An example whose ``f`` goes non-finite stays at its last finite iterate (``finite`` turns
    False for it), so that no later step is evaluated, nor differentiated, at NaN/inf.
    """
    layout = batch_layout(z)
    finite = jnp.ones((layout.batch,), bool)
    for _ in range(steps):
        fz = fn(z, params)
        finite = finite & jnp.all(jnp.isfinite(layout.flatten(jax.lax.stop_gradient(fz))), axis=1)
        step = jax.tree_util.tree_map(lambda a, b: (1.0 - damping) * a + damping * b, z, fz)
        z = jax.tree_util.tree_map(
            lambda new, old: jnp.where(jnp.reshape(finite, (-1,) + (1,) * (new.ndim - 1)), new, old),
            step,
            z,
        )
    return z, finite


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _phantom_identity(fn, steps, damping, z_star, params, ok):
    del fn, steps, damping, params, ok
    return z_star


@_phantom_identity.defjvp
def _phantom_jvp(fn, steps, damping, primals, tangents):
    z_star, params, ok = primals
    _, dparams, _ = tangents
    z_star = _phantom_identity(fn, steps, damping, z_star, params, ok)  # differentiable (2nd order)
    _, dz, finite = jax.jvp(
        lambda p: _damped_steps(fn, steps, damping, z_star, p), (params,), (dparams,), has_aux=True
    )
    # Zero the examples whose forward solve or whose k phantom steps went non-finite. The mask
    # depends on primals only, so the select stays linear in the tangent (transposable).
    return z_star, _zero_rows(ok & finite, dz)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phantom(Gradient):
    """Phantom gradient: differentiate ``k`` damped steps ``z <- (1-l) z + l f(z)`` from ``z*``.

    The forward value stays ``z*`` exactly; the gradient is that of ``k`` damped steps started
    at ``stop_gradient(z*)``, an inexact but cheap estimate of the implicit gradient that
    approaches it as ``k`` grows (for a contractive ``f``). Memory grows as O(k), not with the
    number of solver iterations.

    Args:
      steps: ``k >= 1``, the number of differentiated steps.
      damping: ``l`` in (0, 1].

    Non-finite policy: per example, the tangent/cotangent of ``z*`` is zeroed (a select, never
    NaN for that example) when its forward solve met a non-finite value
    (``SolverStats.nonfinite``) or when the ``k`` phantom steps from ``z*`` did; the other
    examples keep their exact phantom gradient (see ``jdeq.Implicit`` for the limits).

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
        V.positive_int(self.steps, "steps")
        V.number(self.damping, "damping", 0, 1, lo_open=True)

    def attach(self, f, z_star, args, *, solver, maxiter, stats=None):
        del solver, maxiter
        fn, params = hoist_closure(f, z_star, args)
        return _phantom_identity(
            fn, self.steps, float(self.damping), z_star, params, _ok_mask(z_star, stats)
        )


@dataclasses.dataclass(frozen=True)
class JacobianFree(Gradient):
    """Jacobian-free backprop (JFB): the gradient of one step ``f(z*)``, i.e. ``Phantom(1, 1)``.

    Drops the ``(I - J)^{-1}`` factor of the implicit gradient: a descent direction under mild
    conditions, at the cost of one VJP of ``f``; memory O(1).

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> f = lambda z, a: 0.5 * jnp.tanh(z) + a
      >>> g = jax.grad(lambda a: jdeq.fixed_point(f, jnp.zeros((2, 3)), a,
      ...              gradient=jdeq.JacobianFree()).value.sum())(jnp.ones((2, 3)))

    Non-finite policy: as :class:`Phantom` (zero cotangent for non-finite examples).

    Reference: Fung et al., "JFB: Jacobian-Free Backpropagation for Implicit Networks", AAAI 2022.
    """

    def attach(self, f, z_star, args, *, solver, maxiter, stats=None):
        return Phantom(steps=1, damping=1.0).attach(
            f, z_star, args, solver=solver, maxiter=maxiter, stats=stats
        )


@dataclasses.dataclass(frozen=True)
class Unrolled(Gradient):
    """Backpropagate through every solver iteration (the reference and the unrolled baseline).

    The loop runs as a ``lax.scan`` of exactly ``maxiter - 1`` steps after the first evaluation
    (examples that converged stay frozen, their steps masked), so ``maxiter`` must be static and
    memory grows as O(maxiter). Non-finite policy: an example that meets a non-finite value is
    frozen at its last finite iterate inside the scan (so its masked steps differentiate to
    exact zeros, not ``0 * inf``) and its cotangent is zeroed, as with :class:`Implicit`.

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> f = lambda z, a: 0.5 * jnp.tanh(z) + a
      >>> g = jax.grad(lambda a: jdeq.fixed_point(f, jnp.zeros((2, 3)), a,
      ...              gradient=jdeq.Unrolled()).value.sum())(jnp.ones((2, 3)))
    """

    def solve(self, f, z0, args, *, solver, maxiter=None) -> Solution:
        static = solver.maxiter if maxiter is None else maxiter
        if not isinstance(static, numbers.Integral):
            raise ValueError("`maxiter` must be a static int with gradient=jdeq.Unrolled().")
        layout = batch_layout(z0)
        zm, stats = solver.solve(
            layout.wrap(f, args), layout.flatten(jax.lax.stop_gradient(z0)), int(static), unrolled=True
        )
        stats = jax.lax.stop_gradient(stats)
        # Non-finite policy, as for the other modes: such an example gets a zero cotangent.
        zm = jnp.where(stats.nonfinite[:, None], jax.lax.stop_gradient(zm), zm)
        return Solution(value=layout.unflatten(zm), stats=stats)
