"""Data-parallel DEQ training on a ``jax.sharding.Mesh`` (one host or many).

jdeq adds no distribution machinery of its own: the batch is a global ``jax.Array`` sharded
along one mesh axis with a ``NamedSharding``, the parameters and optimizer state are replicated,
and the jitted step carries those shardings as ``in_shardings``/``out_shardings``. XLA's SPMD
partitioner then runs every example's solve on the device holding it (the solver's batched
loop has no cross-example work), with no gather of the batch and no host synchronization. The
only collective per solver iteration is the global stop test ``any(active)`` of the
``lax.while_loop`` (one all-reduce of a boolean); the gradient all-reduce comes once per step.

Single host, several devices (GPUs, a TPU board, or ``XLA_FLAGS=
--xla_force_host_platform_device_count=8`` on CPU, set before ``jax`` is imported)::

    mesh = jdeq.train.data_mesh()          # all devices on one axis named "data"
    jdeq.train.fit(model, optax.adam(1e-3), data, steps=1000, batch_size=256, mesh=mesh)

Multi-host (a TPU pod slice, multi-node GPU): start the same program on every host, call
``jax.distributed.initialize()`` first (arguments are auto-detected on Cloud TPU and under
SLURM/Open MPI; otherwise pass ``coordinator_address``, ``num_processes``, ``process_id``),
then give each host its own disjoint shard of the training set::

    jax.distributed.initialize()
    mesh = jdeq.train.data_mesh()          # jax.devices(): every device of every host
    local = load_my_shard(jax.process_index(), jax.process_count())   # disjoint rows
    jdeq.train.fit(model, optax.adam(1e-3), local, steps=1000, batch_size=1024, mesh=mesh)

``batch_size`` is global: each host draws ``batch_size // jax.process_count()`` rows of its own
shard per step (the batch stream of :func:`jdeq.train.batch_indices` with the same seed, on the
local data) and :func:`shard_batch` assembles the global array with
``jax.make_array_from_process_local_data``; no host ever holds the global batch. Every host
must build the model with the same seed (identical initial parameters). Evaluation inside
``fit`` and checkpoints are host-local conveniences; for multi-host runs evaluate on each
host's shard and pass ``checkpoint_dir`` on a shared file system (orbax coordinates the hosts).

Example:
  >>> import jax, jdeq
  >>> mesh = jdeq.train.data_mesh()
  >>> x = jdeq.train.shard_batch({"x": jax.numpy.ones((jax.device_count() * 2, 3))}, mesh)["x"]
  >>> x.sharding.spec
  P('data',)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["batch_sharding", "check_mesh", "data_mesh", "replicate", "replicated", "shard_batch"]


def data_mesh(devices: Sequence[jax.Device] | None = None, *, axis: str = "data") -> Mesh:
    """A one-axis mesh over ``devices`` (default: ``jax.devices()``, all hosts' devices).

    Args:
      devices: the devices, in mesh order.
      axis: the axis name the batch is sharded along.

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(len(devices),)``.
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis,))


def check_mesh(mesh: Any, axis: str, batch_size: int | None = None) -> None:
    """Raises a clear error unless ``mesh`` is a ``Mesh`` with ``axis`` dividing ``batch_size``."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axis not in mesh.shape:
        raise ValueError(f"`data_axis`={axis!r} is not an axis of `mesh` (axes {tuple(mesh.shape)}).")
    if batch_size is not None:
        size = mesh.shape[axis]
        if batch_size % size:
            raise ValueError(
                f"`batch_size`={batch_size} must be a multiple of the {size} devices of mesh axis {axis!r}."
            )
        if batch_size % jax.process_count():
            raise ValueError(f"`batch_size`={batch_size} must be a multiple of the {jax.process_count()} processes.")


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """``NamedSharding`` splitting the leading (batch) axis over ``axis``; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """``NamedSharding`` holding a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
    """Places every leaf of ``tree`` (parameters, optimizer state) on all devices of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, axis: str = "data") -> dict[str, jax.Array]:
    """Assembles global arrays sharded along ``axis`` from this process's rows of the batch.

    With one process ``batch`` is the whole batch; with several, each process passes its own
    ``global_batch / jax.process_count()`` rows (``jax.make_array_from_process_local_data``),
    which land on its local devices without any cross-host copy.

    Args:
      batch: a mapping of arrays sharing a leading axis (this process's rows).
      mesh: the mesh.
      axis: the mesh axis the batch is split along.

    Returns:
      ``{key: jax.Array}`` of global shape ``(local_rows * process_count, ...)``.
    """
    sharding = batch_sharding(mesh, axis)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out
