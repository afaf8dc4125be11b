"""Reversible DEQs: the algebraically invertible fixed-point iteration and its exact gradient.

McCallum, Arora & Foster, "Reversible Deep Equilibrium Models", 2025 (arXiv:2509.12917).

The forward solver couples two states, started together at ``y_0 = z_0``, with a relaxation
``beta``::

    y_{n+1} = (1 - beta) y_n + beta f(z_n)
    z_{n+1} = (1 - beta) z_n + beta f(y_{n+1})

Each step is invertible in closed form (no solve)::

    z_n = (z_{n+1} - beta f(y_{n+1})) / (1 - beta)
    y_n = (y_{n+1} - beta f(z_n)) / (1 - beta)

so the backward pass of :class:`Reversible` rebuilds the iterates from the last one, in
reverse, and backpropagates through each step on the way: the gradient of exactly the
computation that ran forward (what :class:`jdeq.Unrolled` gives), with memory independent of the
number of iterations.

Why ``ReversibleIteration`` overrides :meth:`jdeq.Solver.solve` instead of implementing
``init``/``update``: one step evaluates ``f`` twice, the second time at ``y_{n+1}``, a point made
inside the step; ``update`` only ever receives ``f`` at the loop's own iterate, so the step
cannot be written as an update. The solver has its own loop, with the shared loop's semantics
(per-example residuals, freezing, lowest-residual iterate, budget counted in evaluations of ``f``,
non-finite flag), which the reverse pass relies on.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdeq import _validate as V
from jdeq._flatten import batch_layout
from jdeq._gradients import Gradient
from jdeq._loop import keep_going, residuals
from jdeq._solvers import Solver
from jdeq._stats import Solution, SolverStats

__all__ = ["Reversible", "ReversibleIteration"]


class _Carry(NamedTuple):
    n: jax.Array  # reversible steps taken by the loop (each costs two evaluations of F)
    y: jax.Array
    z: jax.Array
    fz: jax.Array  # F(z), already made: the next step's first evaluation
    steps: jax.Array  # (batch,) steps taken by each example (its frozen steps are identity)
    nsteps: jax.Array  # (batch,) evaluations of F spent on each example
    active: jax.Array
    best_n: jax.Array  # (batch,) step index of the lowest-residual iterate z_{best_n}
    best_z: jax.Array
    best_fz: jax.Array
    best_abs: jax.Array
    best_rel: jax.Array
    trace: Any


def _forward(beta, tol, pick, F, z0, maxiter, *, stop_fraction, unrolled=False, trace_len=None):
    """The reversible iteration on ``(batch, dim)`` rows.

    Returns ``(value, stats, (y, z, steps, best_n))``: ``y, z`` the final states (each
    example's own last accepted step), ``steps`` its number of accepted steps and ``best_n`` the
    step at which its lowest-residual iterate was reached. ``value`` is ``F(z_{best_n})`` (or
    ``z_{best_n}`` itself for an example flagged non-finite), as in the shared loop.
    """
    fz = F(z0)
    z0 = z0 + jnp.zeros_like(fz)
    abs0, rel0 = residuals(z0, fz)
    metric = rel0 if pick else abs0
    finite = jnp.isfinite(metric)
    trace = None
    if trace_len is not None:
        trace = jnp.where(jnp.arange(trace_len) == 0, metric[:, None], jnp.nan)
    zeros_i = jnp.zeros_like(metric, jnp.int32)
    carry = _Carry(
        n=jnp.asarray(0, jnp.int32),
        y=z0,
        z=z0,
        fz=fz,
        steps=zeros_i,
        nsteps=zeros_i + 1,
        active=(metric >= tol) & finite,
        best_n=zeros_i,
        best_z=z0,
        best_fz=jnp.where(finite[:, None], fz, z0),
        best_abs=abs0,
        best_rel=rel0,
        trace=trace,
    )

    def step(c: _Carry) -> _Carry:
        y1 = (1 - beta) * c.y + beta * c.fz
        z1 = (1 - beta) * c.z + beta * F(y1)
        fz1 = F(z1)
        abs_res, rel_res = residuals(z1, fz1)
        metric = rel_res if pick else abs_res
        # A step that meets NaN/inf anywhere (y included: f may saturate it away) is not taken:
        # the example stays at its last finite states, so the reverse pass never sees them.
        ok = jnp.isfinite(metric) & jnp.all(jnp.isfinite(y1), axis=1)
        take = c.active & ok
        t = take[:, None]
        steps = c.steps + take.astype(jnp.int32)
        best_metric = c.best_rel if pick else c.best_abs
        better = take & (metric < best_metric)
        trace = c.trace
        if trace is not None:  # the residual is measured every second evaluation
            trace = trace.at[:, 2 * c.n + 2].set(jnp.where(c.active, metric, jnp.nan), mode="drop")
        return _Carry(
            n=c.n + 1,
            y=jnp.where(t, y1, c.y),
            z=jnp.where(t, z1, c.z),
            fz=jnp.where(t, fz1, c.fz),
            steps=steps,
            nsteps=c.nsteps + 2 * c.active.astype(jnp.int32),
            active=take & (metric >= tol),
            best_n=jnp.where(better, steps, c.best_n),
            best_z=jnp.where(better[:, None], z1, c.best_z),
            best_fz=jnp.where(better[:, None], fz1, c.best_fz),
            best_abs=jnp.where(better, abs_res, c.best_abs),
            best_rel=jnp.where(better, rel_res, c.best_rel),
            trace=trace,
        )

    if unrolled:
        length = (int(maxiter) - 1) // 2
        if length > 0:
            carry, _ = jax.lax.scan(lambda c, _: (step(c), None), carry, None, length=length)
    else:
        carry = jax.lax.while_loop(
            lambda c: (2 * c.n + 3 <= maxiter) & keep_going(c.active, stop_fraction), step, carry
        )

    best_metric = carry.best_rel if pick else carry.best_abs
    converged = best_metric < tol
    stats = SolverStats(
        nsteps=carry.nsteps,
        abs_residual=carry.best_abs,
        rel_residual=carry.best_rel,
        converged=converged,
        # an example leaves the loop early only by converging or by a non-finite step
        nonfinite=~carry.active & ~converged,
        trace=carry.trace,
    )
    value = jnp.where(stats.nonfinite[:, None], carry.best_z, carry.best_fz)
    return value, stats, (carry.y, carry.z, carry.steps, carry.best_n)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReversibleIteration(Solver):
    """The algebraically reversible fixed-point iteration of McCallum et al. (2025), per example.

    Two coupled states, both started at ``z0``::

        y_{n+1} = (1 - beta) y_n + beta f(z_n)
        z_{n+1} = (1 - beta) z_n + beta f(y_{n+1})

    Each step costs two evaluations of ``f`` and can be undone exactly in closed form, which is
    what :class:`jdeq.Reversible` uses to backpropagate with memory flat in ``maxiter``. It is
    also an ordinary :class:`jdeq.Solver`: any other gradient mode (``Implicit``, ``Phantom``,
    ``Unrolled``, ...) works with it. Semantics as in jdeq's shared loop: the residual
    ``||f(z_n) - z_n||`` is measured per example after every step (the evaluation is the next
    step's first one, so it is free), an example under ``tol`` stops (its later steps are the
    identity), ``maxiter`` counts evaluations of ``f`` (``1 + 2 n`` after ``n`` steps, so an even
    budget leaves one evaluation unused), and the value is ``f`` at the lowest-residual ``z_n``.

    Args:
      beta: relaxation in (0, 1). Larger converges in fewer steps but amplifies rounding in the
        reverse reconstruction by about ``1 / (1 - beta)`` per step (see benchmarks/README.md,
        "reversible", for the measured float32 safe range). The paper allows (0, 2); jdeq
        keeps (0, 1), where each half-step is a contraction of the old state.
      tol, maxiter, stop_mode, trace, stop_fraction: as in :class:`jdeq.Solver` (the trace has
        a value every second column: the residual is measured once per step).

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> f = lambda z, a: 0.5 * jnp.tanh(z) + a
      >>> sol = jdeq.fixed_point(f, jnp.zeros((2, 3)), jnp.ones((2, 3)),
      ...                        solver=jdeq.ReversibleIteration(beta=0.8, tol=1e-6, maxiter=81),
      ...                        gradient=jdeq.Reversible())
      >>> bool(sol.stats.converged.all())
      True

    Reference: McCallum, Arora & Foster, "Reversible Deep Equilibrium Models", 2025.
    """

    beta: float = 0.8

    def __post_init__(self):
        V.fraction(self.beta, "beta")  # in (0, 1): the inverse step divides by 1 - beta
        super().__post_init__()

    def init(self, z):  # the solver has its own loop
        raise NotImplementedError(
            "ReversibleIteration runs its own loop (each step evaluates f twice); call solve()."
        )

    def update(self, state, k, z, fz):
        raise NotImplementedError(
            "ReversibleIteration runs its own loop (each step evaluates f twice); call solve()."
        )

    def solve(self, F, z0, maxiter=None, *, unrolled: bool = False, snapshots=None):
        """Solves ``z = F(z)`` row by row with the reversible iteration.

        Args:
          F: the map on ``(batch, dim)`` matrices (rows independent).
          z0: ``(batch, dim)`` start (``y_0 = z_0 = z0``).
          maxiter: run-time budget of evaluations of ``F`` (None: ``self.maxiter``).
          unrolled: a ``lax.scan`` of ``(maxiter - 1) // 2`` masked steps (static ``maxiter``),
            to differentiate through the iterations.
          snapshots: not supported (raises).

        Returns:
          ``(z, stats)``.
        """
        if snapshots is not None:
            raise NotImplementedError(
                "ReversibleIteration does not record snapshots (jdeq.fixed_point_states / "
                "correction); use another `solver` there."
            )
        maxiter = self.maxiter if maxiter is None else maxiter
        trace_len = None
        if self.trace:
            if not V.is_int(maxiter):
                raise ValueError("`trace=True` needs a static `maxiter`; pass a Python int.")
            trace_len = int(maxiter)
        pick = 0 if self.stop_mode == "abs" else 1
        value, stats, _ = _forward(
            self.beta, self.tol, pick, F, z0, maxiter, unrolled=unrolled, trace_len=trace_len,
            stop_fraction=self.stop_fraction,
        )
        return value, stats


# ----------------------------------------------------------------------------- the gradient


def _reverse(fn, beta, params, saved, ct):
    """Backpropagates ``ct`` (cotangent of the value) through the forward iteration, rebuilding
    the iterates in reverse from the final states; returns the cotangent of ``params``."""
    y, z, steps, best_n, nonfinite = saved
    # Differentiate the floating leaves only (integer arguments get float0 zeros).
    leaves, treedef = jax.tree_util.tree_flatten(params)
    floating = [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves]
    fixed = [x for x, fl in zip(leaves, floating) if not fl]

    def fn_float(zm, float_leaves):
        it_f, it_x = iter(float_leaves), iter(fixed)
        merged = [next(it_f) if fl else next(it_x) for fl in floating]
        return fn(zm, jax.tree_util.tree_unflatten(treedef, merged))

    gp = _reverse_float(fn_float, beta, [x for x, fl in zip(leaves, floating) if fl], y, z, steps,
                        best_n, nonfinite, ct)
    it = iter(gp)
    out = [next(it) if fl else np.zeros(jnp.shape(x), jax.dtypes.float0) for x, fl in zip(leaves, floating)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _reverse_float(fn, beta, params, y, z, steps, best_n, nonfinite, ct):
    """:func:`_reverse` on a list of floating ``params``: the reverse sweep itself."""
    # Non-finite policy: such an example gets a zero cotangent and takes no reverse step.
    ct = jnp.where(nonfinite[:, None], 0, ct)
    steps = jnp.where(nonfinite, 0, steps)
    add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)  # noqa: E731

    # The value is F(z_{best_n}); for best_n == steps that is the final z.
    _, pull = jax.vjp(fn, z, params)
    gz, gp = pull(jnp.where((best_n == steps)[:, None], ct, 0))
    gy = jnp.zeros_like(gz)

    def body(c):
        n, y, z, gy, gz, gp = c
        n = n - 1  # undo step n: (y_{n+1}, z_{n+1}) -> (y_n, z_n)
        act = (n < steps)[:, None]
        fy, pull_y = jax.vjp(fn, y, params)
        z_prev = jnp.where(act, (z - beta * fy) / (1 - beta), z)
        jy, jp = pull_y(jnp.where(act, beta * gz, 0))
        gy1 = gy + jy  # cotangent of y_{n+1}, z_{n+1}'s path included
        fz, pull_z = jax.vjp(fn, z_prev, params)
        y_prev = jnp.where(act, (y - beta * fz) / (1 - beta), y)
        inject = jnp.where(act & (best_n == n)[:, None], ct, 0)
        jz, jp2 = pull_z(jnp.where(act, beta * gy1, 0) + inject)
        gz = jnp.where(act, (1 - beta) * gz + jz, gz)
        gy = jnp.where(act, (1 - beta) * gy1, gy)
        return n, y_prev, z_prev, gy, gz, add(gp, add(jp, jp2))

    init = (jnp.max(steps), y, z, gy, gz, gp)
    *_, gp = jax.lax.while_loop(lambda c: c[0] > 0, body, init)
    return gp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _reversible_solve(fn, beta, tol, pick, frac, z0, params, maxiter):
    value, stats, _ = _forward(beta, tol, pick, lambda z: fn(z, params), z0, maxiter, stop_fraction=frac)
    return value, stats


def _reversible_fwd(fn, beta, tol, pick, frac, z0, params, maxiter):
    value, stats, (y, z, steps, best_n) = _forward(
        beta, tol, pick, lambda z: fn(z, params), z0, maxiter, stop_fraction=frac
    )
    return (value, stats), (params, y, z, steps, best_n, stats.nonfinite, z0)


def _reversible_bwd(fn, beta, tol, pick, frac, res, cts):
    params, y, z, steps, best_n, nonfinite, z0 = res
    ct_value, _ = cts  # stats carry no gradient
    gp = _reverse(fn, beta, params, (y, z, steps, best_n, nonfinite), ct_value)
    return jnp.zeros_like(z0), gp, None


_reversible_solve.defvjp(_reversible_fwd, _reversible_bwd)


@dataclasses.dataclass(frozen=True)
class Reversible(Gradient):
    """Exact gradient of :class:`jdeq.ReversibleIteration` with memory flat in ``maxiter``.

    A ``jax.custom_vjp`` around the reversible forward iteration: only the final states
    ``(y, z)`` and four integers or flags per example are saved; the backward pass inverts the
    steps in closed form, from the last to the first, and backpropagates through each one as it
    is rebuilt (two evaluations and two VJPs of ``f`` per step). The result equals
    ``jdeq.Unrolled()`` through the same iterations up to the rounding of the reconstruction,
    which grows with the number ``n`` of replayed steps, like ``(1 / (1 - beta))^n`` relative
    to machine precision, faster where ``f``'s Jacobian is large: see the measured safe ranges
    in benchmarks/README.md, "reversible" (float32, and float64: 1e-10 at beta 0.8 / 10 steps,
    4e-6 at 20). A long solve can overflow the reconstruction even in float64 (the gradient is
    then NaN): ``f(z) = z**2 + x`` with ``|x| <= 0.2``, beta 0.5 and tol 1e-10 (~70 steps)
    does. A reachable ``tol`` bounds ``n``: only the steps taken are replayed. Frozen steps (an
    example that converged early) are the identity in both directions, so per-example stopping
    is handled exactly. ``maxiter`` may be a run-time value. Reverse mode only (no ``jax.jvp``).

    Non-finite policy, as for the other modes: an example flagged ``nonfinite`` gets a zero
    cotangent (no step of it is replayed), the others their exact gradient.

    Raises:
      TypeError: the solver is not a :class:`jdeq.ReversibleIteration`.

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> f = lambda z, a: 0.5 * jnp.tanh(z) + a
      >>> rev = jdeq.ReversibleIteration(beta=0.8, tol=1e-6, maxiter=41)
      >>> g = jax.grad(lambda a: jdeq.fixed_point(f, jnp.zeros((2, 3)), a, solver=rev,
      ...              gradient=jdeq.Reversible()).value.sum())(jnp.ones((2, 3)))

    Reference: McCallum, Arora & Foster, "Reversible Deep Equilibrium Models", 2025.
    """

    def solve(self, f, z0, args, *, solver, maxiter=None) -> Solution:
        """The reversible solve of ``z = f(z, args)`` (see :meth:`jdeq.Gradient.solve`).

        Args:
          f, z0, args: as in :func:`jdeq.fixed_point`.
          solver: a :class:`jdeq.ReversibleIteration`.
          maxiter: run-time budget override (evaluations of ``f``), or None.

        Returns:
          A :class:`jdeq.Solution` whose value carries the exact gradient to ``args``.
        """
        if not isinstance(solver, ReversibleIteration):
            raise TypeError(
                "`gradient=jdeq.Reversible()` needs `solver=jdeq.ReversibleIteration(...)` (the "
                f"only iteration it can invert); got solver {type(solver).__name__}."
            )
        if solver.trace:
            raise ValueError("`trace=True` is not supported with gradient=jdeq.Reversible().")
        layout = batch_layout(z0)
        zs = layout.flatten(jax.lax.stop_gradient(z0))
        f_conv, consts = jax.closure_convert(lambda zm, a: layout.wrap(f, a)(zm), zs, args)
        fn = lambda zm, p: f_conv(zm, p[0], *p[1])  # noqa: E731
        budget = solver.maxiter if maxiter is None else maxiter
        pick = 0 if solver.stop_mode == "abs" else 1
        value, stats = _reversible_solve(
            fn, float(solver.beta), float(solver.tol), pick, float(solver.stop_fraction), zs,
            (args, tuple(consts)),
            jnp.asarray(budget, jnp.int32),
        )
        stats = jax.lax.stop_gradient(stats)
        return Solution(value=layout.unflatten(value), stats=stats)
