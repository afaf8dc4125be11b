"""A small, general optax training loop for jdeq models (and any ``nnx.Module``).

The pieces, each usable on its own:

- :func:`make_train_step` and :class:`TrainState` (module :mod:`jdeq.train.step`): the pure
  training step (``jax.value_and_grad``, optax update, the non-finite skip rule) to jit and
  drive in a loop of your own; :func:`all_finite`.
- :func:`fit`: a short driver over these pieces that trains a model in place: a tqdm progress
  bar, periodic evaluation, metrics including the solver's stats, skipped-step counting, and
  checkpoint/resume (an interrupted run resumes at the step it stopped at and ends with the same
  parameters as an uninterrupted run).
- :func:`save_checkpoint`, :func:`restore_checkpoint`, :func:`checkpoint_steps` (module
  :mod:`jdeq.train.checkpoint`): atomic orbax checkpoints of any pytree with a checksum per
  array, falling back to the previous good checkpoint (the bad one moved to ``corrupt/``);
  orbax is imported on first use.
- :func:`evaluate`: mean metrics of a loss function over a dataset (jit-compiled, batched).
- :func:`predict`: per-example outputs (logits and ``jdeq.SolverStats``) over a dataset; call
  options such as ``maxiter=`` are run-time values (no recompile between budgets).
- Amortized warm starts: a model holding a ``jdeq.nnx.FixedPointCache`` (``jdeq.nnx.DEQ(...,
  cache=...)``) and called with ``index=batch["index"]`` starts each example's solve from its
  fixed point at its previous visit; :func:`make_train_step` returns the updated cache (in
  ``TrainState.rest``) and :func:`fit` checkpoints it (give ``data["index"] = np.arange(n)``).
- :func:`batches` / :func:`batch_indices`: the deterministic shuffled batch stream (the batch
  at step ``k`` depends only on ``(seed, k)``, which is what makes resuming exact).
- :func:`classification_loss`, :func:`solver_metrics`, :func:`split_output`: the default
  loss and its metrics; :func:`count_params`.
- :class:`Pretrain`: the ``fit(..., pretrain=...)`` option running the first steps with every
  ``jdeq.nnx.DEQ`` unrolled to a fixed depth (the unrolled pre-training of Bai et al. 2020).
- :class:`JacReg`: the ``fit(..., jac_reg=...)`` (and ``make_train_step``) option adding the
  Jacobian penalty ``gamma * ||df/dz||_F^2`` at ``z*`` of Bai et al. 2021 to the loss, every
  step or with a probability per step.
- :func:`data_mesh`, :func:`model_mesh`, :func:`shard_batch`, :func:`replicate`,
  :func:`param_shardings`, :func:`training_mesh`, :func:`host_shard` (module :mod:`jdeq.train.sharding`):
  data-parallel training on a ``jax.sharding.Mesh`` via ``fit(..., mesh=...)``, optionally
  with large weights split along a model axis (``model_axis=``), one host or many
  (``jax.distributed.initialize()``); ``evaluate`` and ``predict`` take the same options.

Conventions: a *model* is an ``nnx.Module`` whose call returns ``logits`` or ``(logits,
stats)`` with ``stats`` a ``jdeq.SolverStats`` (or None); *data* is a mapping of arrays sharing
a leading axis (``{"inputs": ..., "labels": ...}`` for the default loss); a *loss function*
is ``loss_fn(model, batch) -> (scalar loss, dict of scalar metrics)``.

Example:
  >>> import optax, jdeq
  >>> from flax import nnx
  >>> from jdeq.data import arithmetic
  >>> from jdeq.models.transformer import TiedTransformerClassifier
  >>> data = arithmetic.generate(256, length=8, max_depth=1).arrays()
  >>> model = TiedTransformerClassifier(16, 10, length=8, features=16, num_heads=2,
  ...                                   rngs=nnx.Rngs(0))
  >>> history = jdeq.train.fit(model, optax.adam(1e-3), data, steps=5, batch_size=32,
  ...                          progress=False)
  >>> sorted(history.train[-1])[:3]
  ['abs_residual', 'accuracy', 'converged']
"""

from jdeq.train.batches import batch_indices, batches
from jdeq.train.checkpoint import Checkpoint, CheckpointError, checkpoint_steps, restore_checkpoint, save_checkpoint
from jdeq.train.evaluation import evaluate, predict
from jdeq.train.jacobian import JacReg
from jdeq.train.loop import History, fit
from jdeq.train.losses import classification_loss, count_params, solver_metrics, split_output
from jdeq.train.pretrain import Pretrain
from jdeq.train.sharding import (
    MIN_SHARD_SIZE,
    batch_sharding,
    data_mesh,
    global_array,
    host_shard,
    host_value,
    model_mesh,
    optimizer_shardings,
    param_shardings,
    replicate,
    replicated,
    shard_batch,
    training_mesh,
)
from jdeq.train.step import TrainState, all_finite, make_train_step

__all__ = [
    "MIN_SHARD_SIZE",
    "Checkpoint",
    "CheckpointError",
    "History",
    "JacReg",
    "Pretrain",
    "TrainState",
    "all_finite",
    "batch_indices",
    "batch_sharding",
    "batches",
    "checkpoint_steps",
    "classification_loss",
    "count_params",
    "data_mesh",
    "evaluate",
    "fit",
    "global_array",
    "host_shard",
    "host_value",
    "make_train_step",
    "model_mesh",
    "optimizer_shardings",
    "param_shardings",
    "predict",
    "replicate",
    "replicated",
    "restore_checkpoint",
    "save_checkpoint",
    "shard_batch",
    "solver_metrics",
    "split_output",
    "training_mesh",
]
