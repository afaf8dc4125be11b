"""A small, general optax training loop for jdeq models (and any ``nnx.Module``).

The pieces, each usable on its own:

- :func:`fit`: trains a model in place with an optax optimizer: one jit-compiled step, a
  tqdm progress bar, periodic evaluation, metrics including the solver's stats, and
  checkpoint/resume with orbax (an interrupted run resumes at the step it stopped at and ends
  with the same parameters as an uninterrupted run).
- :func:`evaluate`: mean metrics of a loss function over a dataset (jit-compiled, batched).
- :func:`predict`: per-example outputs (logits and ``jdeq.SolverStats``) over a dataset; call
  options such as ``maxiter=`` are run-time values (no recompile between budgets).
- :func:`batches` / :func:`batch_indices`: the deterministic shuffled batch stream (the batch
  at step ``k`` depends only on ``(seed, k)``, which is what makes resuming exact).
- :func:`classification_loss`, :func:`solver_metrics`, :func:`split_output`: the default
  loss and its metrics; :func:`count_params`.
- :class:`JacReg`: the ``fit(..., jac_reg=...)`` option adding the Jacobian penalty
  ``gamma * ||df/dz||_F^2`` at ``z*`` of Bai et al. 2021 to the loss, every step or with a
  probability per step.
- :func:`data_mesh`, :func:`model_mesh`, :func:`shard_batch`, :func:`replicate`,
  :func:`param_shardings`, :func:`host_shard` (module :mod:`jdeq.train.sharding`):
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
from jdeq.train.jacobian import JacReg
from jdeq.train.loop import History, evaluate, fit, predict
from jdeq.train.losses import classification_loss, count_params, solver_metrics, split_output
from jdeq.train.sharding import (
    MIN_SHARD_SIZE,
    batch_sharding,
    data_mesh,
    global_array,
    host_shard,
    model_mesh,
    optimizer_shardings,
    param_shardings,
    replicate,
    replicated,
    shard_batch,
)

__all__ = [
    "MIN_SHARD_SIZE",
    "History",
    "JacReg",
    "batch_indices",
    "batch_sharding",
    "batches",
    "classification_loss",
    "count_params",
    "data_mesh",
    "evaluate",
    "fit",
    "global_array",
    "host_shard",
    "model_mesh",
    "optimizer_shardings",
    "param_shardings",
    "predict",
    "replicate",
    "replicated",
    "shard_batch",
    "solver_metrics",
    "split_output",
]
