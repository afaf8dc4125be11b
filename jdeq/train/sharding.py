"""DEQ training on a ``jax.sharding.Mesh``: data parallel, model-axis weight sharding, many hosts.

jdeq adds no distribution machinery of its own: the batch is a global ``jax.Array`` sharded
along one mesh axis with a ``NamedSharding``, the parameters and optimizer state are replicated
(or, with a model axis, their large weights split along it), and the jitted step carries those
shardings as ``in_shardings``/``out_shardings``. XLA's SPMD partitioner then runs every
example's solve on the devices holding it (the solver's batched loop has no cross-example
work), with no gather of the batch and no host synchronization.

**Data parallel.** The only collective per solver iteration is the global stop test
``any(active)`` of the ``lax.while_loop`` (one all-reduce of a boolean); the gradient all-reduce
comes once per step. Single host, several devices (GPUs, a TPU board, or ``XLA_FLAGS=
--xla_force_host_platform_device_count=8`` on CPU, set before ``jax`` is imported)::

    mesh = jdeq.train.data_mesh()          # all devices on one axis named "data"
    jdeq.train.fit(model, optax.adam(1e-3), data, steps=1000, batch_size=256, mesh=mesh)

**Model axis.** For cells too wide to replicate, a 2-D mesh ``("data", "model")`` and
``model_axis="model"`` split every parameter of at least ``min_shard_size`` elements along one
of its dimensions divisible by the model axis size (:func:`param_shardings`); the optimizer
state follows (:func:`optimizer_shardings`), the batch is split along ``"data"`` only::

    mesh = jdeq.train.model_mesh(4)        # (devices // 4) x 4, axes ("data", "model")
    jdeq.train.fit(model, opt, data, steps=1000, batch_size=256, mesh=mesh, model_axis="model")

Memory per device for the weights falls by the model axis size, but the solver loop now talks
every iteration: the partitioned matmul ``z @ W`` needs the state's features gathered (or the
partial products reduced) and the per-example residual norms sum over the split feature axis,
so each forward iteration has a few all-gathers/all-reduces over the model axis (counted in
``tests/test_sharding.py``; see ``benchmarks/scaling.py`` for the memory). Weights annotated by
the model itself (``nnx.with_partitioning``) keep their annotation.

**Multi-host** (a TPU pod slice, multi-node GPU): start the same program on every host, call
``jax.distributed.initialize()`` first (arguments are auto-detected on Cloud TPU and under
SLURM/Open MPI; otherwise pass ``coordinator_address``, ``num_processes``, ``process_id``),
then give each host its own disjoint shard of the training set (:func:`host_shard`)::

    jax.distributed.initialize()
    mesh = jdeq.train.data_mesh()          # jax.devices(): every device of every host
    local = jdeq.train.host_shard(load_training_set())   # this host's disjoint rows
    jdeq.train.fit(model, optax.adam(1e-3), local, steps=1000, batch_size=1024, mesh=mesh)

``batch_size`` is global: each host draws ``batch_size // jax.process_count()`` rows of its own
shard per step (the batch stream of :func:`jdeq.train.batch_indices` with the same seed, on the
local data) and :func:`shard_batch` assembles the global array with
``jax.make_array_from_process_local_data``; no host ever holds the global batch. Every host
must build the model with the same seed (identical initial parameters). With a mesh,
:func:`jdeq.train.evaluate` and :func:`jdeq.train.predict` (and the evaluation inside ``fit``)
expect the *same full* evaluation data on every host; their batches are sharded over the mesh
and their results are replicated, so every host reads them. Pass ``checkpoint_dir`` on a shared
file system for multi-host runs (orbax coordinates the hosts).

Example:
  >>> import jax, jdeq
  >>> mesh = jdeq.train.data_mesh()
  >>> x = jdeq.train.shard_batch({"x": jax.numpy.ones((jax.device_count() * 2, 3))}, mesh)["x"]
  >>> x.sharding.spec
  P('data',)
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jdeq import _validate as V

__all__ = [
    "MIN_SHARD_SIZE",
    "batch_sharding",
    "check_mesh",
    "data_mesh",
    "global_array",
    "host_shard",
    "host_value",
    "model_mesh",
    "optimizer_shardings",
    "param_shardings",
    "replicate",
    "replicated",
    "shard_batch",
]

MIN_SHARD_SIZE = 2**16
"""Default ``min_size``: parameters with fewer elements (a 256 x 256 matrix has this many) are
replicated even on a model axis (splitting them costs more communication than it saves)."""


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


def model_mesh(
    model: int,
    devices: Sequence[jax.Device] | None = None,
    *,
    data_axis: str = "data",
    model_axis: str = "model",
) -> Mesh:
    """A 2-D mesh ``(len(devices) // model, model)`` with axes ``(data_axis, model_axis)``.

    Consecutive devices share a model group (on real hardware, put the model axis on the
    fastest interconnect: ``jax.experimental.mesh_utils.create_device_mesh`` picks such an
    order; pass its flattened result as ``devices``).

    Args:
      model: size of the model axis; must divide the number of devices.
      devices: the devices (default: ``jax.devices()``).
      data_axis: name of the batch axis.
      model_axis: name of the weight-sharding axis.

    Returns:
      A ``jax.sharding.Mesh``.

    Example:
      >>> mesh = model_mesh(1)        # every device on "data", a model axis of size 1
      >>> tuple(mesh.axis_names)
      ('data', 'model')
    """
    devices = jax.devices() if devices is None else list(devices)
    if not V.is_int(model) or model < 1 or len(devices) % model:
        raise ValueError(f"`model` must be an int >= 1 dividing the {len(devices)} devices, got {model!r}.")
    return Mesh(np.asarray(devices).reshape(len(devices) // model, model), (data_axis, model_axis))


def check_mesh(mesh: Any, axis: str, batch_size: int | None = None, *, model_axis: str | None = None) -> None:
    """Raises a clear error unless ``mesh`` is a ``Mesh`` with ``axis`` dividing ``batch_size``
    (and ``model_axis``, if given, another of its axes)."""
    V.instance(mesh, "mesh", Mesh, "a jax.sharding.Mesh")
    if axis not in mesh.shape:
        raise ValueError(f"`data_axis`={axis!r} is not an axis of `mesh` (axes {tuple(mesh.shape)}).")
    if model_axis is not None:
        if model_axis not in mesh.shape:
            raise ValueError(f"`model_axis`={model_axis!r} is not an axis of `mesh` (axes {tuple(mesh.shape)}).")
        if model_axis == axis:
            raise ValueError(f"`model_axis` must differ from `data_axis` (both {axis!r}).")
    if batch_size is not None:
        size = mesh.shape[axis]
        if batch_size % size:
            raise ValueError(
                f"`batch_size`={batch_size} must be a multiple of the {size} devices of mesh axis {axis!r}."
            )
        if batch_size % jax.process_count():
            raise ValueError(f"`batch_size`={batch_size} must be a multiple of the {jax.process_count()} processes.")


def training_mesh(mesh: Mesh, model_axis: str | None) -> Mesh:
    """``mesh`` with ``model_axis`` turned into an Auto axis (every other axis as it was).

    Under Explicit axes, JAX types every array by its sharding and asks the code to say how a
    contraction over a sharded axis is laid out (``out_sharding=``). ``fit`` chooses where the
    weights are split along ``model_axis`` (:func:`param_shardings`), so the model's code
    cannot know it: the model axis is run as an Auto axis, where XLA places the all-gathers
    and reductions of the split matmuls, while the data axis keeps the type the user gave it
    (an Explicit data axis stays Explicit). Without a model axis, ``mesh`` is returned as is.

    Args:
      mesh: the user's mesh.
      model_axis: the weight-splitting axis (or None).

    Returns:
      A mesh over the same devices and axis names.

    Example:
      >>> import jax
      >>> from jax.sharding import AxisType
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
      >>> training_mesh(mesh, "model").axis_types
      (Explicit, Auto)
    """
    types = tuple(AxisType.Auto if name == model_axis else t for name, t in zip(mesh.axis_names, mesh.axis_types))
    if types == tuple(mesh.axis_types):  # no model axis, one the mesh lacks, or Auto already
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=types)


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """``NamedSharding`` splitting the leading (batch) axis over ``axis``; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """``NamedSharding`` holding a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
    """Places every leaf of ``tree`` (parameters, optimizer state) on all devices of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def _split_spec(shape: tuple[int, ...], size: int, axis: str, min_size: int) -> PartitionSpec:
    """The size rule of :func:`param_shardings` for one array."""
    if size <= 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    # the largest dimension divisible by the axis size; ties go to the last (a Linear kernel
    # (in, out) then splits its outputs: "column parallel")
    candidates = [(d, i) for i, d in enumerate(shape) if d % size == 0 and d >= size]
    if not candidates:
        return PartitionSpec()
    _, dim = max(candidates)
    return PartitionSpec(*([None] * dim + [axis]))


def _annotation(variable: nnx.Variable) -> tuple | None:
    """The partition names of an ``nnx.with_partitioning`` variable (None if unannotated): flax
    keeps them as ``out_sharding`` (0.12.4 and later) or ``sharding_names`` (0.12.1-0.12.3)."""
    meta = variable.get_metadata()
    names = meta.get("out_sharding", meta.get("sharding_names"))
    return tuple(names) if names is not None else None


def param_shardings(tree, mesh: Mesh, *, model_axis: str | None = "model", min_size: int = MIN_SHARD_SIZE):
    """A ``NamedSharding`` per array of ``tree``: large weights split along ``model_axis``.

    The rule, per array: a variable annotated by its model (``nnx.with_partitioning``, i.e. an
    ``out_sharding`` metadata entry) keeps its annotation, restricted to the axes of ``mesh``;
    otherwise an array with at least ``min_size`` elements is split along ``model_axis`` on
    its largest dimension divisible by the axis size (ties: the last one); everything else
    (biases, small or indivisible weights, scalars, RNG state) is replicated. With
    ``model_axis=None`` (or absent from ``mesh``, or of size 1) everything is replicated.
    No dimension is ever split along the data axis: parameters are shared by all examples.

    Args:
      tree: a pytree of arrays or an ``nnx.State`` (its ``nnx.Variable`` s keep their place,
        holding a sharding instead of the array, so the result fits ``jax.jit``'s
        ``in_shardings`` and ``jax.device_put``).
      mesh: the mesh.
      model_axis: the mesh axis weights are split along.
      min_size: the smallest number of elements worth splitting.

    Returns:
      A pytree of ``NamedSharding`` of the structure of ``tree``.

    Example:
      >>> import jax.numpy as jnp
      >>> mesh = model_mesh(1)
      >>> sh = param_shardings({"W": jnp.zeros((4, 4)), "b": jnp.zeros(4)}, mesh, min_size=8)
      >>> sh["W"].spec                # the model axis has size 1 here: nothing to split
      P()
    """
    V.nonnegative_int(min_size, "min_size")
    size = mesh.shape.get(model_axis, 1)  # 1 for None or an axis the mesh lacks

    def one(x):
        if isinstance(x, nnx.Variable):
            names = _annotation(x)
            if names is not None:
                spec = PartitionSpec(*(n if n in mesh.shape else None for n in names))
            else:
                spec = _split_spec(np.shape(x.get_value()), size, model_axis, min_size)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, _split_spec(np.shape(x), size, model_axis, min_size))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def optimizer_shardings(optimizer: optax.GradientTransformation, opt_state, shardings, mesh: Mesh):
    """Shardings of an optax state whose parameter-shaped parts follow ``shardings``.

    Moments and other copies of the parameter tree (found with ``optax.tree_map_params``)
    take the parameters' shardings; counts, scalars and the rest are replicated.

    Args:
      optimizer: the optax transformation that made ``opt_state``.
      opt_state: ``optimizer.init(params)``.
      shardings: the parameters' shardings (:func:`param_shardings`).
      mesh: the mesh.

    Returns:
      A pytree of ``NamedSharding`` matching ``opt_state``.
    """
    rep = replicated(mesh)
    return optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, opt_state, shardings,
        transform_non_params=lambda _: rep,
    )


def host_shard(data, *, process_index: int | None = None, process_count: int | None = None):
    """This process's disjoint block of rows of ``data``, for per-host loading on many hosts.

    The rows are cut into ``process_count`` contiguous blocks whose sizes differ by at most
    one; process ``i`` gets block ``i``. Every row belongs to exactly one process. (When the
    data is too large for one host, load only your own files instead; this helper is for data
    that every host can read whole, like the sets of :mod:`jdeq.data`.)

    Args:
      data: an array or a pytree of arrays sharing a leading axis (e.g. ``{"inputs": x,
        "labels": y}``).
      process_index: this process (default ``jax.process_index()``).
      process_count: the number of processes (default ``jax.process_count()``).

    Returns:
      The same structure with numpy arrays of this block's rows.

    Example:
      >>> host_shard({"x": np.arange(10)}, process_index=1, process_count=3)["x"]
      array([3, 4, 5])
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not (V.is_int(count) and V.is_int(index) and 0 <= index < count):
        raise ValueError(f"`process_index`={index!r} must be in [0, `process_count`={count!r}).")
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError("`data` holds no arrays.")
    n = int(np.shape(leaves[0])[0])
    if any(np.shape(leaf)[:1] != (n,) for leaf in leaves):
        raise ValueError("`data`'s arrays must share their leading (row) axis.")
    if n < count:
        raise ValueError(f"`data` has {n} rows, fewer than the {count} processes.")
    lo, hi = index * n // count, (index + 1) * n // count
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[lo:hi], data)


def host_value(x) -> np.ndarray:
    """A numpy copy of ``x`` readable on this process.

    A replicated array spread over several processes is not fully addressable, but any of
    this process's shards holds all of it: jax reads one of them (no communication).

    Args:
      x: a ``jax.Array`` (fully addressable, or replicated over the processes) or any
        array-like.

    Returns:
      A ``numpy.ndarray``.

    Example:
      >>> host_value(jax.numpy.arange(3))
      array([0, 1, 2], dtype=int32)
    """
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.sharding.is_fully_replicated):
        raise ValueError(
            "`x` is split over several processes: no process holds all of it "
            "(gather it first, e.g. jax.experimental.multihost_utils.process_allgather)."
        )
    return np.asarray(jax.device_get(x))


def global_array(value, sharding: NamedSharding) -> jax.Array:
    """A global array of ``value`` (the same full array on every process) laid out as ``sharding``.

    Each process copies only the slices its own devices hold (``jax.make_array_from_callback``).
    """
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


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
    # jax infers the global shape: every process holds an equal share of the rows
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in batch.items()}
