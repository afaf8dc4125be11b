"""Data-parallel scaling of a DEQ training step over 1, 2, 4, 8 devices, and the bf16 cell policy.

Run: ``python -m benchmarks.scaling`` (``--batches 64 256``, ``--devices 1 2 4 8``).

The MLP DEQ classifier of ``benchmarks._common`` (``MLPCell`` width 256, ``Anderson(tol=1e-4,
maxiter=50)``, ``Implicit()`` gradient, Adam) trains with the batch sharded over a one-axis mesh
of the first ``n`` devices (``jdeq.train.data_mesh``), parameters and optimizer state
replicated: the same jitted step as ``jdeq.train.fit(..., mesh=...)``. For each global batch
and ``n`` it reports the median step time (all ``n`` timed in alternation), the throughput
(examples/s), the speed-up over one device, and XLA's compiled memory per device (arguments +
temporaries of the partitioned program).

On CPU the devices are simulated (``--xla_force_host_platform_device_count``, set here before
jax is imported): they all share the machine's cores, so on a 2-core machine no speed-up beyond
~2x is possible and more devices mostly add partitioning overhead. The memory column is still
meaningful: per-device activations shrink with ``1/n``. On real multi-device hardware run the
same command; the mesh uses ``jax.devices()``.

A second table puts the weights of a wide cell (``--widths``, default 1024 and 2048) on the
devices two ways, at the same global batch (``--model-batch``): replicated on a data mesh of
``n`` devices (``fit(mesh=data_mesh(...))``), or split along a model axis of ``n`` devices
(``jdeq.train.model_mesh(n)``, ``fit(..., model_axis="model")``: every parameter of at least
``jdeq.train.MIN_SHARD_SIZE`` elements split, Adam's moments following). It reports XLA's
compiled memory per device (arguments + temporaries) and the parameter + optimizer bytes each
device holds. Compile-time numbers only: nothing is timed there.

A third table compares the cell computed in float32 and through
``jdeq.models.MixedPrecision`` (bfloat16) on one device: the relative residual reached with
``tol=1e-9`` (the precision floor) and the inference time at ``tol=1e-2``.

Writes ``results/scaling.json`` and ``results/scaling.png``; prints the scaling table last.
``--widths`` with no value skips the model-axis table; ``--batches`` with none skips the timing.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import optax  # noqa: E402

import jdeq  # noqa: E402
from jdeq import argtypes as T  # noqa: E402
from benchmarks import _common as C  # noqa: E402

COLUMNS = [
    ("batch", "global batch", "d"),
    ("devices", "devices", "d"),
    ("step_ms", "step ms", ".2f"),
    ("throughput", "examples/s", ".0f"),
    ("speedup", "speed-up", ".2f"),
    ("mem_mib", "MiB/device", ".2f"),
    ("fwd_iters", "fwd iters", ".1f"),
]


def scaling(batches, devices, rounds, steps):
    rows = []
    for batch in batches:
        setting = C.make_setting("mlp", batch=batch)
        model = setting.model(lambda cell: jdeq.nnx.DEQ(cell, solver=jdeq.Anderson(tol=1e-4, maxiter=50)))
        ts = C.make_train_step(model)
        calls, info = {}, {}
        for n in devices:
            mesh = jdeq.train.data_mesh(jax.devices()[:n])
            rep, dat = jdeq.train.replicated(mesh), jdeq.train.batch_sharding(mesh)
            params, opt_state = jdeq.train.replicate((ts.params, ts.opt_state), mesh)
            x, y = jax.device_put(setting.x, dat), jax.device_put(setting.y, dat)
            compiled, mem, _ = C.compile_with_memory(
                ts.step, params, opt_state, x, y, in_shardings=(rep, rep, dat, dat), out_shardings=rep
            )
            aux = compiled(params, opt_state, x, y)[2]
            calls[n] = lambda c=compiled, a=(params, opt_state, x, y): c(*a)
            info[n] = {"mem_mib": ((mem["argument"] or 0) + (mem["temp"] or 0)) / C.MiB,
                       "fwd_iters": float(aux["fwd_iters"])}
        times = C.time_alternating(calls, rounds=rounds, steps=steps)
        base = C.median(times[devices[0]])
        for n in devices:
            t = C.median(times[n])
            rows.append({"batch": batch, "devices": n, "step_ms": 1e3 * t, "throughput": batch / t,
                         "speedup": base / t, "times": C.spread(times[n]), **info[n]})
            C.flush_print(f"  batch {batch}, {n} device(s): {1e3 * t:.2f} ms")
    return rows


MODEL_COLUMNS = [
    ("width", "width", "d"),
    ("devices", "devices", "d"),
    ("layout", "weights", ""),
    ("state_mib", "params+opt MiB/dev", ".2f"),
    ("mem_mib", "compiled MiB/dev", ".2f"),
    ("vs_replicated", "vs replicated", ".2f"),
]


def _state_bytes_per_device(tree, shardings) -> int:
    """Bytes of ``tree`` one device holds under ``shardings`` (its shard of every leaf)."""
    leaves, sh = jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)
    return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize for x, s in zip(leaves, sh))


def model_axis_memory(widths, devices, batch):
    """Memory per device of one training step, weights replicated vs split along a model axis."""
    rows = []
    for width in widths:
        setting = C.make_setting("mlp", batch=batch, width=width)
        model = setting.model(lambda cell: jdeq.nnx.DEQ(cell, solver=jdeq.Anderson(tol=1e-4, maxiter=50)))
        ts = C.make_train_step(model)
        for n in devices:
            layouts = {"replicated": (jdeq.train.data_mesh(jax.devices()[:n]), None),
                       f"split {n}-way": (jdeq.train.model_mesh(n, jax.devices()[:n]), "model")}
            base = None
            for layout, (mesh, axis) in layouts.items():
                if n == 1 and axis is not None:
                    continue  # a model axis of one device is the replicated layout
                psh = jdeq.train.param_shardings(ts.params, mesh, model_axis=axis)
                osh = jdeq.train.optimizer_shardings(optax.adam(1e-3), ts.opt_state, psh, mesh)
                dat = jdeq.train.batch_sharding(mesh)
                params, opt_state = jax.device_put((ts.params, ts.opt_state), (psh, osh))
                x, y = jax.device_put(setting.x, dat), jax.device_put(setting.y, dat)
                _, mem, _ = C.compile_with_memory(
                    ts.step, params, opt_state, x, y, in_shardings=(psh, osh, dat, dat),
                    out_shardings=(psh, osh, jdeq.train.replicated(mesh)),
                )
                total = ((mem["argument"] or 0) + (mem["temp"] or 0)) / C.MiB
                base = total if base is None else base
                rows.append({"width": width, "devices": n, "layout": layout, "mem_mib": total,
                             "state_mib": (_state_bytes_per_device(ts.params, psh)
                                           + _state_bytes_per_device(ts.opt_state, osh)) / C.MiB,
                             "vs_replicated": total / base, "memory": mem})
                C.flush_print(f"  width {width}, {n} device(s), {layout}: {total:.2f} MiB/device")
    return rows


def precision(rounds, steps):
    setting = C.make_setting("mlp", batch=64)
    out = []
    calls = {}
    for name, wrap in (("float32", lambda c: c), ("bfloat16 cell", jdeq.models.MixedPrecision)):
        cell = setting.make_cell()
        floor = nnx.jit(lambda d, x: d(x)[1])(jdeq.nnx.DEQ(wrap(cell), solver=jdeq.Anderson(tol=1e-9, maxiter=100)), setting.x)
        deq = jdeq.nnx.DEQ(wrap(cell), solver=jdeq.Anderson(tol=1e-2, maxiter=50))
        graphdef, state = nnx.split(deq)
        f = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))
        calls[name] = lambda f=f, s=state: f(s, setting.x)
        z, st = calls[name]()
        out.append({"policy": name, "floor_median": float(jnp.median(floor.rel_residual)),
                    "floor_max": float(jnp.max(floor.rel_residual)),
                    "iters_at_1e-2": float(jnp.mean(st.nsteps)), "z": np.asarray(z)})
    times = C.time_alternating(calls, rounds=rounds, steps=steps)
    ref = out[0]["z"]
    for row in out:
        row["infer_ms"] = 1e3 * C.median(times[row["policy"]])
        row["z_rel_diff"] = float(np.linalg.norm(row.pop("z") - ref) / np.linalg.norm(ref))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=T.positive_int, nargs="*", default=[64, 256])
    p.add_argument("--widths", type=T.positive_int, nargs="*", default=[1024, 2048],
                   help="cell widths of the model-axis memory table")
    p.add_argument("--model-batch", type=T.positive_int, default=64, help="global batch of the model-axis table")
    p.add_argument("--devices", type=T.positive_int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rounds", type=T.positive_int, default=3)
    p.add_argument("--steps", type=T.positive_int, default=5)
    C.out_dir_arg(p)
    args = p.parse_args(argv)
    if max(args.devices) > jax.device_count():
        p.error(f"--devices asks for {max(args.devices)} devices; {jax.device_count()} are available.")

    info = C.machine()
    C.flush_print(C.header(info, "scaling: data-parallel DEQ training step vs devices (jdeq.train.sharding)"))
    simulated = jax.default_backend() == "cpu"
    if simulated:
        C.flush_print(f"note: {jax.device_count()} simulated CPU devices sharing {info['cpu_cores']} cores")
    rows = scaling(args.batches, args.devices, args.rounds, args.steps)
    model_rows = model_axis_memory(args.widths, args.devices, args.model_batch)
    prec = precision(args.rounds, args.steps)

    series = {f"batch {b}": ([r["devices"] for r in rows if r["batch"] == b],
                             [r["throughput"] for r in rows if r["batch"] == b]) for b in args.batches}
    png = C.plot_lines(os.path.join(args.out, "scaling.png"), series, xlabel="devices",
                       ylabel="examples / s", title="DEQ (MLP, Anderson, Implicit) training throughput"
                       + (" - simulated CPU devices" if simulated else ""))
    path = C.write_json(args.out, "scaling", {"machine": info, "simulated_devices": simulated,
                                              "scaling": rows, "model_axis": model_rows, "precision": prec})
    C.flush_print(f"wrote {path} and {png}\n")
    C.flush_print(C.format_table(prec, [("policy", "cell precision", ""), ("floor_median", "rel res floor (median)", ".1e"),
                                        ("floor_max", "(max)", ".1e"), ("z_rel_diff", "|z-z32|/|z32| @1e-2", ".1e"),
                                        ("iters_at_1e-2", "iters @1e-2", ".1f"), ("infer_ms", "infer ms @1e-2", ".2f")]))
    C.flush_print("")
    if model_rows:
        C.flush_print(f"model axis: MLP DEQ training step (Adam), global batch {args.model_batch}; weights "
                      "replicated (data mesh) vs split along a model axis "
                      f"(>= {jdeq.train.MIN_SHARD_SIZE} elements)")
        C.flush_print(C.format_table(model_rows, MODEL_COLUMNS))
        C.flush_print("")
    if rows:
        C.flush_print(C.format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
