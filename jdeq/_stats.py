"""Result types returned by :func:`jdeq.fixed_point`: ``Solution`` and ``SolverStats``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

__all__ = ["Solution", "SolverStats"]


@dataclasses.dataclass(frozen=True)
class SolverStats:
    """Per-example statistics of one fixed-point solve (a pytree).

    Every field but ``trace`` has shape ``(batch,)`` (scalars for ``batched=False``); they
    describe ``z_b``, each example's lowest-residual iterate. ``Solution.value`` is ``f(z_b)``
    (already evaluated: the last step taken), or ``z_b`` itself for an example flagged
    ``nonfinite``; so ``rel_residual = abs_residual / (||value|| + eps)`` for the others.

    Attributes:
      nsteps: int32, evaluations of ``f`` spent on the example until it converged or the
        budget ran out (the first evaluation, at ``z0``, counts).
      abs_residual: ``||f(z) - z||`` (2-norm over all state entries of the example).
      rel_residual: ``||f(z) - z|| / (||f(z)|| + eps)``.
      converged: bool, whether the residual chosen by ``stop_mode`` is below ``tol``.
      nonfinite: bool, whether the solve met a non-finite value (NaN/inf in ``f(z)``, in an
        iterate or in its residual) for this example. The example was frozen there; ``value``
        is still its lowest-residual *finite* iterate (``z0`` if there was none) and
        ``converged`` is False. Gradients: see ``jdeq.Implicit`` (such an example's cotangent
        is zeroed, never NaN).
      trace: ``(batch, maxiter)`` residual (of the ``stop_mode`` kind) of the current iterate
        at each iteration, when the solver was built with ``trace=True``; entries after the
        last iteration are NaN. ``None`` otherwise.
    """

    nsteps: Any
    abs_residual: Any
    rel_residual: Any
    converged: Any
    nonfinite: Any
    trace: Any = None


@dataclasses.dataclass(frozen=True)
class Solution:
    """What :func:`jdeq.fixed_point` returns (a pytree).

    Attributes:
      value: the fixed point ``z*``, with the pytree structure, shapes and dtypes of ``z0``.
      stats: a :class:`SolverStats` of the forward solve.
    """

    value: Any
    stats: SolverStats


jax.tree_util.register_dataclass(
    SolverStats,
    data_fields=["nsteps", "abs_residual", "rel_residual", "converged", "nonfinite", "trace"],
    meta_fields=[],
)
jax.tree_util.register_dataclass(Solution, data_fields=["value", "stats"], meta_fields=[])
