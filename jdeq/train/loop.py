"""``fit``: the training loop, a driver over the pieces of :mod:`jdeq.train`.

It composes :func:`jdeq.train.make_train_step` (the jitted step and its skip rule),
:func:`jdeq.train.batch_indices` (the batch stream), :func:`jdeq.train.evaluate` and
:mod:`jdeq.train.checkpoint` (verified checkpoints), and adds logging, a progress bar, the
skipped-step limit and resume.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jdeq import _validate as V
from jdeq.train.batches import batch_indices, check_run_options, data_size
from jdeq.train.checkpoint import restore_checkpoint, save_checkpoint
from jdeq.train.evaluation import evaluate, host_metrics
from jdeq.train.jacobian import JacReg, find_deqs
from jdeq.train.losses import classification_loss
from jdeq.train.pretrain import Pretrain
from jdeq.train.sharding import (MIN_SHARD_SIZE, batch_sharding, check_mesh, host_value, replicated, shard_batch,
                                 training_mesh)
from jdeq.train.step import TrainState, check_optimizer, make_train_step

__all__ = ["History", "fit"]


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


class _SkipCounter:
    """Host-side count of the steps :func:`fit` skipped for non-finite values.

    ``push`` hands in a step's device flag and reads the previous step's (ready or nearly so
    while the new step runs: no pipeline stall); ``flush`` reads the latest one too. Raises
    ``FloatingPointError`` once ``limit`` consecutive steps were skipped.
    """

    def __init__(self, limit: int | None, state: dict | None = None):
        state = state or {}
        self.limit, self.total = limit, int(state.get("total", 0))
        self.consecutive, self.first = int(state.get("consecutive", 0)), state.get("first")
        self.pending = None

    def state(self) -> dict:
        """The counts after every step so far (what a checkpoint stores)."""
        self.flush()
        return {"total": self.total, "consecutive": self.consecutive, "first": self.first}

    def push(self, step: int, flag) -> None:
        self.flush()
        self.pending = (step, flag)

    def flush(self) -> int:
        if self.pending is not None:
            (step, flag), self.pending = self.pending, None
            if float(host_value(flag)) > 0:
                self.total += 1
                self.consecutive += 1
                self.first = step if self.consecutive == 1 else self.first
                if self.limit is not None and self.consecutive >= self.limit:
                    raise FloatingPointError(
                        f"jdeq.train.fit: {self.consecutive} consecutive steps were skipped "
                        f"(steps {self.first}..{step}) because the loss, the gradients or the "
                        "updated parameters/optimizer state were non-finite (NaN/inf). The model "
                        "keeps its last finite parameters. Lower the learning rate, check the "
                        "data and the DEQ's stats (`nonfinite`), or raise `max_skipped_steps`."
                    )
            else:
                self.consecutive = 0
        return self.total


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
    max_skipped_steps: int | None = 20,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
    model_axis: str | None = None,
    min_shard_size: int = MIN_SHARD_SIZE,
    pretrain: Pretrain | None = None,
) -> History:
    """Trains ``model``'s ``nnx.Param`` s in place for ``steps`` optimizer steps.

    The jit-compiled step of :func:`jdeq.train.make_train_step` (forward,
    ``jax.value_and_grad``, optax update, non-finite skip rule) runs on the deterministic batch
    stream of :func:`batch_indices`: a loop of your own over those pieces reaches the same
    parameters. Metrics stay on the device and are fetched every ``log_every`` steps (no host
    round-trip per step).

    Checkpoint/resume: with ``checkpoint_dir``, the parameters, the optimizer state, the
    model's other changing state (RNG counters of dropout, warm-start caches of
    ``jdeq.nnx.FixedPointCache``, if any) and the history are saved (orbax) every
    ``checkpoint_every`` steps, at the end, and when the run is interrupted (``KeyboardInterrupt``). A later call with the same directory restores the latest
    checkpoint and continues from its step (see :mod:`jdeq.train.checkpoint`); since the batch at step ``k`` depends only on
    ``(seed, k)``, the result equals an uninterrupted run of ``steps`` steps (bitwise on the
    same backend, also after ``SIGKILL``: tests/test_resume.py). Writes are atomic (orbax
    writes a temporary directory, then renames it); the last 3 checkpoints are kept, each
    with a CRC-32 of every array. A checkpoint found unfinished, unreadable or failing its
    checksums is moved to ``checkpoint_dir/corrupt/`` with a ``RuntimeWarning`` naming its
    step, and the previous one is used (none usable: a warning, and the run starts from step
    0). A checkpoint of another model's shapes raises ``ValueError``.

    Args:
      model: an ``nnx.Module`` (updated in place).
      optimizer: an optax ``GradientTransformation``.
      data: training arrays sharing a leading axis, e.g. ``{"inputs": x, "labels": y}``. For
        amortized warm starts (a ``jdeq.nnx.FixedPointCache`` in the model), add the examples'
        indices as ``data["index"] = np.arange(n)`` (distinct, inside the cache's size; with
        several processes, the global indices before :func:`jdeq.train.host_shard`) and pass
        ``batch["index"]`` to the model in ``loss_fn`` (``deq(x, index=batch["index"])``).
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
      max_skipped_steps: a step whose loss, gradients, updated parameters or updated optimizer
        state hold a NaN/inf is skipped: parameters and optimizer state stay as they were (so
        they are never non-finite) and the step is counted, as ``"skipped"`` in every
        ``History.train`` record (steps skipped so far, carried across a resume by the
        checkpoint) and as the per-step flag ``metrics["skipped"]`` (1.0 or
        0.0) given to ``callback``. After ``max_skipped_steps`` consecutive skipped steps,
        ``fit`` raises ``FloatingPointError`` (the model keeps its last finite parameters)
        rather than spin. None: never raise. The skip is a ``jnp.where`` select on the
        optimizer's result, not ``optax.apply_if_finite``: that one accepts non-finite updates
        after its ``max_consecutive_errors``, tests the gradients only, and would change the
        optimizer state's structure (checkpoints, shardings). Each step's flag is read on the
        host one step late, while the next step runs (no pipeline stall), so the error comes at
        most one step after the limit.
      mesh: a ``jax.sharding.Mesh`` for data-parallel training (see
        :mod:`jdeq.train.sharding`): each batch is sharded along ``data_axis``, the parameters
        and optimizer state are replicated (or split along ``model_axis``), and the step is
        jitted with those in/out shardings.
        ``batch_size`` is global and must be a multiple of the axis size. With several
        processes (``jax.distributed``), ``data`` is this process's disjoint shard
        (:func:`jdeq.train.host_shard`) and each
        process draws ``batch_size // jax.process_count()`` rows of it per step. None: one device.
      data_axis: the mesh axis the batch is split along.
      model_axis: a second mesh axis to split large weights along (e.g. ``"model"`` of
        ``jdeq.train.model_mesh(4)``): every parameter of at least ``min_shard_size`` elements
        is split on a dimension divisible by the axis size, the optimizer state follows, the
        rest stays replicated (:func:`jdeq.train.param_shardings`). None: all replicated.
        With a mesh, the evaluation of ``eval_data`` runs on the mesh too (:func:`evaluate`).
      min_shard_size: the smallest parameter (in elements) split along ``model_axis``.
      pretrain: a :class:`Pretrain` to run the first ``pretrain.steps`` steps with every
        ``jdeq.nnx.DEQ`` of the model unrolled ``pretrain.depth`` times (the unrolled
        pre-training of Bai et al. 2020), the rest as equilibria. None: no pre-training.

    Returns:
      A :class:`History`.

    Example:
      >>> import numpy as np, optax
      >>> from flax import nnx
      >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
      >>> data = {"inputs": x, "labels": (x[:, 0] > 0).astype(np.int32)}
      >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
      >>> history = fit(model, optax.adam(1e-2), data, steps=20, batch_size=16, log_every=10,
      ...               progress=False)
      >>> [r["step"] for r in history.train]
      [10, 20]
    """
    n, local_batch = _check_fit_args(model, optimizer, data, steps, batch_size, loss_fn, seed, eval_data,
                                     eval_every, log_every, checkpoint_every, jac_reg, max_skipped_steps, mesh,
                                     data_axis, model_axis)
    if pretrain is not None and not isinstance(pretrain, Pretrain):
        raise TypeError(f"`pretrain` must be None or a jdeq.train.Pretrain, got {pretrain!r}.")
    data = {k: np.asarray(v) for k, v in data.items()}
    eval_data = dict(eval_data or {})
    if mesh is not None:
        mesh = training_mesh(mesh, model_axis)
    state = TrainState.create(model, optimizer)
    step_fn = make_train_step(loss_fn, optimizer, jac_reg=jac_reg, key=jax.random.key(seed))
    if mesh is None:
        train_step = jax.jit(step_fn)
    else:
        sh = state.shardings(optimizer, mesh, model_axis=model_axis, min_shard_size=min_shard_size)
        state = jax.device_put(state, sh)
        train_step = jax.jit(step_fn, in_shardings=(sh, batch_sharding(mesh, data_axis)),
                             out_shardings=(sh, replicated(mesh)))
    # Pre-training: the same step on the model's graph with its DEQ layers unrolled (the graph
    # is static in the state, so each phase compiles once); the arrays carry over unchanged.
    phases = {False: (state.graphdef, train_step)}
    if pretrain is not None:
        pre = pretrain.graphdef(model)
        phases[True] = (pre, jax.jit(step_fn) if mesh is None else jax.jit(
            step_fn, in_shardings=(sh.replace(graphdef=pre), batch_sharding(mesh, data_axis)),
            out_shardings=(sh.replace(graphdef=pre), replicated(mesh))))

    history, elapsed, skip_state = History(), 0.0, None
    if checkpoint_dir is not None:
        found = restore_checkpoint(checkpoint_dir, _saved(state))
        if found is not None:
            params, opt_state, *mutable = found.tree
            state = state.replace(params=params, opt_state=opt_state,
                                  step=jax.device_put(jnp.int32(found.step), state.step.sharding))
            if mutable:
                state = state.with_mutable(mutable[0])
            history = History(train=list(found.meta["train"]), eval=list(found.meta["eval"]),
                              resumed_from=found.step)
            elapsed, skip_state = float(found.meta["elapsed"]), found.meta.get("skips")

    def run_eval(step):
        nnx.update(model, state.params, state.mutable())
        record = {"step": step}
        for name, arrays in eval_data.items():
            record[name] = evaluate(model, arrays, batch_size=eval_batch_size, loss_fn=loss_fn, mesh=mesh,
                                    data_axis=data_axis, model_axis=model_axis, min_shard_size=min_shard_size)
        history.eval.append(record)

    def save(step):
        if checkpoint_dir is not None:
            meta = {"train": history.train, "eval": history.eval, "elapsed": elapsed, "skips": skips.state()}
            save_checkpoint(checkpoint_dir, step, _saved(state), meta=meta)

    skips = _SkipCounter(max_skipped_steps, skip_state)
    start = history.resumed_from or 0
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="train", dynamic_ncols=True)
    step, t0 = start, time.perf_counter()
    try:
        while step < steps:
            batch = {k: v[batch_indices(n, local_batch, step, seed=seed)] for k, v in data.items()}
            if mesh is not None:
                batch = shard_batch(batch, mesh, data_axis)
            graphdef, phase_step = phases[pretrain is not None and step < pretrain.steps]
            state, metrics = phase_step(state.replace(graphdef=graphdef), batch)
            step += 1
            bar.update(1)
            skips.push(step, metrics["skipped"])
            if step % log_every == 0 or step == steps:
                record = {"step": step, "time": elapsed + time.perf_counter() - t0, **host_metrics(metrics),
                          "skipped": skips.flush()}
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
        elapsed, t0 = elapsed + time.perf_counter() - t0, time.perf_counter()
        save(step)
        raise
    finally:
        bar.close()
        state = state.replace(graphdef=phases[False][0])
        nnx.update(model, state.params, state.mutable())
    elapsed += time.perf_counter() - t0
    if eval_data and (not history.eval or history.eval[-1]["step"] != steps):
        run_eval(steps)
    save(steps)
    return history


def _saved(state: TrainState) -> tuple:
    """What a checkpoint of ``fit`` holds: ``(params, opt_state)``, and the model's other
    changing state (:meth:`TrainState.mutable`: RNG counters, warm-start caches) as a third
    entry when the model has any, so that a resumed run draws the same dropout masks and starts
    from the same cached fixed points as an uninterrupted one."""
    mutable = state.mutable()
    if jax.tree_util.tree_leaves(mutable):
        return state.params, state.opt_state, mutable
    return state.params, state.opt_state


def _check_cache_index(model, data) -> None:
    """A clear error when ``data["index"]`` does not fit the model's warm-start caches."""
    from jdeq.nnx import FixedPointCache

    caches = [m for _, m in nnx.iter_graph(model) if isinstance(m, FixedPointCache)]
    if not caches or "index" not in data:
        return
    index = np.asarray(data["index"])
    if index.dtype.kind not in "iu" or index.ndim != 1:
        raise TypeError(f"`data['index']` must be a 1-D integer array of example indices, got {index.dtype} "
                        f"of shape {index.shape}.")
    if len(np.unique(index)) != len(index):
        raise ValueError("`data['index']` must hold distinct example indices (one per example).")
    for cache in caches:
        if index.min() < 0 or index.max() >= cache.num_examples:
            raise ValueError(
                f"`data['index']` runs over [{index.min()}, {index.max()}] but the model's FixedPointCache "
                f"holds {cache.num_examples} examples: build it with num_examples > {index.max()}."
            )


def _check_fit_args(model, optimizer, data, steps, batch_size, loss_fn, seed, eval_data, eval_every, log_every,
                    checkpoint_every, jac_reg, max_skipped_steps, mesh, data_axis, model_axis) -> tuple[int, int]:
    """Host-side checks of ``fit``'s arguments; returns ``(examples, rows per process per step)``."""
    for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        V.positive_int(value, name)
    for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every),
                        ("max_skipped_steps", max_skipped_steps)):
        V.positive_int(value, name, none=True)
    check_optimizer(optimizer)
    V.nonnegative_int(seed, "seed")
    check_run_options(batch_size, {}, loss_fn=loss_fn)
    n = data_size(data)
    local_batch = batch_size
    if mesh is not None:
        check_mesh(mesh, data_axis, batch_size, model_axis=model_axis)
        local_batch = batch_size // jax.process_count()
    if local_batch > n:
        raise ValueError(f"`batch_size`={batch_size} exceeds the {n} training examples.")
    for name, arrays in (eval_data or {}).items():
        data_size(arrays, name=f"eval_data[{name!r}]")
    _check_cache_index(model, data)
    if jac_reg is not None:
        if not isinstance(jac_reg, JacReg):
            raise TypeError(f"`jac_reg` must be None or a jdeq.train.JacReg, got {jac_reg!r}.")
        if not find_deqs(model):
            raise ValueError(
                "`jac_reg` needs an equilibrium layer (jdeq.nnx.DEQ, jdeq.models.MonDEQ, ...) in "
                "the model; found none."
            )
    return n, local_batch
