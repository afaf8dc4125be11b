"""``jdeq.fixed_point`` (the DEQ core) and ``jdeq.unroll`` (the explicit weight-tied baseline)."""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdeq import _validate as V
from jdeq._flatten import batch_layout
from jdeq._gradients import Gradient, Implicit
from jdeq._loop import residuals
from jdeq._solvers import Anderson, Solver, check_maxiter
from jdeq._stats import Solution, SolverStats

__all__ = ["fixed_point", "unroll"]


def _shapes(tree, limit: int = 200) -> str:
    """A short description of a pytree's array shapes and dtypes, for error messages."""
    def leaf(x):
        try:
            return f"{jnp.result_type(x)}{list(jnp.shape(x))}"
        except Exception:  # noqa: BLE001 - not an array: name its type
            return type(x).__name__

    text = str(jax.tree_util.tree_map(leaf, tree))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_f(f, z0, args, *, name: str = "f") -> None:
    """Traces ``f`` once abstractly; raises if its output does not match ``z0``."""
    V.callable_(f, name, usage=f"{name}(z, args)")
    try:
        out = jax.eval_shape(f, z0, args)
    except (TypeError, ValueError) as e:  # say which call failed, with what (the message is f's)
        e.add_note(f"(raised while tracing `{name}(z, args)` with z0 {_shapes(z0)} and args {_shapes(args)})")
        raise
    want, got = jax.tree_util.tree_structure(z0), jax.tree_util.tree_structure(out)
    if want != got:
        raise TypeError(
            f"`{name}(z, args)` must return the pytree structure of `z0`: expected {want}, got {got}."
        )
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(z0)[0], jax.tree_util.tree_leaves(out)):
        where = jax.tree_util.keystr(path) or "<root>"
        if tuple(jnp.shape(a)) != tuple(b.shape):
            raise ValueError(
                f"`{name}(z, args)` changed the shape of leaf {where}: {tuple(jnp.shape(a))} -> {b.shape}."
            )
        if jnp.result_type(a) != b.dtype:
            raise TypeError(
                f"`{name}(z, args)` changed the dtype of leaf {where}: {jnp.result_type(a)} -> {b.dtype}."
            )


def _raise_on_failure(converged, abs_res, rel_res, nonfinite) -> None:
    """Host side of ``throw=True``: says which examples went non-finite, else which did not
    converge (run through ``jax.debug.callback``, so it also fires under ``jit``)."""
    converged, abs_res, rel_res, nonfinite = map(np.asarray, (converged, abs_res, rel_res, nonfinite))
    if nonfinite.any():
        raise RuntimeError(
            f"jdeq.fixed_point(throw=True): non-finite residual in {int(nonfinite.sum())} of "
            f"{nonfinite.size} examples (first: example {int(np.argmax(nonfinite))}): the solve "
            "diverged or f produced NaN/inf (in f(z), an iterate or its residual). The returned "
            "value is each example's lowest-residual finite iterate."
        )
    if not converged.all():
        bad = ~converged
        raise RuntimeError(
            f"jdeq.fixed_point(throw=True): {int(bad.sum())} of {converged.size} examples did not "
            f"converge (all values finite); worst abs residual {abs_res[bad].max():.3e}, rel "
            f"{rel_res[bad].max():.3e}. Raise `maxiter`, loosen `tol`, or make f more contractive."
        )


def raise_on_failure(stats: SolverStats) -> None:
    """Adds the ``throw=True`` run-time check of ``stats`` (works under ``jit``)."""
    jax.debug.callback(
        _raise_on_failure, stats.converged, stats.abs_residual, stats.rel_residual, stats.nonfinite
    )


def check_options(solver, gradient, throw, batched) -> None:
    """Raises ``TypeError`` unless ``solver``, ``gradient``, ``throw`` and ``batched`` are of the
    right kinds (shared by :func:`fixed_point` and the Flax adapters)."""
    if not isinstance(solver, Solver):
        raise TypeError(
            "`solver` must be a jdeq.Solver (jdeq.FixedPointIteration, jdeq.Anderson, "
            f"jdeq.Broyden, jdeq.JaxoptSolver, ... or your own subclass), got {solver!r}."
        )
    if not isinstance(gradient, Gradient):
        raise TypeError(
            "`gradient` must be a jdeq.Gradient (jdeq.Implicit, jdeq.Phantom, "
            f"jdeq.JacobianFree, jdeq.Unrolled, ... or your own subclass), got {gradient!r}."
        )
    V.boolean(throw, "throw")
    V.boolean(batched, "batched")


def check_batch_axis(z0, *, name: str = "z0") -> None:
    """With ``batched=True``: raises if no leaf of ``z0`` has more than one axis, the case where
    reading the leading axis as the batch is almost surely a mistake (per-example code under
    ``jax.vmap`` with a 1-D state). Called after ``batch_layout``, which rejects scalar
    leaves, so the first leaf has a leading axis."""
    leaves = jax.tree_util.tree_leaves(z0)
    if leaves and all(jnp.ndim(x) <= 1 for x in leaves):
        shape = jnp.shape(leaves[0])
        raise ValueError(
            f"`{name}` has no axis beyond its leading one (first leaf of shape {shape}): with "
            f"batched=True (the default) that axis is the batch, so this would solve "
            f"{shape[0]} separate scalar problems. For one example (e.g. "
            f"per-example code under jax.vmap) pass `batched=False`; for a batch of scalar "
            f"problems give `{name}` a trailing axis of size 1."
        )


def _add_batch_axis(tree):
    def leaf(x):  # a non-array leaf is left for batch_layout's error message
        return jnp.asarray(x)[None] if isinstance(x, (jax.Array, np.ndarray, numbers.Number)) else x

    return jax.tree_util.tree_map(leaf, tree)


def _drop_batch_axis(tree):
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def check_depth(depth) -> None:
    """Raises ``ValueError`` unless ``depth`` is an int >= 1 (``unroll`` and the adapters)."""
    V.positive_int(depth, "depth")


def fixed_point(
    f: Callable[[Any, Any], Any],
    z0,
    args=None,
    *,
    solver=Anderson(),
    gradient=Implicit(),
    maxiter=None,
    throw: bool = False,
    batched: bool = True,
) -> Solution:
    """Finds ``z* = f(z*, args)`` for every example of a batch and makes it differentiable.

    Args:
      f: a pure function ``f(z, args) -> z`` with the structure, shapes and dtypes of ``z0``.
        It may close over traced weights (``jax.grad``/``jax.vmap`` of code that builds
        ``f``): they get the gradient they would get in ``args``.
        It receives the whole batch at once and must treat examples independently.
      z0: starting point; a pytree whose floating leaves share a leading batch axis. Each example
        is its own fixed-point problem (own residual norm, own Anderson/Broyden history, frozen
        once converged). ``z0`` receives no gradient.
      args: any pytree (parameters, input injection, ...); gradients flow to it.
      solver: ``jdeq.FixedPointIteration``, ``jdeq.Anderson`` (default), ``jdeq.Broyden`` or a
        ``jdeq.JaxoptSolver``.
      gradient: ``jdeq.Implicit()`` (default), ``jdeq.Phantom``, ``jdeq.JacobianFree`` or
        ``jdeq.Unrolled``.
      maxiter: run-time override of ``solver.maxiter``. May be a traced integer (changing it
        does not recompile), except with ``Unrolled`` or ``trace=True``, which need it static.
      throw: raise a ``RuntimeError`` at run time (also under ``jit``, surfacing as a
        ``JaxRuntimeError``) when any example went non-finite (the message says "non-finite")
        or did not converge (it says "did not converge").
      batched: ``True`` (default): every leaf of ``z0`` has a leading batch axis. ``False``:
        ``z0`` is one example (leaves of any shape, scalars included) and ``f`` is per-example
        code; the stats' fields are then scalars. This is the mode for ``jax.vmap``: a vmapped
        solve runs as one batch-wide loop with per-example semantics (values, stats and
        gradients equal the batched solve's), not as JAX's generic while-loop batching. A
        ``z0`` whose every leaf is 1-D is rejected with ``batched=True`` (it would be read as a
        batch of scalar problems): say which one you mean.

    Returns:
      A :class:`jdeq.Solution`: ``value`` (per example, ``f`` at the lowest-residual iterate
      seen, the first one on ties: that evaluation is already made, so ``maxiter=L`` plain
      iterations apply ``f`` exactly ``L`` times) and ``stats`` (a :class:`jdeq.SolverStats`
      of that iterate).

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> f = lambda z, p: jnp.tanh(z @ p["W"] + p["x"])
      >>> p = {"W": 0.3 * jnp.eye(4), "x": jnp.ones((8, 4))}
      >>> sol = jdeq.fixed_point(f, jnp.zeros((8, 4)), p)
      >>> bool(sol.stats.converged.all())
      True

      Per-example code under ``jax.vmap``:

      >>> one = lambda x: jdeq.fixed_point(f, jnp.zeros(4), {"W": p["W"], "x": x},
      ...                                  batched=False).value
      >>> bool(jnp.allclose(jax.vmap(one)(p["x"]), sol.value, atol=1e-6))
      True

    Reference: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """
    check_options(solver, gradient, throw, batched)
    if batched:
        batch_layout(z0)
        check_batch_axis(z0)
        fb, z0b = f, z0
    else:  # one example: a batch of one, so that jax.vmap maps onto the batched loop
        z0b = _add_batch_axis(z0)
        batch_layout(z0b)
        fb = lambda z, a: _add_batch_axis(f(_drop_batch_axis(z), a))  # noqa: E731
    _check_f(f, z0, args)
    if maxiter is not None:
        check_maxiter(maxiter)
    sol = gradient.solve(fb, z0b, args, solver=solver, maxiter=maxiter)
    if throw:
        raise_on_failure(sol.stats)
    if not batched:
        sol = Solution(value=_drop_batch_axis(sol.value), stats=_drop_batch_axis(sol.stats))
    return sol


def unroll(
    f: Callable[[Any, Any], Any],
    z0,
    args=None,
    *,
    depth: int,
    remat: bool = False,
    tol: float = 1e-4,
    stop_mode: str = "rel",
) -> Solution:
    """The explicit weight-tied deep network: ``depth`` applications of ``f``, differentiated
    by plain backprop (memory O(depth), or O(1) activations per layer with ``remat=True``).

    Returns the same :class:`jdeq.Solution` as :func:`fixed_point`, so a benchmark can swap one
    for the other: ``nsteps = depth`` and the residuals are those of the last-but-one state,
    ``||z_L - z_{L-1}|| = ||f(z_{L-1}) - z_{L-1}||`` (free: no extra evaluation),
    ``converged`` compares that residual (of kind ``stop_mode``) with ``tol``, and
    ``nonfinite`` flags a non-finite residual (the value is the last layer's, not guarded).

    Args:
      f, z0, args: as in :func:`fixed_point`.
      depth: number of layers ``L >= 1`` (static).
      remat: rematerialize each layer in the backward pass (``jax.checkpoint``).
      tol, stop_mode: only used to fill ``stats.converged``.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> sol = jdeq.unroll(lambda z, a: jnp.tanh(0.5 * z + a), jnp.zeros((2, 3)),
      ...                   jnp.ones((2, 3)), depth=8)
    """
    check_depth(depth)
    V.stop_mode(stop_mode)
    layout = batch_layout(z0)
    _check_f(f, z0, args)
    layer = (lambda z: f(z, args)) if not remat else jax.checkpoint(lambda z: f(z, args))

    def body(z, _):
        return layer(z), None

    z0 = jax.lax.stop_gradient(z0)
    z_prev, _ = jax.lax.scan(body, z0, None, length=depth - 1)
    z = layer(z_prev)
    abs_res, rel_res = residuals(*map(layout.flatten, jax.lax.stop_gradient((z_prev, z))))
    n = layout.batch
    stats = SolverStats(
        nsteps=jnp.full((n,), depth, jnp.int32),
        abs_residual=abs_res,
        rel_residual=rel_res,
        converged=(abs_res if stop_mode == "abs" else rel_res) < tol,
        nonfinite=~(jnp.isfinite(abs_res) & jnp.isfinite(rel_res)),
    )
    return Solution(value=z, stats=stats)
