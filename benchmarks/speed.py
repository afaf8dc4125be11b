"""Speed of every solver x gradient pair, and how close the solver machinery gets to the cell.

Run: ``python -m benchmarks.speed`` (``--settings mlp`` or ``conv`` for one of them).

For the MLP cell (width 256, batch 64) and the conv cell (16x16x32 maps, batch 16 by default on
CPU) it measures, for each forward solver (``FixedPointIteration``, ``Anderson(m=5)``,
``Broyden``, and jaxopt's ``AndersonAcceleration`` through ``jdeq.JaxoptSolver``), all with
``tol=1e-4`` (relative residual), ``maxiter=50``, and each gradient (``Implicit()``,
``Phantom(5)``, ``JacobianFree()``, ``Unrolled()``):

- the median time of a jitted training step (loss + grad + Adam) and of an inference step;
- forward NFE (evaluations of the cell; mean over examples and the batch-wide count the loop
  actually ran), backward NFE (``Implicit``: iterations of its backward solve, from its callback
  in a separately compiled gradient; Phantom k; JFB 1; Unrolled every forward step) and the
  final forward residual;
- the solver overhead ratio: step time / (cell cost), where the cell cost is
  ``n_eval x t_eval + n_vjp x t_vjp`` with ``t_eval`` (``t_vjp``) the time of one batched cell
  evaluation (one VJP of the cell w.r.t. ``z``), each measured as the per-iteration time of a
  jitted loop of such evaluations, and ``n_eval``/``n_vjp`` the evaluations/VJPs the step
  computes (batch-wide forward iterations, +1 linearization for Implicit, +k re-evaluations for
  Phantom/JFB; backward iterations +1 parameter VJP). The target is under 1.5: near 1 means
  all time goes to the cell, none to the solver. Inference: time / (n_eval x t_eval).

Writes ``results/speed.json`` and ``results/speed.png`` and prints the table last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np
from flax import nnx

import jdeq
from jdeq import argtypes as T
from benchmarks import _common as C

TOL, MAXITER, STOP = 1e-4, 50, "rel"


def solvers() -> dict[str, Any]:
    """The forward solvers compared (same tolerance, budget and stopping rule where they have one)."""
    with warnings.catch_warnings():  # jaxopt's one "no longer maintained" warning, by message
        warnings.filterwarnings("ignore", message="JAXopt is no longer maintained", category=DeprecationWarning)
        import jaxopt

    common = {"tol": TOL, "maxiter": MAXITER}
    return {
        "FixedPointIteration": jdeq.FixedPointIteration(stop_mode=STOP, **common),
        "Anderson": jdeq.Anderson(memory=5, stop_mode=STOP, **common),
        "Broyden": jdeq.Broyden(stop_mode=STOP, **common),
        # jaxopt: one global stopping test on the whole batch (its own error definition).
        "jaxopt.Anderson": jdeq.JaxoptSolver(jaxopt.AndersonAcceleration, history_size=5, **common),
    }


GRADIENTS = {
    "Implicit": lambda cb=None: jdeq.Implicit(callback=cb),
    "Phantom5": lambda cb=None: jdeq.Phantom(steps=5),
    "JFB": lambda cb=None: jdeq.JacobianFree(),
    "Unrolled": lambda cb=None: jdeq.Unrolled(),
}


def cell_costs(setting: C.Setting, *, loops: int = 100, reps: int = 7) -> dict[str, float]:
    """Seconds per batched cell evaluation and per VJP w.r.t. ``z``.

    Each is the smaller of (a) the per-iteration time of a jitted ``fori_loop`` (``z <- f(z)``;
    ``u <- J^T u + g``, the backward iteration) and (b) one jitted call. (b) matters on XLA:CPU,
    where a convolution's input-VJP inside a loop body runs far slower than outside one.
    """
    cell, stem = setting.make_cell(), setting.make_stem()
    xin = stem(setting.x) if stem is not None else setting.x
    graphdef, state = nnx.split(cell)
    f = lambda st, z, xin: nnx.merge(graphdef, st)(z, xin)  # noqa: E731
    z0 = cell.init_z(xin)

    @jax.jit
    def evals(st, z, xin):
        return jax.lax.fori_loop(0, loops, lambda i, z: f(st, z, xin), z)

    z_star = evals(state, z0, xin)
    g = jax.random.normal(jax.random.key(1), z0.shape, z0.dtype)

    @jax.jit
    def vjps(st, z, xin, u):
        _, pull = jax.vjp(lambda z: f(st, z, xin), z)
        return jax.lax.fori_loop(0, loops, lambda i, u: pull(u)[0] + g, u)

    one_eval = jax.jit(f)
    one_vjp = jax.jit(lambda st, z, xin, u: jax.vjp(lambda z: f(st, z, xin), z)[1](u)[0])
    out = {
        "t_eval_loop_s": min(C.time_calls(lambda: evals(state, z_star, xin), steps=reps, warmup=1)) / loops,
        "t_vjp_loop_s": min(C.time_calls(lambda: vjps(state, z_star, xin, g), steps=reps, warmup=1)) / loops,
        "t_eval_call_s": min(C.time_calls(lambda: one_eval(state, z_star, xin), steps=5 * reps, warmup=2)),
        "t_vjp_call_s": min(C.time_calls(lambda: one_vjp(state, z_star, xin, g), steps=5 * reps, warmup=2)),
    }
    out["t_eval_s"] = min(out["t_eval_loop_s"], out["t_eval_call_s"])
    out["t_vjp_s"] = min(out["t_vjp_loop_s"], out["t_vjp_call_s"])
    return out


def _backward_iters(setting, solver) -> float | None:
    """Batch-wide iterations of ``Implicit()``'s backward solve (max over examples; jaxopt: -1)."""
    seen: list[float] = []
    cb = lambda s: seen.append(float(np.max(np.asarray(s.nsteps))))  # noqa: E731
    ts = C.make_train_step(setting.model(lambda cell: jdeq.nnx.DEQ(cell, solver=solver, gradient=jdeq.Implicit(callback=cb))))
    grad = jax.jit(jax.grad(lambda p, x, y: ts.loss_fn(p, x, y)[0]))
    jax.block_until_ready(grad(ts.params, setting.x, setting.y))
    jax.effects_barrier()
    return seen[-1] if seen else None


def measure(setting, solver_name, solver, grad_name, *, steps, warmup, costs) -> dict[str, Any]:
    ts = C.make_train_step(setting.model(lambda cell: jdeq.nnx.DEQ(cell, solver=solver, gradient=GRADIENTS[grad_name]())))
    x, y = setting.x, setting.y
    compiled, mem, compile_s = C.compile_with_memory(ts.step, ts.params, ts.opt_state, x, y)
    state = [ts.params, ts.opt_state]

    def call():
        params, opt_state, aux = compiled(state[0], state[1], x, y)
        state[0], state[1] = params, opt_state
        return aux

    first = jax.block_until_ready(call())
    times = C.time_calls(call, steps=steps, warmup=max(warmup - 1, 0))
    fwd_run = int(first["fwd_iters_max"]) if grad_name != "Unrolled" else MAXITER  # the scan runs them all
    if grad_name == "Implicit":
        bwd = _backward_iters(setting, solver)
        n_eval, n_vjp = fwd_run + 1, (bwd if bwd is not None and bwd >= 0 else np.nan) + 1
    elif grad_name == "Phantom5":
        bwd = 5.0
        n_eval, n_vjp = fwd_run + 5, 5
    elif grad_name == "JFB":
        bwd = 1.0
        n_eval, n_vjp = fwd_run + 1, 1
    else:
        bwd = float(MAXITER)
        n_eval, n_vjp = fwd_run, MAXITER
    step_s = C.median(times)
    ideal = n_eval * costs["t_eval_s"] + n_vjp * costs["t_vjp_s"]
    return {
        "setting": setting.name, "solver": solver_name, "gradient": grad_name,
        "train_ms": 1e3 * step_s, "train_ms_iqr": [1e3 * float(q) for q in np.percentile(times, [25, 75])],
        "compile_s": compile_s, "temp_bytes": mem["temp"],
        "fwd_nfe": float(first["fwd_iters"]), "fwd_nfe_batch": fwd_run, "bwd_nfe": bwd,
        "abs_residual": float(first["abs_residual"]), "rel_residual": float(first["rel_residual"]),
        "converged": float(first["converged"]),
        "n_eval": n_eval, "n_vjp": n_vjp, "cell_cost_ms": 1e3 * ideal,
        "overhead_train": step_s / ideal if np.isfinite(ideal) else None,
    }


def measure_inference(setting, solver_name, solver, *, steps, warmup, costs) -> dict[str, Any]:
    ts = C.make_train_step(setting.model(lambda cell: jdeq.nnx.DEQ(cell, solver=solver)))
    compiled, _, _ = C.compile_with_memory(ts.infer, ts.params, setting.x)
    aux = jax.block_until_ready(compiled(ts.params, setting.x))[1]
    times = C.time_calls(lambda: compiled(ts.params, setting.x), steps=steps, warmup=max(warmup - 1, 0))
    n_eval = int(aux["fwd_iters_max"])
    return {"infer_ms": 1e3 * C.median(times),
            "overhead_infer": C.median(times) / (n_eval * costs["t_eval_s"])}


COLUMNS = [
    ("setting", "setting", ""), ("solver", "solver", ""), ("gradient", "gradient", ""),
    ("train_ms", "train ms", ".2f"), ("infer_ms", "infer ms", ".2f"), ("fwd_nfe", "fwd NFE", ".1f"),
    ("fwd_nfe_batch", "fwd run", "d"), ("bwd_nfe", "bwd NFE", ".0f"), ("rel_residual", "rel res", ".1e"),
    ("overhead_train", "overhead train", ".2f"), ("overhead_infer", "overhead infer", ".2f"),
]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", choices=["mlp", "conv"], default=["mlp", "conv"])
    p.add_argument("--solvers", nargs="+", help="subset of: FixedPointIteration Anderson Broyden jaxopt.Anderson")
    p.add_argument("--gradients", nargs="+", choices=list(GRADIENTS),
                   help="default: all; on CPU the conv setting skips Unrolled unless --full")
    p.add_argument("--full", action="store_true", help="every pair, also conv x Unrolled on CPU (slow)")
    p.add_argument("--steps", type=T.positive_int, default=20, help="timed steps (median reported), MLP")
    p.add_argument("--conv-steps", type=T.positive_int, default=None, help="timed steps for conv (default 5 on CPU)")
    p.add_argument("--warmup", type=T.nonneg_int, default=2)
    p.add_argument("--batch", type=T.positive_int, default=64)
    p.add_argument("--conv-batch", type=T.positive_int, default=None, help="conv batch (default 16 on CPU, else --batch)")
    p.add_argument("--width", type=T.positive_int, default=256)
    C.out_dir_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    """Runs the benchmark; returns the JSON document it writes."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    t_start = time.perf_counter()
    on_cpu = jax.default_backend() == "cpu"
    conv_batch = args.conv_batch or (16 if on_cpu else args.batch)
    conv_steps = args.conv_steps or (5 if on_cpu and not args.full else args.steps)
    info = C.machine()
    C.flush_print(C.header(info, "speed: solver x gradient, training and inference steps, NFE, solver overhead"))
    all_solvers = solvers()
    chosen = args.solvers or list(all_solvers)
    unknown = [s for s in chosen if s not in all_solvers]
    if unknown:
        raise ValueError(f"`--solvers`: unknown {unknown}; choose from {list(all_solvers)}.")
    rows, costs_by = [], {}
    for name in args.settings:
        setting = (C.make_setting("mlp", batch=args.batch, width=args.width) if name == "mlp"
                   else C.make_setting("conv", batch=conv_batch))
        steps = args.steps if name == "mlp" else conv_steps
        gradients = args.gradients or [g for g in GRADIENTS
                                        if not (g == "Unrolled" and name == "conv" and on_cpu and not args.full)]
        costs = costs_by[name] = cell_costs(setting)
        C.flush_print(
            f"setting {name}: {setting.description}; one cell evaluation {1e3 * costs['t_eval_s']:.3f} ms, one VJP "
            f"{1e3 * costs['t_vjp_s']:.3f} ms (in a jitted loop: {1e3 * costs['t_eval_loop_s']:.3f} / "
            f"{1e3 * costs['t_vjp_loop_s']:.3f} ms per iteration)")
        for sname in chosen:
            solver = all_solvers[sname]
            inf = measure_inference(setting, sname, solver, steps=steps, warmup=args.warmup, costs=costs)
            for gname in gradients:
                if gname == "Unrolled" and isinstance(solver, jdeq.JaxoptSolver):
                    continue  # jaxopt's loop is a while_loop: not reverse-differentiable through
                row = measure(setting, sname, solver, gname, steps=steps, warmup=args.warmup, costs=costs)
                row.update(inf)
                rows.append(row)
                C.flush_print(f"  {name:4s} {sname:19s} {gname:8s} train {row['train_ms']:8.2f} ms  "
                              f"infer {row['infer_ms']:7.2f} ms  overhead {row['overhead_train'] or float('nan'):.2f}")
    elapsed = time.perf_counter() - t_start
    doc = {
        "benchmark": "speed", "machine": info,
        "config": {"tol": TOL, "maxiter": MAXITER, "stop_mode": STOP, "steps": args.steps, "conv_steps": conv_steps,
                   "batch": args.batch, "conv_batch": conv_batch, "optimizer": "optax.adam(1e-3)"},
        "cell_costs": costs_by, "rows": rows, "elapsed_s": elapsed,
    }
    ok = [r["overhead_train"] for r in rows if r["overhead_train"] is not None]
    json_path = C.write_json(args.out, "speed", doc)
    png_path = _plot(rows, os.path.join(args.out, "speed.png"))
    doc["files"] = [str(json_path), str(png_path)]
    C.flush_print(f"wrote {json_path} and {png_path} ({elapsed:.0f} s)")
    if ok:
        C.flush_print(f"solver overhead (training step / cell cost): median {np.median(ok):.2f}, "
                      f"range {min(ok):.2f} .. {max(ok):.2f}; target < 1.5 "
                      f"({sum(o < 1.5 for o in ok)} of {len(ok)} pairs under it)")
    C.flush_print(C.format_table(rows, COLUMNS))
    return doc


def _plot(rows, path):
    """Grouped bars: training-step time per solver x gradient, one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["setting"] for r in rows}, key=["mlp", "conv"].index)
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), dpi=120, squeeze=False)
    for ax, s in zip(axes[0], settings):
        sub = [r for r in rows if r["setting"] == s]
        solvers_ = list(dict.fromkeys(r["solver"] for r in sub))
        grads = list(dict.fromkeys(r["gradient"] for r in sub))
        width = 0.8 / max(len(grads), 1)
        for j, g in enumerate(grads):
            xs, ys = [], []
            for i, sv in enumerate(solvers_):
                match = [r for r in sub if r["solver"] == sv and r["gradient"] == g]
                if match:
                    xs.append(i + j * width)
                    ys.append(match[0]["train_ms"])
            ax.bar(xs, ys, width=width, label=g)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(solvers_))], solvers_, fontsize=8)
        ax.set_ylabel("training step (ms)")
        ax.set_yscale("log")
        ax.set_title(f"{s}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
