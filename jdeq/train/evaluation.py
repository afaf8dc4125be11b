"""``evaluate`` and ``predict``: batched, jit-compiled passes over a dataset, on one device or a mesh."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdeq.train.batches import check_run_options, data_size, inputs_size
from jdeq.train.losses import classification_loss, split_output
from jdeq.train.sharding import (
    MIN_SHARD_SIZE,
    batch_sharding,
    check_mesh,
    global_array,
    host_value,
    param_shardings,
    replicated,
    training_mesh,
)

__all__ = ["evaluate", "predict"]


def host_metrics(metrics) -> dict[str, float]:
    """``{name: float}`` of a dict of replicated device scalars."""
    return {k: float(host_value(v)) for k, v in metrics.items()}


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def _eval_batch(graphdef, loss_fn, state, batch, kwargs, out_sharding=None):
    _, metrics = loss_fn(nnx.merge(graphdef, state), batch, **kwargs)
    if out_sharding is not None:  # replicated: every process can read the metrics
        metrics = jax.lax.with_sharding_constraint(metrics, out_sharding)
    return metrics


def _place_state(model, mesh, data_axis, model_axis, min_shard_size):
    """``nnx.split(model)``, the state laid out on ``mesh`` as in :func:`fit` (or left as is)."""
    graphdef, state = nnx.split(model)
    if mesh is not None:
        check_mesh(mesh, data_axis, model_axis=model_axis)
        mesh = training_mesh(mesh, model_axis)
        state = jax.device_put(state, param_shardings(state, mesh, model_axis=model_axis, min_size=min_shard_size))
    return graphdef, state, mesh


def evaluate(
    model: nnx.Module,
    data: Mapping[str, Any],
    *,
    batch_size: int = 256,
    loss_fn: Callable = classification_loss,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
    model_axis: str | None = None,
    min_shard_size: int = MIN_SHARD_SIZE,
    **call_kwargs,
) -> dict[str, float]:
    """Mean metrics of ``loss_fn`` over ``data`` (weighted by batch size, every example once).

    Args:
      model: the model (not modified).
      data: a mapping of arrays sharing a leading axis.
      batch_size: evaluation batch size (the last batch may be smaller: one more compile).
      loss_fn: ``loss_fn(model, batch, **call_kwargs) -> (loss, metrics)``; must be hashable
        (a module-level function or a ``functools.partial``) since it keys the jit cache.
      mesh: a ``jax.sharding.Mesh`` to evaluate on (see :mod:`jdeq.train.sharding`): each
        batch is split along ``data_axis`` (``batch_size`` is rounded up to a multiple of its
        size) and the model's state is laid out as in :func:`fit` (replicated, or large
        weights split along ``model_axis``). A last batch whose size is not a multiple of the
        axis size runs whole on every device (metrics are batch means, so it is not padded).
        With several processes, every process passes the same full ``data``. None: one device.
      data_axis: the mesh axis the batch is split along.
      model_axis: the mesh axis large weights are split along (None: replicated).
      min_shard_size: the smallest parameter (in elements) split along ``model_axis``.
      call_kwargs: run-time options for the model, e.g. ``maxiter=8`` (traced: changing the
        value does not recompile).

    Returns:
      ``{metric: mean value}``.

    Example:
      >>> import numpy as np
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> data = {"inputs": np.ones((10, 4), np.float32), "labels": np.zeros(10, np.int32)}
      >>> sorted(evaluate(model, data, batch_size=4))
      ['accuracy', 'loss']
    """
    check_run_options(batch_size, call_kwargs, loss_fn=loss_fn)
    n = data_size(data)
    graphdef, state, mesh = _place_state(model, mesh, data_axis, model_axis, min_shard_size)
    out_sharding = None
    if mesh is not None:
        size = mesh.shape[data_axis]
        batch_size = -(-batch_size // size) * size
        out_sharding = replicated(mesh)
    totals: dict[str, float] = {}
    for start in range(0, n, batch_size):
        rows = {k: np.asarray(v)[start : start + batch_size] for k, v in data.items()}
        size = min(batch_size, n - start)
        if mesh is None:
            batch = {k: jnp.asarray(v) for k, v in rows.items()}
        else:
            sharding = batch_sharding(mesh, data_axis) if size % mesh.shape[data_axis] == 0 else out_sharding
            batch = {k: global_array(v, sharding) for k, v in rows.items()}
        m = host_metrics(_eval_batch(graphdef, loss_fn, state, batch, call_kwargs, out_sharding))
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + v * size
    return {k: v / n for k, v in totals.items()}


@functools.partial(jax.jit, static_argnums=(0, 4))
def _apply(graphdef, state, inputs, kwargs, out_sharding=None):
    out = split_output(nnx.merge(graphdef, state)(inputs, **kwargs))
    if out_sharding is not None:  # replicated: every process can read the outputs
        out = jax.lax.with_sharding_constraint(out, out_sharding)
    return out


def predict(
    model: nnx.Module,
    inputs,
    *,
    batch_size: int = 256,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
    model_axis: str | None = None,
    min_shard_size: int = MIN_SHARD_SIZE,
    **call_kwargs,
):
    """Per-example outputs of ``model`` over ``inputs``, batched and jit-compiled.

    Args:
      model: returns ``logits`` or ``(logits, stats)``.
      inputs: an array (or pytree of arrays) with a leading example axis.
      batch_size: batch size.
      mesh: a ``jax.sharding.Mesh`` to run on (see :mod:`jdeq.train.sharding`): each batch is
        split along ``data_axis`` (``batch_size`` is rounded up to a multiple of its size; the
        last batch is padded with copies of the last example, whose outputs are dropped; every
        example's solve is independent, so the padding changes no other output) and the
        model's state is laid out as in :func:`fit`. The outputs are gathered (replicated)
        on every device. With several processes, every process passes the same full
        ``inputs``. None: one device.
      data_axis: the mesh axis the batch is split along.
      model_axis: the mesh axis large weights are split along (None: replicated).
      min_shard_size: the smallest parameter (in elements) split along ``model_axis``.
      call_kwargs: run-time options, e.g. ``maxiter=k`` (traced: no recompile per value).

    Returns:
      ``(logits, stats)`` as numpy, concatenated over batches; ``stats`` is a
      ``jdeq.SolverStats`` of per-example arrays (``trace`` too, if recorded) or None.

    Example:
      >>> import numpy as np
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))   # a DEQ model also returns its stats
      >>> logits, stats = predict(model, np.ones((10, 4), np.float32), batch_size=4)
      >>> logits.shape, stats is None
      ((10, 3), True)
    """
    check_run_options(batch_size, call_kwargs)
    n = inputs_size(inputs)
    graphdef, state, mesh = _place_state(model, mesh, data_axis, model_axis, min_shard_size)
    size = min(batch_size, n)
    out_sharding = None
    if mesh is not None:
        size = -(-size // mesh.shape[data_axis]) * mesh.shape[data_axis]
        out_sharding, in_sharding = replicated(mesh), batch_sharding(mesh, data_axis)
    outs = []
    for start in range(0, n, size):
        # The last batch is padded to the common size (one compiled shape), then cut back.
        idx = np.minimum(np.arange(start, start + size), n - 1)
        if mesh is None:
            chunk = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)[idx]), inputs)
        else:
            chunk = jax.tree_util.tree_map(lambda a: global_array(np.asarray(a)[idx], in_sharding), inputs)
        out = jax.tree_util.tree_map(host_value, _apply(graphdef, state, chunk, call_kwargs, out_sharding))
        outs.append(jax.tree_util.tree_map(lambda x: x[: min(size, n - start)], out))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outs)
