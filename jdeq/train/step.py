"""The training step as a pure function: :class:`TrainState` and :func:`make_train_step`.

``fit`` is a driver around this step; users who write their own loop (as most flax and optax
users do) jit it and call it themselves::

    state = jdeq.train.TrainState.create(model, optimizer)
    train_step = jax.jit(jdeq.train.make_train_step(loss_fn, optimizer))
    for batch in batches:
        state, metrics = train_step(state, batch)
    nnx.update(model, state.params)

The step includes the non-finite skip rule of ``fit``: a step whose loss, gradients, updated
parameters or updated optimizer state hold a NaN/inf leaves the state as it was (only its step
counter advances) and reports ``metrics["skipped"] == 1.0``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jdeq.nnx import CachedFixedPoint
from jdeq.train.jacobian import JacReg, penalty, start_recording
from jdeq.train.sharding import optimizer_shardings, param_shardings, replicated

__all__ = ["TrainState", "all_finite", "make_train_step"]

# what a step may change besides the parameters: every other variable but the RNG keys
MUTABLE = nnx.All(nnx.Not(nnx.Param), nnx.Not(nnx.RngKey))


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What a training step reads and returns: a pytree (jit it, shard it, checkpoint it).

    Attributes:
      graphdef: the model's ``nnx.GraphDef`` (static: part of the tree's structure).
      params: the model's ``nnx.Param`` state (trained).
      rest: the model's other state: passed to the model, and what the model writes to it
        (RNG counters, so that dropout draws a new mask every step; warm-start caches,
        ``jdeq.nnx.CachedFixedPoint``; other non-parameter variables) is kept by the step,
        except on a skipped step. RNG keys themselves never change.
      opt_state: the optax state.
      step: int32 scalar, the number of steps taken (skipped ones included).

    Example:
      >>> import optax
      >>> from flax import nnx
      >>> state = TrainState.create(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), optax.sgd(0.1))
      >>> int(state.step), state.model().kernel.shape
      (0, (2, 3))
    """

    graphdef: Any
    params: Any
    rest: Any
    opt_state: Any
    step: jax.Array

    @classmethod
    def create(cls, model: nnx.Module, optimizer: optax.GradientTransformation) -> "TrainState":
        """The state at step 0 of ``model`` (its current values) and ``optimizer.init``.

        Args:
          model: an ``nnx.Module`` (not modified).
          optimizer: an optax ``GradientTransformation``.

        Returns:
          A :class:`TrainState`.

        Raises:
          ValueError: a parameter of ``model`` is non-finite (named in the message).
        """
        check_optimizer(optimizer)
        if not isinstance(model, nnx.Module):
            raise TypeError(f"`model` must be an nnx.Module, got {type(model).__name__}.")
        # a snapshot: nnx.split hands out the model's own Variables, which a later change of
        # the model (or of a module merged from this state) would change in place
        graphdef, params, rest = nnx.split(nnx.clone(model), nnx.Param, ...)
        if not bool(all_finite(params)):  # one reduction; names only on failure
            bad = [jax.tree_util.keystr(p, simple=True, separator=".").removesuffix(".value")
                   for p, x in jax.tree_util.tree_leaves_with_path(params) if not bool(jnp.all(jnp.isfinite(x)))]
            raise ValueError(f"`model` has non-finite (NaN/inf) parameters at {bad}; re-initialize them.")
        return cls(graphdef, params, rest, optimizer.init(params), jnp.zeros((), jnp.int32))

    def model(self) -> nnx.Module:
        """A new module holding a copy of this state's variables (``nnx.merge(..., copy=True)``):
        changing the module leaves the state as it was."""
        return nnx.merge(self.graphdef, self.params, self.rest, copy=True)

    def mutable(self):
        """The model state a step may change: every variable but the parameters and the RNG
        keys (RNG counters, warm-start caches, ...), an ``nnx.State`` (empty if none)."""
        return nnx.state(self.model(), MUTABLE)

    def with_mutable(self, mutable) -> "TrainState":
        """A copy whose :meth:`mutable` state is ``mutable`` (same structure)."""
        return self.replace(rest=_with_cache(self.graphdef, self.params, self.rest, mutable))

    def cache(self):
        """The warm-start caches of the model (its ``jdeq.nnx.CachedFixedPoint`` state, an
        ``nnx.State``; empty for a model without a ``jdeq.nnx.FixedPointCache``)."""
        return nnx.state(self.model(), CachedFixedPoint)

    def with_cache(self, cache) -> "TrainState":
        """A copy whose warm-start caches are ``cache`` (as returned by :meth:`cache`)."""
        return self.replace(rest=_with_cache(self.graphdef, self.params, self.rest, cache))

    def replace(self, **changes) -> "TrainState":
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def shardings(self, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh, *,
                  model_axis: str | None = None, min_shard_size: int | None = None) -> "TrainState":
        """The layout of ``fit(..., mesh=mesh)``: a :class:`TrainState` of ``NamedSharding`` s.

        Parameters are replicated, or those of at least ``min_shard_size`` elements split along
        ``model_axis`` (:func:`jdeq.train.param_shardings`); the optimizer state follows them
        (:func:`jdeq.train.optimizer_shardings`); the rest and the step are replicated. Use it
        as ``jax.device_put(state, sh)`` and as ``jax.jit``'s ``in_shardings``/``out_shardings``.

        Args:
          optimizer: the optimizer that made ``opt_state``.
          mesh: the mesh.
          model_axis: the mesh axis large weights are split along (None: all replicated).
          min_shard_size: the smallest parameter split (default ``jdeq.train.MIN_SHARD_SIZE``).

        Returns:
          A :class:`TrainState` whose leaves are shardings.
        """
        kw = {} if min_shard_size is None else {"min_size": min_shard_size}
        param_sh = param_shardings(self.params, mesh, model_axis=model_axis, **kw)
        rep = replicated(mesh)
        return TrainState(self.graphdef, param_sh, jax.tree.map(lambda _: rep, self.rest),
                          optimizer_shardings(optimizer, self.opt_state, param_sh, mesh), rep)


jax.tree_util.register_dataclass(
    TrainState, data_fields=["params", "rest", "opt_state", "step"], meta_fields=["graphdef"]
)


def _with_cache(graphdef, params, rest, cache):
    """``rest`` with the entries of ``cache`` (a sub-state of it: caches, or all of
    :data:`MUTABLE`) replaced."""
    if not jax.tree_util.tree_leaves(cache):
        return rest
    net = nnx.merge(graphdef, params, rest, copy=True)  # the caller's state stays as it was
    nnx.update(net, cache)
    return nnx.split(net, nnx.Param, ...)[2]


def all_finite(tree) -> jax.Array:
    """Whether every entry of every leaf of ``tree`` is finite (a scalar bool array).

    Example:
      >>> bool(all_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.nan])}))
      False
    """
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def check_optimizer(optimizer) -> None:
    """Raises ``TypeError`` unless ``optimizer`` has optax's ``init`` and ``update``."""
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"`optimizer` must be an optax GradientTransformation, got {optimizer!r}.")


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    jac_reg: JacReg | None = None,
    key: jax.Array | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """A pure training step ``train_step(state, batch) -> (state, metrics)`` to jit and loop.

    One step: ``jax.value_and_grad`` of ``loss_fn`` at ``state.params``, the optax update, and
    the skip rule: if the loss, the gradients, the updated parameters or the updated optimizer
    state hold a NaN/inf, the parameters and optimizer state stay as they were (a
    ``jnp.where`` select, so they are never non-finite; unlike ``optax.apply_if_finite`` it
    never accepts a non-finite update and keeps the optimizer state's structure) and
    ``metrics["skipped"]`` is 1.0 (else 0.0). ``state.step`` advances either way. This is the
    step ``jdeq.train.fit`` runs, so a loop over it with fit's batches
    (:func:`jdeq.train.batch_indices`) reaches fit's parameters. The model's warm-start caches
    (``jdeq.nnx.FixedPointCache``, filled by ``deq(x, index=batch["index"])`` in ``loss_fn``)
    are returned updated in ``state.rest`` (kept as they were on a skipped step); the rest of
    ``state.rest`` is passed through unchanged.

    Args:
      loss_fn: ``loss_fn(model, batch) -> (loss, metrics)`` with ``model`` an ``nnx.Module``
        (e.g. :func:`jdeq.train.classification_loss`).
      optimizer: an optax ``GradientTransformation`` (the one that made ``state.opt_state``).
      jac_reg: a :class:`jdeq.train.JacReg` adding the Jacobian penalty of each
        ``jdeq.nnx.DEQ`` of the model to the loss (logged as ``metrics["jac_reg"]``).
      key: the random key of the penalty (step ``k`` uses ``jax.random.fold_in(key, k)``;
        default ``jax.random.key(0)``).

    Returns:
      ``train_step(state, batch) -> (new_state, metrics)``: pure, jit-able (also with
      shardings, see :meth:`TrainState.shardings`); ``metrics`` holds ``loss_fn``'s metrics
      and ``"skipped"`` as device scalars.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> def loss_fn(model, batch):
      ...     loss = jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
      ...     return loss, {"loss": loss}
      >>> opt = optax.sgd(0.1)
      >>> state = TrainState.create(nnx.Linear(2, 1, rngs=nnx.Rngs(0)), opt)
      >>> train_step = jax.jit(make_train_step(loss_fn, opt))
      >>> batch = {"x": jnp.ones((4, 2)), "y": jnp.zeros((4, 1))}
      >>> for _ in range(3):
      ...     state, metrics = train_step(state, batch)
      >>> int(state.step), float(metrics["skipped"])
      (3, 0.0)
      >>> state, metrics = train_step(state, {"x": jnp.full((4, 2), jnp.inf), "y": batch["y"]})
      >>> int(state.step), float(metrics["skipped"])  # skipped: the parameters did not move
      (4, 1.0)
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable as loss_fn(model, batch), got {loss_fn!r}.")
    check_optimizer(optimizer)
    if jac_reg is not None and not isinstance(jac_reg, JacReg):
        raise TypeError(f"`jac_reg` must be None or a jdeq.train.JacReg, got {jac_reg!r}.")
    base_key = jax.random.key(0) if key is None else key

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        def loss(params):
            # copies: the model's state may be mutated in here (a FixedPointCache writes z*), and
            # variables rebuilt by jit's trace cannot be mutated from the gradient's trace level
            net = nnx.merge(state.graphdef, params, state.rest, copy=True)
            if jac_reg is None:
                value, metrics = loss_fn(net, batch)
                return value, (metrics, nnx.state(net, MUTABLE))
            records = start_recording(net) if jac_reg.active else []
            value, metrics = loss_fn(net, batch)
            reg = jnp.zeros((), jnp.result_type(value))
            if jac_reg.active:
                reg = penalty(jac_reg, records, jax.random.fold_in(base_key, state.step)).astype(reg.dtype)
            return value + reg, ({**metrics, "jac_reg": reg}, nnx.state(net, MUTABLE))

        (value, (metrics, mutable)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        ok = jnp.isfinite(value) & all_finite((grads, new_params, new_opt_state))
        params, opt_state = optax.tree.where(ok, (new_params, new_opt_state), (state.params, state.opt_state))
        rest = state.rest
        if jax.tree_util.tree_leaves(mutable):  # a skipped step keeps RNG counters and caches as they were
            rest = _with_cache(state.graphdef, state.params, rest, optax.tree.where(ok, mutable, state.mutable()))
        new_state = state.replace(params=params, opt_state=opt_state, rest=rest, step=state.step + 1)
        return new_state, {**metrics, "skipped": jnp.where(ok, 0.0, 1.0)}

    return train_step
