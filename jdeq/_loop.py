"""The one batch-wide, per-example solver loop shared by every jdeq forward solver.

A solver supplies ``init(z) -> state`` and ``update(state, k, z, fz) -> (z_next, state)`` on a
``(batch, dim)`` matrix; this loop evaluates ``F`` once per iteration on the whole batch, measures
each example's residual, freezes examples that converged (or went non-finite, flagged in
``SolverStats.nonfinite``), keeps each example's lowest-residual finite iterate and stops when
none is left active or the budget is spent.
Everything stays inside XLA: a ``lax.while_loop`` (run-time ``maxiter``) or, for
differentiating through the iterations, a ``lax.scan`` of static length.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jdeq._stats import SolverStats

__all__ = ["REL_EPS", "residuals", "run_loop"]

REL_EPS = 1e-8  # eps in rel_residual = ||f(z) - z|| / (||f(z)|| + eps)


def residuals(z: jax.Array, fz: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example absolute and relative residuals of ``(batch, dim)`` matrices."""
    abs_res = jnp.linalg.norm(fz - z, axis=1)
    norm_fz = jnp.linalg.norm(fz, axis=1)
    # A norm that overflows (entries past ~sqrt(max float)) would give a false rel residual of
    # 0 ("converged"): it counts as non-finite instead. (batch,)-sized, so free in the loop.
    rel_res = jnp.where(jnp.isfinite(norm_fz), abs_res / (norm_fz + REL_EPS), jnp.nan)
    return abs_res, rel_res


class _Carry(NamedTuple):
    k: jax.Array  # evaluations of F so far
    z: jax.Array
    fz: jax.Array
    state: Any
    best_z: jax.Array
    best_abs: jax.Array
    best_rel: jax.Array
    nsteps: jax.Array
    active: jax.Array
    trace: Any
    snaps: Any  # (states, batch, dim) best iterates at the snapshot budgets, or None


def run_loop(
    solver,
    F: Callable[[jax.Array], jax.Array],
    z0: jax.Array,
    maxiter,
    *,
    trace_len: int | None = None,
    unrolled: bool = False,
    snapshots=None,
):
    """Solves ``z = F(z)`` row by row.

    Args:
      solver: a jdeq solver (``tol``, ``stop_mode``, ``init``, ``update``).
      F: the map on ``(batch, dim)`` matrices; it must treat rows independently.
      z0: ``(batch, dim)`` starting point.
      maxiter: evaluation budget (a Python int, or a traced int when ``unrolled=False``).
      trace_len: length of the residual trace to record, or None for no trace.
      unrolled: run a ``lax.scan`` of ``maxiter - 1`` steps (``maxiter`` static) so that reverse
        mode can differentiate through every iteration.
      snapshots: optional ``(states,)`` int array of evaluation budgets ``n_j``; snapshot ``j``
        is, per example, the iterate this loop would return with ``maxiter = n_j`` (the best
        iterate after ``n_j`` evaluations, or the final one if the loop stopped earlier).

    Returns:
      ``(z_best, stats)``, or ``(z_best, stats, snaps)`` with ``snaps`` of shape
      ``(states, batch, dim)`` when ``snapshots`` is given.
    """
    tol = solver.tol
    pick = 0 if solver.stop_mode == "abs" else 1
    fz = F(z0)
    res = residuals(z0, fz)
    metric = res[pick]
    batch = z0.shape[0]
    trace = None
    if trace_len is not None:
        trace = jnp.full((batch, trace_len), jnp.nan, metric.dtype).at[:, 0].set(metric)
    carry = _Carry(
        k=jnp.asarray(1, jnp.int32),
        z=z0,
        fz=fz,
        state=solver.init(z0),
        best_z=z0,
        best_abs=res[0],
        best_rel=res[1],
        nsteps=jnp.ones((batch,), jnp.int32),
        active=(metric >= tol) & jnp.isfinite(metric),
        trace=trace,
        snaps=None if snapshots is None else jnp.broadcast_to(z0, (len(snapshots),) + z0.shape),
    )

    def step(c: _Carry) -> _Carry:
        z_next, state = solver.update(c.state, c.k, c.z, c.fz)
        act = c.active[:, None]
        z_next = jnp.where(act, z_next, c.z)
        fz_next = jnp.where(act, F(z_next), c.fz)
        abs_res, rel_res = residuals(z_next, fz_next)
        metric = rel_res if pick else abs_res
        best_metric = c.best_rel if pick else c.best_abs
        better = c.active & (metric < best_metric)
        trace = c.trace
        if trace is not None:
            trace = trace.at[:, c.k].set(jnp.where(c.active, metric, jnp.nan), mode="drop")
        best_z = jnp.where(better[:, None], z_next, c.best_z)
        if unrolled:  # differentiated: an example that went non-finite is frozen at its last
            # finite (z, f(z)), so no later step (nor its derivative) sees NaN/inf.
            finite = jnp.isfinite(metric)[:, None]
            z_next, fz_next = jnp.where(finite, z_next, c.z), jnp.where(finite, fz_next, c.fz)
        snaps = c.snaps
        if snaps is not None:  # budgets not yet reached follow the best iterate
            snaps = jnp.where((snapshots > c.k)[:, None, None], best_z[None], snaps)
        return _Carry(
            k=c.k + 1,
            z=z_next,
            fz=fz_next,
            state=state,
            best_z=best_z,
            best_abs=jnp.where(better, abs_res, c.best_abs),
            best_rel=jnp.where(better, rel_res, c.best_rel),
            nsteps=c.nsteps + c.active.astype(jnp.int32),
            active=c.active & (metric >= tol) & jnp.isfinite(metric),
            trace=trace,
            snaps=snaps,
        )

    if unrolled:
        carry, _ = jax.lax.scan(lambda c, _: (step(c), None), carry, None, length=maxiter - 1)
    else:
        carry = jax.lax.while_loop(lambda c: (c.k < maxiter) & jnp.any(c.active), step, carry)

    best_metric = carry.best_rel if pick else carry.best_abs
    converged = best_metric < tol
    stats = SolverStats(
        nsteps=carry.nsteps,
        abs_residual=carry.best_abs,
        rel_residual=carry.best_rel,
        converged=converged,
        # An example leaves the loop early only by converging or by a non-finite residual (the
        # isfinite test above); one still active at the end ran out of budget. So the flag
        # costs nothing per iteration. A non-finite iterate is never "better", so ``best_z``
        # is the lowest-residual finite iterate (``z0`` if none was finite).
        nonfinite=~carry.active & ~converged,
        trace=carry.trace,
    )
    if snapshots is not None:
        return carry.best_z, stats, carry.snaps
    return carry.best_z, stats
