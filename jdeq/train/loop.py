"""``fit`` (the training loop), ``evaluate`` and ``predict``."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jdeq.train.batches import batch_indices, data_size
from jdeq.train.jacobian import JacReg, find_deqs, penalty, start_recording
from jdeq.train.losses import classification_loss, split_output
from jdeq.train.sharding import batch_sharding, check_mesh, replicate, replicated, shard_batch

__all__ = ["History", "evaluate", "fit", "predict"]


@dataclasses.dataclass
class History:
    """What :func:`fit` records (restored with the checkpoint on resume).

    Attributes:
      train: one dict per logged step: ``{"step", "time", <metrics of the loss function>}``
        (``time``: seconds of training so far, across resumes).
      eval: one dict per evaluation: ``{"step", <eval set name>: {metric: value}}``.
      resumed_from: the step a checkpoint was restored at (None for a fresh run).
    """

    train: list = dataclasses.field(default_factory=list)
    eval: list = dataclasses.field(default_factory=list)
    resumed_from: int | None = None


def _host(metrics) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


# ----------------------------------------------------------------------------- evaluation


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_batch(graphdef, loss_fn, state, batch, kwargs):
    _, metrics = loss_fn(nnx.merge(graphdef, state), batch, **kwargs)
    return metrics


def evaluate(
    model: nnx.Module,
    data: Mapping[str, Any],
    *,
    batch_size: int = 256,
    loss_fn: Callable = classification_loss,
    **call_kwargs,
) -> dict[str, float]:
    """Mean metrics of ``loss_fn`` over ``data`` (weighted by batch size, every example once).

    Args:
      model: the model (not modified).
      data: a mapping of arrays sharing a leading axis.
      batch_size: evaluation batch size (the last batch may be smaller: one more compile).
      loss_fn: ``loss_fn(model, batch, **call_kwargs) -> (loss, metrics)``; must be hashable
        (a module-level function or a ``functools.partial``) since it keys the jit cache.
      call_kwargs: run-time options for the model, e.g. ``maxiter=8`` (traced: changing the
        value does not recompile).

    Returns:
      ``{metric: mean value}``.
    """
    n = data_size(data)
    graphdef, state = nnx.split(model)
    totals: dict[str, float] = {}
    for start in range(0, n, batch_size):
        batch = {k: jnp.asarray(np.asarray(v)[start : start + batch_size]) for k, v in data.items()}
        m = _host(_eval_batch(graphdef, loss_fn, state, batch, call_kwargs))
        size = min(batch_size, n - start)
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + v * size
    return {k: v / n for k, v in totals.items()}


@functools.partial(jax.jit, static_argnums=(0,))
def _apply(graphdef, state, inputs, kwargs):
    return split_output(nnx.merge(graphdef, state)(inputs, **kwargs))


def predict(model: nnx.Module, inputs, *, batch_size: int = 256, **call_kwargs):
    """Per-example outputs of ``model`` over ``inputs``, batched and jit-compiled.

    Args:
      model: returns ``logits`` or ``(logits, stats)``.
      inputs: an array (or pytree of arrays) with a leading example axis.
      batch_size: batch size.
      call_kwargs: run-time options, e.g. ``maxiter=k`` (traced: no recompile per value).

    Returns:
      ``(logits, stats)`` as numpy, concatenated over batches; ``stats`` is a
      ``jdeq.SolverStats`` of per-example arrays (``trace`` too, if recorded) or None.

    Example:
      >>> logits, stats = predict(model, data.tokens, maxiter=16)  # doctest: +SKIP
      >>> correct = logits.argmax(-1) == data.labels                 # doctest: +SKIP
    """
    graphdef, state = nnx.split(model)
    leaves = jax.tree_util.tree_leaves(inputs)
    n = int(np.shape(leaves[0])[0])
    size = min(batch_size, n)
    outs = []
    for start in range(0, n, size):
        # The last batch is padded to the common size (one compiled shape), then cut back.
        idx = np.minimum(np.arange(start, start + size), n - 1)
        chunk = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)[idx]), inputs)
        out = jax.device_get(_apply(graphdef, state, chunk, call_kwargs))
        outs.append(jax.tree_util.tree_map(lambda x: x[: min(size, n - start)], out))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *outs)


# ----------------------------------------------------------------------------- checkpoints


def _manager(directory):
    import orbax.checkpoint as ocp  # imported lazily: orbax is slow to import

    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
    return ocp, ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options)


def _save(ocp, manager, step: int, leaves, history: History, elapsed: float) -> None:
    meta = {"train": history.train, "eval": history.eval, "elapsed": elapsed}
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"leaves": list(leaves)}),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )
    manager.wait_until_finished()


def _restore(ocp, manager, step: int, leaves):
    abstract = {"leaves": [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]}
    out = manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
    )
    return out["state"]["leaves"], out["meta"]


# ----------------------------------------------------------------------------- training


def fit(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    data: Mapping[str, Any],
    *,
    steps: int,
    batch_size: int,
    loss_fn: Callable = classification_loss,
    seed: int = 0,
    eval_data: Mapping[str, Mapping[str, Any]] | None = None,
    eval_every: int | None = None,
    eval_batch_size: int = 256,
    log_every: int = 10,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    progress: bool = True,
    callback: Callable[[int, dict], Any] | None = None,
    jac_reg: JacReg | None = None,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
) -> History:
    """Trains ``model``'s ``nnx.Param`` s in place for ``steps`` optimizer steps.

    One jit-compiled step (forward, ``jax.value_and_grad``, optax update) runs on the
    deterministic batch stream of :func:`batch_indices`. Metrics stay on the device and are
    fetched every ``log_every`` steps (no host round-trip per step).

    Checkpoint/resume: with ``checkpoint_dir``, the parameters, the optimizer state and the
    history are saved (orbax) every ``checkpoint_every`` steps, at the end, and when the run is
    interrupted (``KeyboardInterrupt``). A later call with the same directory restores the latest
    checkpoint and continues from its step; since the batch at step ``k`` depends only on
    ``(seed, k)``, the result equals an uninterrupted run of ``steps`` steps.

    Args:
      model: an ``nnx.Module`` (updated in place).
      optimizer: an optax ``GradientTransformation``.
      data: training arrays sharing a leading axis, e.g. ``{"inputs": x, "labels": y}``.
      steps: total number of optimizer steps (including those of a resumed run).
      batch_size: examples per step.
      loss_fn: ``loss_fn(model, batch) -> (loss, metrics)`` (default:
        :func:`classification_loss`). Must be hashable (a function or ``functools.partial``).
      seed: seed of the batch order.
      eval_data: ``{name: arrays}`` evaluated with :func:`evaluate` every ``eval_every`` steps
        and at the end.
      eval_every: evaluation period in steps (None: only at the end).
      eval_batch_size: evaluation batch size.
      log_every: period of the logged training metrics (and of the progress bar's numbers).
      checkpoint_dir: where to save/restore checkpoints (None: no checkpoints).
      checkpoint_every: checkpoint period in steps (None: only at the end and on interrupt).
      progress: show a tqdm progress bar.
      callback: ``callback(step, metrics)`` after every step (``step`` counts completed steps;
        ``metrics`` holds device scalars: reading them syncs). Raising from it stops the run
        (use it for early stopping; the checkpoint of the last completed period remains).
      jac_reg: a :class:`JacReg` to add the Jacobian penalty of Bai et al. 2021 to the loss of
        every step (or of a random fraction ``prob`` of the steps) for each ``jdeq.nnx.DEQ`` of
        the model; logged as the metric ``"jac_reg"``. Its random key at step ``k`` is
        ``jax.random.fold_in(jax.random.key(seed), k)``. None: no penalty.
      mesh: a ``jax.sharding.Mesh`` for data-parallel training (see
        :mod:`jdeq.train.sharding`): each batch is sharded along ``data_axis``, the parameters
        and optimizer state are replicated, and the step is jitted with those in/out shardings.
        ``batch_size`` is global and must be a multiple of the axis size. With several
        processes (``jax.distributed``), ``data`` is this process's disjoint shard and each
        process draws ``batch_size // jax.process_count()`` rows of it per step. None: one device.
      data_axis: the mesh axis the batch is split along.

    Returns:
      A :class:`History`.

    Example:
      >>> history = fit(model, optax.adam(1e-3), {"inputs": x, "labels": y},  # doctest: +SKIP
      ...               steps=1000, batch_size=64, eval_data={"test": test},
      ...               eval_every=200, checkpoint_dir="ckpt/run1")
      >>> fit(model, optax.adam(1e-3), data, steps=1000, batch_size=64,  # doctest: +SKIP
      ...     jac_reg=JacReg(gamma=2.0, prob=0.5))
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
    for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` must be None or an int >= 1, got {value!r}.")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"`optimizer` must be an optax GradientTransformation, got {optimizer!r}.")
    n = data_size(data)
    local_batch = batch_size
    if mesh is not None:
        check_mesh(mesh, data_axis, batch_size)
        local_batch = batch_size // jax.process_count()
    if local_batch > n:
        raise ValueError(f"`batch_size`={batch_size} exceeds the {n} training examples.")
    data = {k: np.asarray(v) for k, v in data.items()}
    eval_data = dict(eval_data or {})
    for name, arrays in eval_data.items():
        data_size(arrays, name=f"eval_data[{name!r}]")
    if jac_reg is not None:
        if not isinstance(jac_reg, JacReg):
            raise TypeError(f"`jac_reg` must be None or a jdeq.train.JacReg, got {jac_reg!r}.")
        if not find_deqs(model):
            raise ValueError("`jac_reg` needs a jdeq.nnx.DEQ in the model; found none.")

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = optimizer.init(params)
    history = History()
    start, elapsed = 0, 0.0

    ckpt = None
    if checkpoint_dir is not None:
        ocp, manager = _manager(checkpoint_dir)
        ckpt = (ocp, manager)
        latest = manager.latest_step()
        if latest is not None:
            leaves, treedef = jax.tree_util.tree_flatten((params, opt_state))
            restored, meta = _restore(ocp, manager, latest, leaves)
            params, opt_state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in restored])
            history = History(train=list(meta["train"]), eval=list(meta["eval"]), resumed_from=int(latest))
            start, elapsed = int(latest), float(meta["elapsed"])

    base_key = jax.random.key(seed)
    shardings = {}
    if mesh is not None:
        params, opt_state, rest = replicate((params, opt_state, rest), mesh)
        rep, data_sh = replicated(mesh), batch_sharding(mesh, data_axis)
        shardings = {"in_shardings": (rep, rep, data_sh, rep), "out_shardings": rep}

    @functools.partial(jax.jit, **shardings)
    def train_step(params, opt_state, batch, step):
        def loss(p):
            net = nnx.merge(graphdef, p, rest)
            if jac_reg is None:
                return loss_fn(net, batch)
            records = start_recording(net) if jac_reg.active else []
            value, metrics = loss_fn(net, batch)
            reg = jnp.zeros((), jnp.result_type(value))
            if jac_reg.active:
                reg = penalty(jac_reg, records, jax.random.fold_in(base_key, step)).astype(reg.dtype)
            return value + reg, {**metrics, "jac_reg": reg}

        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    def run_eval(step):
        nnx.update(model, params)
        record = {"step": step}
        for name, arrays in eval_data.items():
            record[name] = evaluate(model, arrays, batch_size=eval_batch_size, loss_fn=loss_fn)
        history.eval.append(record)
        return record

    def save(step):
        if ckpt is not None:
            leaves = jax.tree_util.tree_leaves((params, opt_state))
            _save(*ckpt, step, leaves, history, elapsed)

    bar = tqdm(total=steps, initial=start, disable=not progress, desc="train", dynamic_ncols=True)
    step = start
    t0 = time.perf_counter()
    try:
        while step < steps:
            idx = batch_indices(n, local_batch, step, seed=seed)
            batch = {k: v[idx] for k, v in data.items()}
            if mesh is not None:
                batch = shard_batch(batch, mesh, data_axis)
            params, opt_state, metrics = train_step(params, opt_state, batch, np.int32(step))
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == steps:
                record = {"step": step, "time": elapsed + time.perf_counter() - t0, **_host(metrics)}
                history.train.append(record)
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k not in ("step", "time")})
            if eval_data and eval_every is not None and step % eval_every == 0 and step != steps:
                run_eval(step)
            if checkpoint_every is not None and step % checkpoint_every == 0 and step != steps:
                elapsed, t0 = elapsed + time.perf_counter() - t0, time.perf_counter()
                save(step)
            if callback is not None:
                callback(step, metrics)
    except KeyboardInterrupt:
        elapsed += time.perf_counter() - t0
        t0 = time.perf_counter()
        save(step)
        raise
    finally:
        bar.close()
        nnx.update(model, params)
    elapsed += time.perf_counter() - t0
    if eval_data and (not history.eval or history.eval[-1]["step"] != steps):
        run_eval(steps)
    save(steps)
    return history
