"""Implicit's backward solvers at equal gradient accuracy: which one should be the default?

Run: ``python -m benchmarks.backward_solvers``.

For the MLP DEQ (``jdeq.models.MLPCell`` width 256, batch 64; forward ``Anderson(m=5,
tol=1e-4, abs, maxiter=50)``) it computes the exact implicit gradient of the loss w.r.t. the
cell's parameters at the forward solve's ``z*`` (a dense per-example solve of
``(I - J^T) u = dL/dz`` in float64), then, for each backward solver of ``jdeq.Implicit``:

- ``None``: the forward solver's algorithm (Anderson, per example), the default;
- ``FixedPointIteration`` (per example);
- jaxopt's ``"gmres"``, ``"bicgstab"`` and ``"normal_cg"`` (whole batch as one system),

sweeps the backward tolerance (relative: ``stop_mode="rel"`` for jdeq's solvers, jaxopt's tol
is relative to ``||b||``), measures the gradient's relative error against the exact one and the
backward iterations (``Implicit``'s callback; jaxopt's solvers do not report theirs), picks for
each solver the loosest tolerance that reaches ``--target`` (default 1e-3) and times the
training step there (median of ``--steps``). It also times ``Implicit()`` exactly as a user gets
it (inheriting the forward's tol 1e-4 on the absolute residual and maxiter 50) and reports its
accuracy. Prints the step-time ratio of each solver to BiCGSTAB at equal accuracy. Writes
``results/backward_solvers.json`` and ``results/backward_solvers.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

import jdeq
from jdeq import argtypes as T
from benchmarks import _common as C

FORWARD = jdeq.Anderson(memory=5, tol=1e-4, maxiter=50, stop_mode="abs")
TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
BWD_MAXITER = 200


def backward_options() -> dict[str, dict[str, Any]]:
    """Name -> ``jdeq.Implicit`` keyword arguments (the tolerance is added by the sweep)."""
    return {
        "Anderson (forward's, default)": {"solver": None, "stop_mode": "rel", "maxiter": BWD_MAXITER},
        "FixedPointIteration": {"solver": jdeq.FixedPointIteration(), "stop_mode": "rel", "maxiter": BWD_MAXITER},
        "gmres": {"solver": "gmres", "maxiter": BWD_MAXITER},
        "bicgstab": {"solver": "bicgstab", "maxiter": BWD_MAXITER},
        "normal_cg": {"solver": "normal_cg", "maxiter": BWD_MAXITER},
    }


def _cell_grads(grads) -> np.ndarray:
    cell = grads["core"]["cell"]
    parts = [cell["w"]["kernel"][...], cell["u"]["kernel"][...], cell["u"]["bias"][...]]
    return np.concatenate([np.asarray(p, np.float64).ravel() for p in parts])


def exact_cell_grads(ts: C.TrainStep, x, y) -> tuple[np.ndarray, dict[str, float]]:
    """The implicit gradient w.r.t. (W, U, b) at the forward's z*, solved densely in float64."""
    model = nnx.merge(ts.graphdef, ts.params)
    z_star, stats = model.core(x)
    cell = ts.params["core"]["cell"]
    w = np.asarray(cell["w"]["kernel"][...], np.float64)
    u_k = np.asarray(cell["u"]["kernel"][...], np.float64)
    b = np.asarray(cell["u"]["bias"][...], np.float64)
    wh = np.asarray(ts.params["head"]["kernel"][...], np.float64)
    bh = np.asarray(ts.params["head"]["bias"][...], np.float64)
    z = np.asarray(z_star, np.float64)
    xs = np.asarray(x, np.float64)
    batch, width = z.shape
    logits = z @ wh + bh
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(batch), np.asarray(y)] -= 1.0
    g = (p / batch) @ wh.T  # dL/dz*
    s = 1.0 - np.tanh(z @ w + xs @ u_k + b) ** 2  # f = tanh(a): df/da
    # Adjoint per example: u = J^T u + g with J^T = W diag(s)  ->  (I - W diag(s)) u = g.
    a_mats = np.eye(width)[None] - w[None] * s[:, None, :]
    u = np.linalg.solve(a_mats, g[..., None])[..., 0]
    v = s * u
    grads = np.concatenate([(z.T @ v).ravel(), (xs.T @ v).ravel(), v.sum(axis=0)])
    return grads, {"fwd_iters": float(np.mean(np.asarray(stats.nsteps))),
                   "fwd_abs_residual": float(np.mean(np.asarray(stats.abs_residual)))}


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def gradient_point(setting, implicit_kwargs, ref) -> dict[str, Any]:
    """Relative error of the cell gradient and the backward iterations, for one Implicit config."""
    seen: list[float] = []
    cb = lambda s: seen.append(float(np.max(np.asarray(s.nsteps))))  # noqa: E731
    grad_mode = jdeq.Implicit(callback=cb, **implicit_kwargs)
    ts = C.make_train_step(setting.model(lambda cell: jdeq.nnx.DEQ(cell, solver=FORWARD, gradient=grad_mode)))
    grad = jax.jit(jax.grad(lambda p, x, y: ts.loss_fn(p, x, y)[0]))
    g = jax.block_until_ready(grad(ts.params, setting.x, setting.y))
    jax.effects_barrier()
    iters = seen[-1] if seen else None
    return {"rel_error": _rel(_cell_grads(g), ref), "bwd_iters": iters if iters is None or iters >= 0 else None}


def step_call(setting, implicit_kwargs):
    """A no-argument call of the compiled training step, always from the same starting state
    (so every variant solves the same problems)."""
    ts = C.make_train_step(setting.model(
        lambda cell: jdeq.nnx.DEQ(cell, solver=FORWARD, gradient=jdeq.Implicit(**implicit_kwargs))))
    x, y = setting.x, setting.y
    compiled, _, _ = C.compile_with_memory(ts.step, ts.params, ts.opt_state, x, y)
    params, opt_state = ts.params, ts.opt_state
    return lambda: compiled(params, opt_state, x, y)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.backward_solvers", description=__doc__.split("\n")[0])
    p.add_argument("--target", type=T.positive_float, default=1e-3, help="gradient relative error to reach")
    p.add_argument("--tols", type=T.positive_float, nargs="+", default=list(TOLS), help="backward tolerances swept")
    p.add_argument("--solvers", nargs="+", help="subset of the backward solvers (names as printed)")
    p.add_argument("--steps", type=T.positive_int, default=40, help="timed steps per solver (in rounds of 5, alternating)")
    p.add_argument("--warmup", type=T.nonneg_int, default=2)
    p.add_argument("--batch", type=T.positive_int, default=64)
    p.add_argument("--width", type=T.positive_int, default=256)
    C.out_dir_arg(p)
    args = p.parse_args(argv)
    names = {k for key in backward_options() for k in (key, key.split(" ")[0])}
    unknown = sorted(set(args.solvers or ()) - names)
    if unknown:
        p.error(f"--solvers: unknown {unknown}; choose from {sorted(names)}")
    return args


def main(argv=None) -> dict[str, Any]:
    """Runs the benchmark; returns the JSON document it writes."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    t_start = time.perf_counter()
    info = C.machine()
    C.flush_print(C.header(info, "Implicit's backward solvers at equal gradient accuracy (MLP DEQ training step)"))
    setting = C.make_setting("mlp", batch=args.batch, width=args.width)
    options = backward_options()
    if args.solvers:
        options = {k: v for k, v in options.items() if k in args.solvers or k.split(" ")[0] in args.solvers}
    base = C.make_train_step(setting.model(lambda cell: jdeq.nnx.DEQ(cell, solver=FORWARD)))
    ref, fwd = exact_cell_grads(base, setting.x, setting.y)
    C.flush_print(f"setting: {setting.description}; forward {FORWARD}: {fwd['fwd_iters']:.1f} iterations; "
                  f"reference: exact adjoint at z* (float64 dense solve); target rel error {args.target:g}")

    sweep, rows, calls = [], [], {}
    for name, kw in options.items():
        chosen = None
        for tol in sorted(args.tols, reverse=True):
            point = {"solver": name, "tol": tol, **gradient_point(setting, {**kw, "tol": tol}, ref)}
            sweep.append(point)
            C.flush_print(f"  {name:30s} tol {tol:7.0e}: rel error {point['rel_error']:.2e}, bwd iters {point['bwd_iters']}")
            if point["rel_error"] <= args.target:
                chosen = point
                break
        if chosen is None:
            rows.append({"solver": name, "tol": None, "rel_error": sweep[-1]["rel_error"], "reached": False})
            continue
        calls[name] = step_call(setting, {**kw, "tol": chosen["tol"]})
        rows.append({"solver": name, "tol": chosen["tol"], "rel_error": chosen["rel_error"],
                     "bwd_iters": chosen["bwd_iters"], "reached": True})

    # Implicit() exactly as a user gets it.
    as_is = "Implicit() as is (tol 1e-4 abs, maxiter 50)"
    default = gradient_point(setting, {}, ref)
    calls[as_is] = step_call(setting, {})
    rows.append({"solver": as_is, "tol": None, "rel_error": default["rel_error"],
                 "bwd_iters": default["bwd_iters"], "reached": None})

    # Timed in alternation (rounds), ratios to BiCGSTAB per round.
    rounds = max(args.steps // 5, 1)
    times = C.time_alternating(calls, rounds=rounds, steps=5, warmup=args.warmup)
    for r in rows:
        t = times.get(r["solver"])
        if t:
            r["step_ms"] = 1e3 * C.median(t)
            r["step_ms_iqr"] = [1e3 * float(q) for q in np.percentile(t, [25, 75])]
            if "bicgstab" in times:
                per_round = [C.median(t[i * 5:(i + 1) * 5]) / C.median(times["bicgstab"][i * 5:(i + 1) * 5])
                             for i in range(rounds)]
                r["ratio_vs_bicgstab"] = C.median(per_round)
                r["ratio_vs_bicgstab_range"] = [min(per_round), max(per_round)]
    elapsed = time.perf_counter() - t_start
    doc = {
        "benchmark": "backward_solvers", "machine": info,
        "config": {"setting": setting.description, "forward": repr(FORWARD), "target": args.target,
                   "tols": list(args.tols), "backward_maxiter": BWD_MAXITER, "steps": args.steps},
        "forward": fwd, "sweep": sweep, "rows": rows, "elapsed_s": elapsed,
    }
    json_path = C.write_json(args.out, "backward_solvers", doc)
    series = {}
    for p in sweep:
        xs, ys = series.setdefault(p["solver"], ([], []))
        xs.append(p["tol"])
        ys.append(p["rel_error"])
    png_path = _plot(series, os.path.join(args.out, "backward_solvers.png"), args.target)
    doc["files"] = [str(json_path), str(png_path)]
    C.flush_print(f"wrote {json_path} and {png_path} ({elapsed:.0f} s)")
    best = min((r for r in rows if r.get("reached") and r.get("step_ms")), key=lambda r: r["step_ms"], default=None)
    if best is not None:
        C.flush_print(f"fastest at rel error <= {args.target:g}: {best['solver']} ({best['step_ms']:.2f} ms)")
    C.flush_print(C.format_table(rows, [
        ("solver", "backward solver", ""), ("tol", "tol", ".0e"), ("rel_error", "grad rel err", ".2e"),
        ("bwd_iters", "bwd iters", ".0f"), ("step_ms", "step ms", ".2f"), ("ratio_vs_bicgstab", "vs bicgstab", ".2f"),
    ]))
    return doc


def _plot(series, path, target):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, "o-", label=label, markersize=4)
    ax.axhline(target, color="k", lw=0.8, ls="--", label="target")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("backward tolerance")
    ax.set_ylabel("cell-gradient relative error vs exact")
    ax.set_title("Implicit backward solvers: accuracy vs tolerance (MLP DEQ)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
