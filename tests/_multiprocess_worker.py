"""One of two CPU processes forming a single JAX runtime (gloo collectives), for tests/test_multiprocess.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python tests/_multiprocess_worker.py PHASE PROCESS_ID PORT WORKDIR

The parent starts two of these (process ids 0 and 1) with the same PORT and WORKDIR; together
they see 4 CPU devices, 2 per process. Each phase writes ``WORKDIR/PHASE.<process_id>.npz``
(atomically) with what the test compares, and prints ``step k`` lines for the parent.

- ``first``: (1) the checkpoint API on an array split over the processes: save, restore into
  another layout, and a checkpoint whose shard held by process 1 differs from what was saved
  (caught by the checksum, moved to ``corrupt/``, the previous step restored); (2) ``fit`` with
  weights split along a model axis (``model_mesh(2)``, ``model_axis="model"``); (3) ``fit``
  with a data mesh and ``host_shard``, a checkpoint every step, that stops at ``KILL_AT``:
  process 0 prints ``ready`` and sleeps, process 1 blocks in the next step's collective, and
  the parent SIGKILLs both.
- ``second``: (3) resumed from its last checkpoint and run to the end; the same run
  uninterrupted in a fresh directory; (2) called again on its checkpoint directory, which
  restores the split weights (checksums verified across processes) and trains no further.

The model, data and settings are shared with the single-process reference of the test.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

STEPS = 6
KILL_AT = 3
LR = 0.5
N = 32  # examples: full batch, so every process count sees the same set of rows per step


def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 4)).astype(np.float32)
    return {"inputs": x, "labels": np.argmax(x @ rng.normal(size=(4, 3)), -1).astype(np.int32)}


def net():
    """A DEQ of an MLP cell (width 8) + a linear head. The solver runs exactly 10 iterations
    (an unreachable tol), so rounding can never change an example's iteration count."""
    import jdeq
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(4, 8, w_scale=0.8, rngs=rngs),
                                    solver=jdeq.FixedPointIteration(tol=1e-30, maxiter=10),
                                    gradient=jdeq.JacobianFree())
            self.head = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            z, stats = self.deq(x)
            return self.head(z), stats

    return Net()


def fit_kwargs() -> dict:
    """The options every run shares (full batch, plain SGD: the sum over the batch is the only
    thing a layout can reorder)."""
    return dict(steps=STEPS, batch_size=N, seed=1, log_every=1, progress=False)


def optimizer():
    import optax

    return optax.sgd(LR)


def params(model) -> list[np.ndarray]:
    """The model's parameters as numpy (arrays split over processes are gathered)."""
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    def whole(x):
        if x.is_fully_addressable or x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0)) if not x.is_fully_addressable else np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return [whole(x) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))]


def _save(path: str, arrays: dict) -> None:
    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)


def _checkpoint_api(workdir: str, out: dict) -> None:
    """Save/restore of an array split over the processes, and a corrupted shard; then the same
    with the array saved whole (replicated: a crc32 entry) and restored split, which every
    process gathers to check."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from jdeq import train

    mesh = train.data_mesh()  # 4 devices: rows of w split 4 ways, 2 blocks per process
    split, rep = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    full = np.arange(32, dtype=np.float32).reshape(8, 4)

    def tree(w, layout=split):
        return {"w": train.global_array(w, layout), "b": train.global_array(np.ones(3, np.float32), rep)}

    like = {"w": jax.device_put(jnp.zeros((8, 4)), rep), "b": jax.device_put(jnp.zeros(3), rep)}
    _saved_restored_corrupted(workdir, "api", lambda w: tree(w, split), tree(np.zeros_like(full)), full, out,
                              relayout=like)
    assert not tree(full)["w"].is_fully_addressable
    try:  # no process can read an array split over the processes
        train.host_value(tree(full)["w"])
        out["api_host_value_error"] = np.array("")
    except ValueError as e:
        out["api_host_value_error"] = np.array(str(e))
    _saved_restored_corrupted(workdir, "whole", lambda w: tree(w, rep), tree(np.zeros_like(full)), full, out)
    _bad_on_one_process(workdir, lambda w: tree(w, rep), tree(np.zeros_like(full)), full, out)


def _bad_on_one_process(workdir: str, tree, like, full, out: dict) -> None:
    """Step 2 fails its check on process 1 only (as a local read error would): both processes
    must still agree, set it aside and restore step 1; results go to ``out["local_..."]``."""
    import warnings

    import jax
    from jax.experimental import multihost_utils

    from jdeq import train
    from jdeq.train import checkpoint

    where = os.path.join(workdir, "local")
    train.save_checkpoint(where, 1, tree(full))
    train.save_checkpoint(where, 2, tree(full + 1))
    real = checkpoint._read

    def read(ocp, manager, step, leaves):
        got = real(ocp, manager, step, leaves)  # every process reads (orbax's restore is collective)
        if step == 2 and jax.process_index() == 1:
            raise checkpoint.CheckpointError("simulated: bad on process 1 only")
        return got

    checkpoint._read = read
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = train.restore_checkpoint(where, like)
    finally:
        checkpoint._read = real
    out["local_step"] = np.array(got.step)
    out["local_w"] = multihost_utils.process_allgather(got.tree["w"], tiled=True)
    out["local_quarantined"] = np.array(sorted(p.split("-")[0] for p in os.listdir(os.path.join(where, "corrupt"))))
    reason = "simulated: bad on process 1 only" if jax.process_index() == 1 else "found bad on another process"
    out["local_reason_on_each_process"] = np.array(
        [f"the checkpoint of step 2 is corrupt ({reason})" in str(w.message) for w in caught])


def _saved_restored_corrupted(workdir: str, name: str, tree, like, full, out: dict, relayout=None) -> None:
    """Saves ``tree(full)`` (step 1) and ``tree(full + 1)`` (step 2) into ``workdir/name``,
    restores into ``like``'s layout, then replaces step 2's arrays by ones whose row 6 (held by
    process 1 only when split) differs and restores again; results go to ``out[name + "_..."]``."""
    import json
    import shutil
    import warnings

    import jax
    from jax.experimental import multihost_utils

    from jdeq import train

    good, bad = os.path.join(workdir, name), os.path.join(workdir, name + "_bad")
    train.save_checkpoint(good, 1, tree(full))
    train.save_checkpoint(good, 2, tree(full + 1))
    other = (full + 1).copy()
    other[6, 1] += 1.0  # row 6 lives on process 1 only
    train.save_checkpoint(bad, 2, tree(other))
    record = json.loads(open(os.path.join(good, "2", "meta", "metadata")).read())
    out[f"{name}_checksum_kinds"] = np.array(
        [sorted(k for k in e if k in ("crc32", "hash32"))[0] for e in record["leaves"]])

    got = train.restore_checkpoint(good, like)
    out[f"{name}_restored_step"] = np.array(got.step)
    out[f"{name}_restored_w"] = multihost_utils.process_allgather(got.tree["w"], tiled=True)
    if relayout is not None:  # the same checkpoint into another layout: the checksum does not depend on it
        out[f"{name}_relayout_w"] = train.host_value(train.restore_checkpoint(good, relayout, step=1).tree["w"])

    # step 2 of `good` now holds arrays whose row 6 differs from what was saved
    multihost_utils.sync_global_devices(f"{name} corrupt before")
    if jax.process_index() == 0:
        shutil.rmtree(os.path.join(good, "2", "state"))
        shutil.copytree(os.path.join(bad, "2", "state"), os.path.join(good, "2", "state"))
    multihost_utils.sync_global_devices(f"{name} corrupt after")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = train.restore_checkpoint(good, like)
    out[f"{name}_fallback_step"] = np.array(got.step)
    out[f"{name}_fallback_w"] = multihost_utils.process_allgather(got.tree["w"], tiled=True)
    out[f"{name}_warnings"] = np.array([str(w.message) for w in caught if "corrupt" in str(w.message)] or [""])
    out[f"{name}_quarantined"] = np.array(sorted(p.split("-")[0] for p in os.listdir(os.path.join(good, "corrupt"))))


def main(phase: str, pid: int, port: int, workdir: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=60)
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2

    from jdeq import train

    local = train.host_shard(data())
    out: dict = {}
    model_dir, data_dir = os.path.join(workdir, "model_axis"), os.path.join(workdir, "data_mesh")
    model_kw = dict(mesh=train.model_mesh(2), model_axis="model", min_shard_size=0, checkpoint_dir=model_dir)

    def report(step, metrics):
        print(f"step {step}", flush=True)
        if phase == "first" and step == KILL_AT:
            if pid == 0:
                print("ready", flush=True)
                time.sleep(600)  # the parent SIGKILLs both processes now

    if phase == "first":
        _checkpoint_api(workdir, out)
        model = net()
        hist = train.fit(model, optimizer(), local, **model_kw, **fit_kwargs())
        out["model_axis_params_n"] = np.array(len(params(model)))
        for i, p in enumerate(params(model)):
            out[f"model_axis_param_{i}"] = p
        out["model_axis_losses"] = np.array([r["loss"] for r in hist.train])
        _save(os.path.join(workdir, f"first.{pid}.npz"), out)
        print("first done", flush=True)
        train.fit(net(), optimizer(), local, mesh=train.data_mesh(), checkpoint_dir=data_dir, checkpoint_every=1,
                  callback=report, **fit_kwargs())
        raise SystemExit("not killed")  # the parent kills both processes before this line
    elif phase == "second":
        model = net()
        hist = train.fit(model, optimizer(), local, mesh=train.data_mesh(), checkpoint_dir=data_dir,
                         checkpoint_every=1, callback=report, **fit_kwargs())
        out["resumed_from"] = np.array(-1 if hist.resumed_from is None else hist.resumed_from)
        out["resumed_losses"] = np.array([r["loss"] for r in hist.train])
        for i, p in enumerate(params(model)):
            out[f"resumed_param_{i}"] = p
        model = net()
        hist = train.fit(model, optimizer(), local, mesh=train.data_mesh(), **fit_kwargs())
        out["uninterrupted_losses"] = np.array([r["loss"] for r in hist.train])
        for i, p in enumerate(params(model)):
            out[f"uninterrupted_param_{i}"] = p
        model = net()
        hist = train.fit(model, optimizer(), local, **model_kw, **fit_kwargs())
        out["model_axis_resumed_from"] = np.array(-1 if hist.resumed_from is None else hist.resumed_from)
        for i, p in enumerate(params(model)):
            out[f"model_axis_restored_param_{i}"] = p
        _save(os.path.join(workdir, f"second.{pid}.npz"), out)
    else:
        raise ValueError(f"unknown phase {phase!r}")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
