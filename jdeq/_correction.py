"""Fixed-point correction: several states along one solver path, each with a phantom gradient.

Geng et al. (2021) supervise not only ``z*`` but also earlier states of the solver's path, each
differentiated through a few damped steps (a phantom gradient), and weight their losses. This
stabilizes training and keeps the solver's early iterates useful.

Semantics in jdeq (one solve, no extra evaluations of ``f`` in the forward pass):

* :func:`fixed_point_states` runs the solver once, with budget ``maxiter``, and records ``k``
  *snapshots* inside the shared loop. Snapshot ``j`` (``j = 1..k``) is, per example, exactly what
  :func:`jdeq.fixed_point` would return with ``maxiter = n_j``: the lowest-residual iterate after
  ``n_j`` evaluations of ``f`` (an example that converged earlier keeps its converged iterate).
  With ``states=k`` the budgets are evenly spaced, ``n_j = ceil(j * maxiter / k)``, so the last
  state is the ordinary ``z*``; or give the budgets explicitly.
* Each state then gets the gradient mode ``gradient`` (default ``jdeq.Phantom()``) attached,
  as :func:`jdeq.fixed_point` attaches it to ``z*``.
* :func:`correction_loss` sums ``w_j * loss(state_j)`` with the weights of
  :func:`correction_weights` (``"exp"``, ``"linear"`` or ``"const"``), the last weight always 1,
  so that ``states=1`` is the ordinary loss.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jdeq import _validate as V
from jdeq._fixed_point import _check_f, raise_on_failure
from jdeq._flatten import batch_layout
from jdeq._gradients import Gradient, Phantom
from jdeq._protocols import with_hoisted_closure
from jdeq._solvers import Anderson, Solver
from jdeq._stats import Solution

__all__ = ["correction_loss", "correction_weights", "fixed_point_states"]

_WEIGHTS = ("exp", "linear", "const")


def _int_list(values) -> list[int] | None:
    """``[int(v) for v in values]`` when every entry is an int (or an integer scalar array);
    None otherwise (bools and floats are not budgets)."""
    try:
        out = []
        for v in values:
            if not (V.is_int(v) or (jnp.shape(v) == () and jnp.issubdtype(jnp.result_type(v), jnp.integer))):
                return None
            out.append(int(v))
        return out
    except TypeError:  # not iterable
        return None


def _budgets(states, maxiter):
    """``(k,)`` int32 budgets: evenly spaced up to ``maxiter`` (int ``states``) or given."""
    if V.is_int(states):
        states = V.positive_int(states, "states")
        j = jnp.arange(1, states + 1, dtype=jnp.int32)
        m = jnp.asarray(maxiter, jnp.int32)
        return (j * m + states - 1) // states  # ceil(j * maxiter / k)
    budgets = None if isinstance(states, (str, bytes)) else _int_list(states)
    if budgets is None:
        raise V.BadType(
            f"`states` must be an int or a sequence of ints (evaluation budgets), got {states!r}.",
            name="states", expected="an int or a sequence of ints", value=states,
        )
    if not budgets or budgets[0] < 1 or any(b >= c for b, c in zip(budgets, budgets[1:])):
        raise ValueError(
            f"`states` as budgets must be a non-empty, strictly increasing sequence of ints >= 1, "
            f"got {list(budgets)}."
        )
    return jnp.asarray(budgets, jnp.int32)


def fixed_point_states(
    f: Callable[[Any, Any], Any],
    z0,
    args=None,
    *,
    states: int | Sequence[int] = 2,
    solver=Anderson(),
    gradient=Phantom(),
    maxiter=None,
    throw: bool = False,
) -> Solution:
    """Solves ``z* = f(z*, args)`` once and returns several states along the solver's path.

    Args:
      f, z0, args, maxiter, throw: as in :func:`jdeq.fixed_point` (``maxiter`` may be traced).
      states: ``k``, the number of states, taken at the evenly spaced evaluation budgets
        ``n_j = ceil(j * maxiter / k)``, ``j = 1..k`` (the last is ``maxiter``: the ordinary
        ``z*``); or an increasing sequence of budgets ``(n_1, ..., n_k)`` (budgets past
        ``maxiter``, or past the point where every example converged, give the final iterate).
      solver: a jdeq solver (``FixedPointIteration``, ``Anderson``, ``Broyden``).
      gradient: the gradient attached to every state: ``jdeq.Phantom(...)`` (default, as in
        Geng et al. 2021), ``jdeq.JacobianFree()`` or ``jdeq.Implicit(...)`` (the implicit
        gradient assumes a fixed point, so it only suits states that converged).

    Returns:
      A :class:`jdeq.Solution` whose ``value`` is a tuple of ``k`` states, each with the pytree
      structure of ``z0``, ordered by budget; snapshot ``j`` is, per example, what
      :func:`jdeq.fixed_point` returns with ``maxiter = n_j`` (its lowest-residual iterate).
      ``stats`` describes the full solve (the last state).

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> f = lambda z, a: 0.9 * jnp.tanh(z) + a
      >>> def loss(a):
      ...     sol = jdeq.fixed_point_states(f, jnp.zeros((2, 3)), a, states=3,
      ...                                   solver=jdeq.Anderson(maxiter=12))
      ...     return jdeq.correction_loss(lambda z: jnp.mean((z - 1.0) ** 2), sol.value)[0]
      >>> g = jax.grad(loss)(jnp.ones((2, 3)))

    Reference: Geng, Zhang, Bai, Wang & Lin, "On Training Implicit Models", NeurIPS 2021;
    Bai, Koltun & Kolter, "Deep Equilibrium Optical Flow Estimation", CVPR 2022.
    """
    V.instance(solver, "solver", Solver, "a jdeq.Solver run in jdeq's own loop (FixedPointIteration, "
               "Anderson, Broyden or a subclass) for fixed_point_states")
    if not isinstance(gradient, Gradient) or not gradient.uses_attach:
        raise TypeError(
            "`gradient` must be a jdeq.Gradient defined at the fixed point (jdeq.Phantom, "
            "jdeq.JacobianFree, jdeq.Implicit or a subclass implementing `attach`) for "
            f"fixed_point_states, got {gradient!r}."
        )
    layout = batch_layout(z0)
    _check_f(f, z0, args)
    if maxiter is not None:
        V.budget(maxiter)
    effective = solver.maxiter if maxiter is None else maxiter
    budgets = _budgets(states, effective)
    f, args = with_hoisted_closure(f, z0, args)  # closed-over traced weights: arguments
    args_ng = jax.lax.stop_gradient(args)
    solver = jax.lax.stop_gradient(solver)  # no derivative along the path (see Gradient.solve)
    _, stats, snaps = solver.solve(
        layout.wrap(f, args_ng),
        layout.flatten(jax.lax.stop_gradient(z0)),
        maxiter,
        snapshots=budgets,
    )
    values = tuple(
        gradient.attach(f, layout.unflatten(s), args, solver=solver, maxiter=effective, stats=stats)
        for s in snaps
    )
    if throw:
        raise_on_failure(stats)
    return Solution(value=values, stats=stats)


def correction_weights(num_states: int, kind: str = "exp", *, gamma: float = 0.8) -> jax.Array:
    """Weights ``w_1..w_k`` of the states' losses in fixed-point correction (last weight 1).

    * ``"exp"``: ``w_j = gamma ** (k - j)`` (later states count more; the default);
    * ``"linear"``: ``w_j = j / k``;
    * ``"const"``: ``w_j = 1``.

    The weights are not normalized: the final state's loss always has weight 1, so adding
    correction states adds terms to the ordinary loss instead of shrinking it.

    Args:
      num_states: ``k >= 1``.
      kind: ``"exp"``, ``"linear"`` or ``"const"``.
      gamma: decay of ``"exp"``, in (0, 1].

    Returns:
      A ``(k,)`` float32 array.

    Example:
      >>> import jdeq
      >>> jdeq.correction_weights(3, "exp", gamma=0.5).tolist()
      [0.25, 0.5, 1.0]
    """
    V.positive_int(num_states, "num_states")
    V.one_of(kind, "kind", _WEIGHTS)
    V.number(gamma, "gamma", 0, 1, lo_open=True)
    j = jnp.arange(1, num_states + 1, dtype=jnp.float32)
    if kind == "exp":
        return jnp.asarray(gamma, jnp.float32) ** (num_states - j)
    if kind == "linear":
        return j / num_states
    return jnp.ones_like(j)


def correction_loss(
    loss_fn: Callable[..., jax.Array],
    states: Sequence[Any],
    *loss_args,
    weights: str | Sequence[float] = "exp",
    gamma: float = 0.8,
) -> tuple[jax.Array, jax.Array]:
    """The fixed-point correction loss ``sum_j w_j * loss_fn(state_j, *loss_args)``.

    Args:
      loss_fn: maps one state (and ``loss_args``, e.g. labels) to a scalar loss.
      states: the states, ordered by budget (``fixed_point_states(...).value``).
      *loss_args: passed to ``loss_fn`` after the state.
      weights: ``"exp"`` (default), ``"linear"``, ``"const"`` (see :func:`correction_weights`),
        or an explicit sequence of ``k`` weights. Either is applied in the losses' dtype.
      gamma: decay of the ``"exp"`` weights.

    Returns:
      ``(total, losses)``: the weighted sum and the ``(k,)`` per-state losses (for logging;
      ``losses[-1]`` is the loss of ``z*``), both in the dtype of ``loss_fn``'s values.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> total, losses = jdeq.correction_loss(lambda z, y: jnp.mean((z - y) ** 2),
      ...                                      (jnp.zeros(3), jnp.ones(3)), jnp.ones(3),
      ...                                      weights="linear")
      >>> float(total), losses.tolist()
      (0.5, [1.0, 0.0])
    """
    V.callable_(loss_fn, "loss_fn", usage="loss_fn(state, *loss_args)")
    states = tuple(states)
    if not states:
        raise ValueError("`states` must hold at least one state.")
    k = len(states)
    if isinstance(weights, str):
        w = correction_weights(k, weights, gamma=gamma)
    else:
        w = jnp.asarray(weights)
        if w.shape != (k,):
            raise ValueError(f"`weights` must have one entry per state ({k}), got shape {w.shape}.")
    losses = jnp.stack([jnp.asarray(loss_fn(s, *loss_args)) for s in states])
    if losses.ndim != 1:
        raise ValueError(f"`loss_fn` must return a scalar, got shape {losses.shape[1:]}.")
    return jnp.sum(w.astype(losses.dtype) * losses), losses
