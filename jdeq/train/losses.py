"""The default loss of :func:`jdeq.train.fit` and its metrics, including the solver's stats."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jdeq._stats import SolverStats

__all__ = ["classification_loss", "count_params", "solver_metrics", "split_output"]


def split_output(out) -> tuple[Any, SolverStats | None]:
    """``(logits, stats)`` from a model output that is ``logits`` or ``(logits, stats)``."""
    if isinstance(out, tuple):
        if len(out) != 2:
            raise ValueError(f"a model must return `logits` or `(logits, stats)`, got a {len(out)}-tuple.")
        return out
    return out, None


def solver_metrics(stats: SolverStats | None) -> dict[str, jax.Array]:
    """Batch means of a ``jdeq.SolverStats``: ``nsteps`` (forward evaluations of the cell),
    ``abs_residual``, ``rel_residual``, ``converged`` and ``nonfinite`` (fractions of the
    batch); empty for None. The residual means are taken over the finite examples only (a
    non-finite example is counted by ``nonfinite`` instead; its reported residual is that of
    its best finite iterate, or NaN/inf if it had none)."""
    if stats is None:
        return {}
    finite = jnp.isfinite(stats.abs_residual) & jnp.isfinite(stats.rel_residual)

    def finite_mean(x):  # a NaN metric of one example must not hide the others'
        return jnp.sum(jnp.where(finite, x, 0)) / jnp.maximum(jnp.sum(finite), 1)

    return {  # jnp.mean of ints and bools is in the default float type
        "nsteps": jnp.mean(stats.nsteps),
        "abs_residual": finite_mean(stats.abs_residual),
        "rel_residual": finite_mean(stats.rel_residual),
        "converged": jnp.mean(stats.converged),
        "nonfinite": jnp.mean(stats.nonfinite),
    }


def classification_loss(model, batch, **call_kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Softmax cross-entropy with integer labels, plus accuracy and the solver's stats.

    Args:
      model: called as ``model(batch["inputs"], **call_kwargs)``, returning ``logits`` or
        ``(logits, stats)``.
      batch: a mapping with ``"inputs"`` and int ``"labels"`` of the logits' shape without their
        class axis: ``(batch,)``, or ``(batch, positions...)`` for per-position classes (a
        sequence's tokens); loss and accuracy are means over every label.
      call_kwargs: passed to the model (e.g. ``maxiter=4``; bind them with
        ``functools.partial`` to train with them).

    Returns:
      ``(loss, {"loss", "accuracy", and, for a DEQ/unrolled model, "nsteps", "abs_residual",
      "rel_residual", "converged", "nonfinite"})``.
    """
    if not all(k in batch for k in ("inputs", "labels")):
        raise ValueError(
            f"classification_loss needs the keys 'inputs' and 'labels' in each batch, got {sorted(batch)}."
        )
    labels = batch["labels"]
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise TypeError(f"`labels` must be integers (class ids), got dtype {jnp.result_type(labels)}.")
    logits, stats = split_output(model(batch["inputs"], **call_kwargs))
    if jnp.shape(labels) != jnp.shape(logits)[:-1]:
        raise ValueError(
            f"`labels` must have shape {jnp.shape(logits)[:-1]} (one class id per row of the logits "
            f"{jnp.shape(logits)}), got {jnp.shape(labels)}."
        )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    metrics.update(solver_metrics(stats))
    return loss, metrics


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars (``nnx.Param`` entries) of a model."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))))
