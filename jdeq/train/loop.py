"""``fit`` (the training loop), ``evaluate`` and ``predict``."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jdeq.train.batches import batch_indices, check_run_options, data_size, inputs_size
from jdeq.train.jacobian import JacReg, find_deqs, penalty, start_recording
from jdeq.train.losses import classification_loss, split_output
from jdeq.train.sharding import (
    MIN_SHARD_SIZE,
    batch_sharding,
    check_mesh,
    global_array,
    optimizer_shardings,
    param_shardings,
    replicate,
    replicated,
    shard_batch,
)

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
    return {k: float(_host_array(v)) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- evaluation


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
        state = jax.device_put(state, param_shardings(state, mesh, model_axis=model_axis, min_size=min_shard_size))
    return graphdef, state


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
    """
    check_run_options(batch_size, call_kwargs, loss_fn=loss_fn)
    n = data_size(data)
    graphdef, state = _place_state(model, mesh, data_axis, model_axis, min_shard_size)
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
        m = _host(_eval_batch(graphdef, loss_fn, state, batch, call_kwargs, out_sharding))
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
      >>> logits, stats = predict(model, data.tokens, maxiter=16)  # doctest: +SKIP
      >>> correct = logits.argmax(-1) == data.labels                 # doctest: +SKIP
    """
    check_run_options(batch_size, call_kwargs)
    n = inputs_size(inputs)
    graphdef, state = _place_state(model, mesh, data_axis, model_axis, min_shard_size)
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
        out = jax.tree_util.tree_map(_host_array, _apply(graphdef, state, chunk, call_kwargs, out_sharding))
        outs.append(jax.tree_util.tree_map(lambda x: x[: min(size, n - start)], out))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *outs)


# ----------------------------------------------------------------------------- checkpoints
#
# Atomic writes: orbax's CheckpointManager writes step k into a temporary directory
# "k.orbax-checkpoint-tmp-<timestamp>", writes "commit_success.txt" into it once every item is
# on disk, and only then renames it to "k" (orbax.checkpoint._src.path.atomicity:
# AtomicRenameTemporaryPath.finalize, the default on local file systems; where renames are not
# atomic, e.g. object stores, CommitFileTemporaryPath makes the commit file the marker). A
# process killed mid-save leaves only the temporary directory, which the manager never lists
# as a step and removes (cleanup_tmp_directories=True); we warn about it first.
# Verified reads: orbax can restore a garbled array file without error, so each checkpoint's
# JSON meta also holds every leaf's shape, dtype and CRC-32 of its bytes (computed on the host
# at save time: one pass at memory speed, small beside the write), and _restore_latest checks
# the commit marker, that orbax reads the checkpoint, and the checksums, then falls back to the
# previous checkpoint (of _KEEP kept) when one fails, moving the bad one aside.

_KEEP = 3  # checkpoints kept, so that a bad latest one has good predecessors
_COMMIT = "commit_success.txt"  # orbax's commit marker (atomicity_types.COMMIT_SUCCESS_FILE)
_BAD = "corrupt"  # subfolder of the checkpoint directory the bad checkpoints are moved to


def _manager(directory):
    import orbax.checkpoint as ocp  # imported lazily: orbax is slow to import

    directory = os.path.abspath(os.fspath(directory))
    if os.path.isdir(directory):
        for tmp in ocp.step.all_temporary_paths(directory):
            name = tmp.get().name
            warnings.warn(
                f"checkpoint_dir {directory!r}: ignoring the unfinished checkpoint of step "
                f"{ocp.step.step_from_checkpoint_name(name)} ({name}; the run was stopped while "
                "saving it); it is removed and the previous checkpoint is used.",
                RuntimeWarning, stacklevel=3,
            )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=_KEEP, enable_async_checkpointing=False, cleanup_tmp_directories=True
    )
    return ocp, ocp.CheckpointManager(directory, options=options)


def _host_array(x) -> np.ndarray:
    # A replicated array spread over several processes is not fully addressable: any local
    # shard holds all of it.
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))


def _fingerprint(leaves) -> list[dict]:
    """Shape, dtype and CRC-32 of each leaf's bytes (C order), for verifying a restore."""
    out = []
    for x in leaves:
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.sharding.is_fully_replicated:
            # split over processes: no process sees all of it (shape and dtype still checked)
            out.append({"shape": list(x.shape), "dtype": str(np.dtype(x.dtype)), "crc32": None})
            continue
        a = np.require(_host_array(x), requirements="C")  # (ascontiguousarray makes 0-d 1-d)
        out.append({"shape": list(a.shape), "dtype": str(a.dtype), "crc32": zlib.crc32(a.reshape(-1).view(np.uint8))})
    return out


def _save(ocp, manager, step: int, leaves, history: History, elapsed: float, skips: dict) -> None:
    if step in manager.all_steps():  # already saved (e.g. interrupted just after a periodic save)
        return
    meta = {"train": history.train, "eval": history.eval, "elapsed": elapsed, "step": step,
            "skips": skips, "leaves": _fingerprint(leaves)}
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"leaves": list(leaves)}),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )
    manager.wait_until_finished()


class _Bad(Exception):
    """A checkpoint that cannot be used (the message says why)."""


def _restore(ocp, manager, step: int, leaves):
    """Reads and verifies checkpoint ``step``; returns ``(leaves, meta)``.

    Raises:
      _Bad: the checkpoint is unfinished, unreadable or fails its checksums.
      ValueError: it is sound but holds another model's (or optimizer's) state.
    """
    path = manager.directory / ocp.step.standard_name_format().build_name(step)
    if not (path / _COMMIT).exists():
        raise _Bad(f"no commit marker {_COMMIT} (unfinished write)")
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        expected = [(tuple(e["shape"]), str(e["dtype"]), None if e["crc32"] is None else int(e["crc32"]))
                    for e in meta["leaves"]]
        history = (list(meta["train"]), list(meta["eval"]), float(meta["elapsed"]))
    except Exception as e:  # noqa: BLE001 - any failure to read the JSON meta means a bad checkpoint
        raise _Bad(f"unreadable meta ({type(e).__name__}: {e})") from e
    wanted = [(tuple(np.shape(x)), str(np.dtype(x.dtype))) for x in leaves]
    if [e[:2] for e in expected] != wanted:
        raise ValueError(
            f"`checkpoint_dir` {str(manager.directory)!r} holds, at step {step}, the state of another "
            f"model or optimizer ({len(expected)} arrays of other shapes/dtypes than the "
            f"{len(wanted)} of this one): use another directory for this run."
        )
    abstract = {"leaves": [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]}
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        restored = restored["state"]["leaves"]
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds on damaged files
        raise _Bad(f"unreadable arrays ({type(e).__name__}: {str(e)[:200]})") from e
    for i, (got, want) in enumerate(zip(_fingerprint(restored), expected)):
        if (tuple(got["shape"]), got["dtype"]) != want[:2] or (want[2] is not None and got["crc32"] != want[2]):
            raise _Bad(f"checksum mismatch in array {i} of {len(expected)}")
    return restored, {"train": history[0], "eval": history[1], "elapsed": history[2], "skips": meta.get("skips")}


def _restore_latest(ocp, manager, leaves):
    """The newest checkpoint that passes :func:`_restore`, as ``(step, leaves, meta)``.

    Each bad one met on the way is reported (a warning naming its step and the reason) and
    moved to the ``corrupt/`` subfolder (so that the run can write that step again). Returns
    None, after a warning if there were bad ones, when no checkpoint is usable: the run starts
    from step 0.
    """
    bad = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored, meta = _restore(ocp, manager, step, leaves)
        except _Bad as e:
            bad.append(step)
            path = manager.directory / ocp.step.standard_name_format().build_name(step)
            dest = manager.directory / _BAD / f"{path.name}-{time.time_ns()}"
            if jax.process_index() == 0:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
            manager.reload()
            warnings.warn(
                f"checkpoint_dir {str(manager.directory)!r}: the checkpoint of step {step} is "
                f"corrupt ({e}); moved to {str(dest)!r}, trying the previous one.",
                RuntimeWarning, stacklevel=3,
            )
            continue
        return step, restored, meta
    if bad:
        warnings.warn(
            f"checkpoint_dir {str(manager.directory)!r}: no usable checkpoint (steps {bad} were "
            "corrupt): training starts again from step 0.",
            RuntimeWarning, stacklevel=3,
        )
    return None


# ----------------------------------------------------------------------------- training


def _all_finite(tree) -> jax.Array:
    """Whether every entry of every leaf of ``tree`` is finite (a scalar bool)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


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
            if float(_host_array(flag)) > 0:
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
) -> History:
    """Trains ``model``'s ``nnx.Param`` s in place for ``steps`` optimizer steps.

    One jit-compiled step (forward, ``jax.value_and_grad``, optax update) runs on the
    deterministic batch stream of :func:`batch_indices`. Metrics stay on the device and are
    fetched every ``log_every`` steps (no host round-trip per step).

    Checkpoint/resume: with ``checkpoint_dir``, the parameters, the optimizer state and the
    history are saved (orbax) every ``checkpoint_every`` steps, at the end, and when the run is
    interrupted (``KeyboardInterrupt``). A later call with the same directory restores the latest
    checkpoint and continues from its step; since the batch at step ``k`` depends only on
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
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"`seed` must be an int >= 0, got {seed!r}.")
    check_run_options(batch_size, {}, loss_fn=loss_fn)
    if max_skipped_steps is not None and (
        not isinstance(max_skipped_steps, int) or isinstance(max_skipped_steps, bool) or max_skipped_steps < 1
    ):
        raise ValueError(f"`max_skipped_steps` must be None or an int >= 1, got {max_skipped_steps!r}.")
    n = data_size(data)
    local_batch = batch_size
    if mesh is not None:
        check_mesh(mesh, data_axis, batch_size, model_axis=model_axis)
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
    if not bool(_all_finite(params)):  # one reduction; names only on failure
        bad = [jax.tree_util.keystr(p, simple=True, separator=".")
               for p, x in jax.tree_util.tree_leaves_with_path(params) if not bool(jnp.all(jnp.isfinite(x)))]
        raise ValueError(f"`model` has non-finite (NaN/inf) parameters at {bad}; re-initialize them.")
    opt_state = optimizer.init(params)
    history = History()
    start, elapsed, skip_state = 0, 0.0, None

    ckpt = None
    if checkpoint_dir is not None:
        ocp, manager = _manager(checkpoint_dir)
        ckpt = (ocp, manager)
        leaves, treedef = jax.tree_util.tree_flatten((params, opt_state))
        found = _restore_latest(ocp, manager, leaves)
        if found is not None:
            latest, restored, meta = found
            params, opt_state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in restored])
            history = History(train=list(meta["train"]), eval=list(meta["eval"]), resumed_from=int(latest))
            skip_state = meta.get("skips")
            start, elapsed = int(latest), float(meta["elapsed"])

    base_key = jax.random.key(seed)
    shardings = {}
    if mesh is not None:
        param_sh = param_shardings(params, mesh, model_axis=model_axis, min_size=min_shard_size)
        opt_sh = optimizer_shardings(optimizer, opt_state, param_sh, mesh)
        params, opt_state = jax.device_put((params, opt_state), (param_sh, opt_sh))
        rest = replicate(rest, mesh)
        rep, data_sh = replicated(mesh), batch_sharding(mesh, data_axis)
        shardings = {"in_shardings": (param_sh, opt_sh, data_sh, rep), "out_shardings": (param_sh, opt_sh, rep)}

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

        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite step is skipped (see `max_skipped_steps`): keep the old state.
        ok = jnp.isfinite(value) & _all_finite((grads, new_params, new_opt_state))
        params, opt_state = optax.tree.where(ok, (new_params, new_opt_state), (params, opt_state))
        return params, opt_state, {**metrics, "skipped": (~ok).astype(jnp.float32)}

    def run_eval(step):
        nnx.update(model, params)
        record = {"step": step}
        for name, arrays in eval_data.items():
            record[name] = evaluate(model, arrays, batch_size=eval_batch_size, loss_fn=loss_fn, mesh=mesh,
                                    data_axis=data_axis, model_axis=model_axis, min_shard_size=min_shard_size)
        history.eval.append(record)
        return record

    def save(step):
        if ckpt is not None:
            leaves = jax.tree_util.tree_leaves((params, opt_state))
            _save(*ckpt, step, leaves, history, elapsed, skips.state())

    skips = _SkipCounter(max_skipped_steps, skip_state)
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
            skips.push(step, metrics["skipped"])
            if step % log_every == 0 or step == steps:
                skipped = skips.flush()
                record = {"step": step, "time": elapsed + time.perf_counter() - t0, **_host(metrics),
                          "skipped": skipped}
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
