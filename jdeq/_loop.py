"""The one batch-wide, per-example solver loop shared by every jdeq forward solver.

A solver supplies ``init(z) -> state`` and ``update(state, k, z, fz) -> (z_next, state)`` on a
``(batch, dim)`` matrix; this loop evaluates ``F`` once per iteration on the whole batch, measures
each example's residual, freezes examples that converged (or went non-finite, flagged in
``SolverStats.nonfinite``), keeps each example's lowest-residual finite iterate and stops when
none is left active (or, with a solver's ``stop_fraction < 1``, when that fraction of the rows
has stopped) or the budget is spent.
Everything stays inside XLA: a ``lax.while_loop`` (run-time ``maxiter``) or, for
differentiating through the iterations, a ``lax.scan`` of static length.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jdeq._stats import SolverStats

__all__ = ["REL_EPS", "keep_going", "residuals", "run_loop", "solve_rows"]

REL_EPS = 1e-8  # eps in rel_residual = ||f(z) - z|| / (||f(z)|| + eps)


def residuals(z: jax.Array, fz: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example absolute and relative residuals of ``(batch, dim)`` matrices."""
    abs_res = jnp.linalg.norm(fz - z, axis=1)
    norm_fz = jnp.linalg.norm(fz, axis=1)
    # A norm that overflows (entries past ~sqrt(max float)) would give a false rel residual of
    # 0 ("converged"): it counts as non-finite instead. (batch,)-sized, so free in the loop.
    rel_res = jnp.where(jnp.isfinite(norm_fz), abs_res / (norm_fz + REL_EPS), jnp.nan)
    return abs_res, rel_res


def keep_going(active: jax.Array, stop_fraction: float) -> jax.Array:
    """Whether a batch loop goes on: while fewer than ``ceil(stop_fraction * n)`` of its ``n``
    rows have stopped (converged or non-finite). ``stop_fraction = 1`` (the per-example
    contract): while any row is active."""
    n = active.shape[0]
    may_stay = n - math.ceil(stop_fraction * n - 1e-9)  # rows allowed to be still active at the end
    if may_stay <= 0:  # the default keeps its boolean reduction (a pred all-reduce when sharded)
        return jnp.any(active)
    return jnp.sum(active.astype(jnp.int32)) > may_stay


class _Carry(NamedTuple):
    k: jax.Array  # evaluations of F so far
    z: jax.Array
    fz: jax.Array
    state: Any
    best_z: jax.Array
    best_fz: jax.Array
    best_abs: jax.Array
    best_rel: jax.Array
    nsteps: jax.Array
    active: jax.Array
    trace: Any
    snaps: Any  # (states, batch, dim) what the loop would return at each snapshot budget, or None


def _returned(best_z, best_fz, active, converged):
    """Per example, what the loop returns when it stops here: ``f(z_b)``, or ``z_b`` itself for
    an example that met a non-finite value (inactive, not converged: ``SolverStats.nonfinite``),
    where f is known to be finite (f(z_b) may be the point past which f is not), so that no
    derivative is taken there."""
    return jnp.where((~active & ~converged)[:, None], best_z, best_fz)


def run_loop(
    solver,
    F: Callable[[jax.Array], jax.Array],
    z0: jax.Array,
    maxiter,
    *,
    trace_len: int | None = None,
    unrolled: bool = False,
    snapshots=None,
    keep_state: bool,
):
    """Solves ``z = F(z)`` row by row.

    Args:
      solver: a jdeq solver (``tol``, ``stop_mode``, ``stop_fraction``, ``init``, ``update``).
      F: the map on ``(batch, dim)`` matrices; it must treat rows independently.
      z0: ``(batch, dim)`` starting point.
      maxiter: evaluation budget (a Python int, or a traced int when ``unrolled=False``).
      trace_len: length of the residual trace to record, or None for no trace.
      unrolled: run a ``lax.scan`` of ``maxiter - 1`` steps (``maxiter`` static) so that reverse
        mode can differentiate through every iteration.
      snapshots: optional ``(states,)`` int array of evaluation budgets ``n_j``; snapshot ``j``
        is, per example, the iterate this loop would return with ``maxiter = n_j`` (the best
        iterate after ``n_j`` evaluations, or the final one if the loop stopped earlier).
      keep_state: also return the solver's final state, each example's frozen at its own last
        step (what ``jdeq.Implicit(shine=...)`` reuses). Only then is the state masked per
        example each iteration; by default nothing of it leaves the loop.

    Returns:
      ``(value, stats)``, or ``(value, stats, snaps)`` with ``snaps`` of shape
      ``(states, batch, dim)`` when ``snapshots`` is given; with ``keep_state`` the solver
      state is appended last. ``value`` is, per example, ``F(z_b)`` with ``z_b`` the
      lowest-residual finite iterate, the first one on ties (the evaluation the loop already
      made there, so ``maxiter = L`` plain steps return exactly ``F`` applied ``L`` times to
      ``z0``); for an example flagged non-finite, ``z_b`` itself (``z0`` when no
      iterate was finite), where ``F`` is known to be finite. ``stats`` describe ``z_b``.
    """
    tol = solver.tol
    pick = 0 if solver.stop_mode == "abs" else 1
    fz = F(z0)
    # z0 laid out like F(z0) (e.g. zeros made without a sharding, for a batch-sharded input);
    # adding exact zeros changes no value.
    z0 = z0 + jnp.zeros_like(fz)
    res = residuals(z0, fz)
    metric = res[pick]
    trace = None
    if trace_len is not None:  # built from ``metric`` so that it keeps the batch's sharding
        trace = jnp.where(jnp.arange(trace_len) == 0, metric[:, None], jnp.nan)
    value0 = jnp.where(jnp.isfinite(metric)[:, None], fz, z0)  # F(z0), or z0 if not finite
    carry = _Carry(
        k=jnp.asarray(1, jnp.int32),
        z=z0,
        fz=fz,
        state=solver.init(z0),
        best_z=z0,
        best_fz=value0,
        best_abs=res[0],
        best_rel=res[1],
        nsteps=jnp.ones_like(metric, jnp.int32),
        active=(metric >= tol) & jnp.isfinite(metric),
        trace=trace,
        snaps=None if snapshots is None else jnp.broadcast_to(value0, (len(snapshots),) + z0.shape),
    )

    def step(c: _Carry) -> _Carry:
        z_next, state = solver.update(c.state, c.k, c.z, c.fz)
        act = c.active[:, None]
        if keep_state:  # a converged example keeps the state of its own last step
            state = jax.tree_util.tree_map(
                lambda new, old: jnp.where(
                    jnp.reshape(c.active, (-1,) + (1,) * (jnp.ndim(new) - 1)), new, old
                ),
                state,
                c.state,
            )
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
        best_fz = jnp.where(better[:, None], fz_next, c.best_fz)
        if unrolled:  # differentiated: an example that went non-finite is frozen at its last
            # finite (z, f(z)), so no later step (nor its derivative) sees NaN/inf.
            finite = jnp.isfinite(metric)[:, None]
            z_next, fz_next = jnp.where(finite, z_next, c.z), jnp.where(finite, fz_next, c.fz)
        best_abs = jnp.where(better, abs_res, c.best_abs)
        best_rel = jnp.where(better, rel_res, c.best_rel)
        active = c.active & (metric >= tol) & jnp.isfinite(metric)
        snaps = c.snaps
        if snaps is not None:  # budgets not yet reached follow what the loop would return now
            now = _returned(best_z, best_fz, active, (best_rel if pick else best_abs) < tol)
            snaps = jnp.where((snapshots > c.k)[:, None, None], now[None], snaps)
        return _Carry(
            k=c.k + 1,
            z=z_next,
            fz=fz_next,
            state=state,
            best_z=best_z,
            best_fz=best_fz,
            best_abs=best_abs,
            best_rel=best_rel,
            nsteps=c.nsteps + c.active.astype(jnp.int32),
            active=active,
            trace=trace,
            snaps=snaps,
        )

    if unrolled:
        carry, _ = jax.lax.scan(lambda c, _: (step(c), None), carry, None, length=maxiter - 1)
    else:
        frac = solver.stop_fraction
        carry = jax.lax.while_loop(lambda c: (c.k < maxiter) & keep_going(c.active, frac), step, carry)

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
    value = _returned(carry.best_z, carry.best_fz, carry.active, converged)
    out = (value, stats) if snapshots is None else (value, stats, carry.snaps)
    return out + (carry.state,) if keep_state else out


# ----------------------------------------------------------------------------- jax.vmap support


def _hoist(F, z0):
    """``(Fc, consts)`` with ``Fc(z, consts) == F(z)``: every array ``F`` closes over (tracers
    of any dtype included) becomes an explicit argument, so that ``jax.vmap`` can see which of
    them are batched."""
    closed = jax.make_jaxpr(F)(z0)

    def Fc(z, consts):
        return jax.core.eval_jaxpr(closed.jaxpr, consts, z)[0]

    return Fc, list(closed.consts)


def solve_rows(solver, F, z0, maxiter, *, trace_len, snapshots, keep_state):
    """:func:`run_loop` (not unrolled) with a batching rule: under ``jax.vmap`` the mapped
    axis is merged into the rows, so a vmapped solve is one batch-wide loop (the per-example
    semantics are unchanged: rows are independent problems) instead of JAX's generic
    while-loop rule, which selects over the whole carry (solver history included) every
    iteration. Falls back to that generic rule when the budget, the snapshots or the solver's
    own arrays are batched."""
    Fc, consts = _hoist(F, z0)
    solver_leaves, solver_def = jax.tree_util.tree_flatten(solver)
    static_maxiter = maxiter if isinstance(maxiter, int) else None
    return _rows_call(Fc, solver_def, trace_len, static_maxiter, keep_state)(
        z0, consts, solver_leaves, None if static_maxiter is not None else maxiter, snapshots
    )


def _mapped_zeros(consts, batched, v, dtype):
    """``(v, 1, 1)`` zeros of ``dtype`` laid out like the mapped axis of the first batched
    input, so that a broadcast start keeps the batch sharding of the inputs. Called when ``z0``
    is not mapped, so some closed-over array is (else the batching rule would not run)."""
    c = next(c for c, b in zip(consts, batched) if b)
    if jax.dtypes.issubdtype(c.dtype, jax.dtypes.prng_key):  # keys have no arithmetic
        c = jax.random.key_data(c)
    col = jnp.sum(jnp.reshape(c, (v, -1)), axis=1, keepdims=True)  # (a sum, not a slice)
    return jnp.zeros_like(col, dtype=dtype)[:, :, None]


def _rows_call(Fc, solver_def, trace_len, static_maxiter, keep_state):
    def plain(z0, consts, solver_leaves, maxiter, snapshots):
        solver = jax.tree_util.tree_unflatten(solver_def, solver_leaves)
        budget = static_maxiter if static_maxiter is not None else maxiter
        return run_loop(
            solver,
            lambda z: Fc(z, consts),
            z0,
            budget,
            trace_len=trace_len,
            snapshots=snapshots,
            keep_state=keep_state,
        )

    call = jax.custom_batching.custom_vmap(plain)

    @call.def_vmap
    def rule(axis_size, in_batched, z0, consts, solver_leaves, maxiter, snapshots):
        zb, cb, sb, mb, snb = in_batched
        out_batched = None
        if any(jax.tree_util.tree_leaves((sb, mb, snb))):  # generic rule
            axes = [jax.tree_util.tree_map(lambda b: 0 if b else None, b) for b in in_batched]
            out = jax.vmap(plain, in_axes=tuple(axes))(z0, consts, solver_leaves, maxiter, snapshots)
        else:
            v, (n, d) = axis_size, z0.shape[-2:]
            if not zb:  # laid out like a batched input (its sharding of the mapped axis)
                z0 = z0[None] + _mapped_zeros(consts, cb, v, z0.dtype)
            c_axes = [0 if b else None for b in cb]

            def Fb(zm, consts):  # the per-row map on the merged (v * n, d) rows
                out = jax.vmap(Fc, in_axes=(0, c_axes))(zm.reshape(v, n, d), consts)
                return out.reshape(v * n, d)

            merged = _rows_call(Fb, solver_def, trace_len, static_maxiter, keep_state)(
                z0.reshape(v * n, d), consts, solver_leaves, maxiter, snapshots
            )
            split = lambda x: x.reshape((v, n) + x.shape[1:])
            value, stats = split(merged[0]), jax.tree_util.tree_map(split, merged[1])
            out = (value, stats)
            if snapshots is not None:  # (states, v * n, d) -> (v, states, n, d)
                snaps = merged[2].reshape((merged[2].shape[0], v, n, d))
                out = out + (jnp.moveaxis(snaps, 1, 0),)
            if keep_state:  # every leaf of a solver state has the rows as its leading axis
                out = out + (jax.tree_util.tree_map(split, merged[-1]),)
        out_batched = jax.tree_util.tree_map(lambda _: True, out)
        return out, out_batched

    return call
