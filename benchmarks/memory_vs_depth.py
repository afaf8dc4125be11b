"""Training memory vs effective depth: a DEQ against weight-tied unrolled networks.

Run: ``python -m benchmarks.memory_vs_depth`` (``--conv`` adds the conv setting, ``--full`` the
larger grid). It is what ``make bench`` runs.

For one cell (``jdeq.models.MLPCell``, width 256, batch 64 by default; ``--conv``: a 3x3 conv
cell on 16x16x32 maps) it compiles the jitted training step (loss + grad + Adam update) of

- ``jdeq.nnx.Unrolled`` at depth ``L``, plain (``unrolled``) and with ``remat=True``
  (``unrolled+remat``);
- ``jdeq.nnx.DEQ`` with ``Anderson(maxiter=L, tol=1e-12, stop_mode="abs")`` and the gradients
  ``Implicit()`` (``deq-implicit``), ``Phantom(steps=5)`` (``deq-phantom5``), ``JacobianFree()``
  (``deq-jfb``) and ``Unrolled()`` (``deq-unrolled``). The tolerance is below what float32 can
  reach, so the solver spends its whole budget: effective depth = ``maxiter`` = L (the measured
  forward iterations are reported; ``Implicit()``'s backward solve inherits the same budget and
  tolerance, its iterations are reported too),

for ``L`` in 1, 2, 4, ..., 256, and records XLA's compiled memory (``memory_analysis()``: temp,
argument, output bytes), the device's measured peak bytes where the backend reports them
(GPU/TPU; each method runs in its own process, depths in increasing order, so the process peak
is that depth's peak), compile time, the median step time over ``--steps`` steps after warm-up
(for the depths in ``--time-depths``), forward iterations (solver stats) and backward iterations
(``Implicit``'s callback, in a separately compiled gradient so the timed step has no host
callback).

Writes ``results/memory_vs_depth.json`` and ``results/memory_vs_depth.png`` and prints the
targets (Implicit's temp memory flat within 5% over L; >= 10x below plain unrolled at L = 128)
as measured ratios, then the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

import jdeq
from jdeq import argtypes as T
from benchmarks import _common as C

METHODS = ("unrolled", "unrolled+remat", "deq-implicit", "deq-phantom5", "deq-jfb", "deq-unrolled")
TOL = 1e-12  # below float32's reach: the solver runs its whole budget
DEFAULT_DEPTHS = tuple(2**k for k in range(9))  # 1 .. 256
FULL_DEPTHS = tuple(2**k for k in range(11))  # 1 .. 1024
DEFAULT_TIMED = (1, 4, 16, 64, 256)  # step times on CPU by default (memory for every depth)
STYLES = {
    "unrolled": "s-", "unrolled+remat": "s--", "deq-implicit": "o-", "deq-phantom5": "^-",
    "deq-jfb": "v-", "deq-unrolled": "D:",
}


def make_core(method: str, depth: int, *, callback=None):
    """``cell -> core module`` for one method at depth / solver budget ``depth``."""
    if method == "unrolled":
        return lambda cell: jdeq.nnx.Unrolled(cell, depth=depth)
    if method == "unrolled+remat":
        return lambda cell: jdeq.nnx.Unrolled(cell, depth=depth, remat=True)
    gradients = {
        "deq-implicit": jdeq.Implicit(callback=callback),
        "deq-phantom5": jdeq.Phantom(steps=5),
        "deq-jfb": jdeq.JacobianFree(),
        "deq-unrolled": jdeq.Unrolled(),
    }
    if method not in gradients:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    solver = jdeq.Anderson(tol=TOL, maxiter=depth, stop_mode="abs")
    return lambda cell: jdeq.nnx.DEQ(cell, solver=solver, gradient=gradients[method])


def _backward_iters(setting: C.Setting, depth: int) -> float | None:
    """Mean backward-solve iterations of ``Implicit()`` at this budget, from its callback."""
    seen: list[float] = []
    cb = lambda stats: seen.append(float(np.mean(np.asarray(stats.nsteps))))  # noqa: E731
    ts = C.make_train_step(setting.model(make_core("deq-implicit", depth, callback=cb)))
    grad = jax.jit(jax.grad(lambda p, x, y: ts.loss_fn(p, x, y)[0]))
    jax.block_until_ready(grad(ts.params, setting.x, setting.y))
    jax.effects_barrier()
    return seen[-1] if seen else None


def measure(setting: C.Setting, method: str, depth: int, *, steps: int, warmup: int, timed: bool) -> dict[str, Any]:
    """One row: compiled memory, compile time, iterations and (if ``timed``) step time."""
    ts = C.make_train_step(setting.model(make_core(method, depth)))
    x, y = setting.x, setting.y
    compiled, mem, compile_s = C.compile_with_memory(ts.step, ts.params, ts.opt_state, x, y)
    state = [ts.params, ts.opt_state]

    def call():
        params, opt_state, aux = compiled(state[0], state[1], x, y)
        state[0], state[1] = params, opt_state
        return params, opt_state, aux

    first = jax.block_until_ready(call())[2]  # also the first warm-up step
    times = C.time_calls(call, steps=steps, warmup=max(warmup - 1, 0)) if timed else None
    row = {
        "setting": setting.name,
        "method": method,
        "depth": depth,
        "temp_bytes": mem["temp"],
        "argument_bytes": mem["argument"],
        "output_bytes": mem["output"],
        "alias_bytes": mem["alias"],
        "peak_bytes": C.peak_bytes(),
        "compile_s": compile_s,
        "step_ms": 1e3 * C.median(times) if times else None,
        "step_ms_iqr": [1e3 * float(q) for q in np.percentile(times, [25, 75])] if times else None,
        "timed_steps": len(times) if times else 0,
        "fwd_iters": float(first["fwd_iters"]),
        "bwd_iters": None,
        "loss_first_step": float(first["loss"]),
    }
    if method == "deq-implicit":
        row["bwd_iters"] = _backward_iters(setting, depth)
    elif method.startswith("deq-"):
        # Backward work in VJPs of f: Phantom k, JFB 1, Unrolled one per forward evaluation.
        row["bwd_iters"] = {"deq-phantom5": 5.0, "deq-jfb": 1.0, "deq-unrolled": float(depth)}[method]
    else:
        row["bwd_iters"] = float(depth)
    return row


def run_rows(settings, methods, depths, time_depths, *, steps, warmup, verbose=True):
    rows = []
    total = len(settings) * len(methods) * len(depths)
    for setting in settings:
        for method in methods:
            for depth in depths:
                timed = depth in time_depths.get(setting.name, ())
                row = measure(setting, method, depth, steps=steps, warmup=warmup, timed=timed)
                rows.append(row)
                if verbose:  # progress only (to stderr): the numbers are in the table printed last
                    print(f"  [{len(rows)}/{total}] {setting.name} {method} L={depth}", file=sys.stderr, flush=True)
    return rows


def _isolated_rows(argv, settings, methods):
    """Each (setting, method) in its own process, so the device's peak counter is per method."""
    rows = []
    for setting in settings:
        for method in methods:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "rows.json")
                cmd = [sys.executable, "-m", "benchmarks.memory_vs_depth", *argv,
                       "--_only", f"{setting.name}:{method}", "--_rows", path]
                subprocess.run(cmd, check=True)
                with open(path) as fh:
                    rows.extend(json.load(fh))
    return rows


def targets(rows, *, setting: str = "mlp", at: int = 128) -> dict[str, Any]:
    """The issue's targets as measured ratios (compiled temp bytes; peak bytes when measured)."""
    by = {(r["method"], r["depth"]): r for r in rows if r["setting"] == setting}
    imp = sorted((d, r) for (m, d), r in by.items() if m == "deq-implicit")
    if not imp:
        return {}
    temps = [r["temp_bytes"] for _, r in imp]
    out: dict[str, Any] = {
        "setting": setting,
        "implicit_temp_min_bytes": min(temps),
        "implicit_temp_max_bytes": max(temps),
        "implicit_temp_spread": max(temps) / min(temps) - 1.0,
        "implicit_depths": [imp[0][0], imp[-1][0]],
    }
    out["flat_within_5pct"] = out["implicit_temp_spread"] <= 0.05
    common = [d for d, _ in imp if ("unrolled", d) in by]
    if common:
        d = at if at in common else max(x for x in common if x <= at) if any(x <= at for x in common) else common[0]
        u, i = by[("unrolled", d)], by[("deq-implicit", d)]
        total = lambda r: r["temp_bytes"] + r["output_bytes"]  # noqa: E731
        out.update({
            "ratio_depth": d,
            "unrolled_over_implicit_temp": u["temp_bytes"] / i["temp_bytes"],
            "unrolled_over_implicit_temp_plus_output": total(u) / total(i),
        })
        if ("unrolled+remat", d) in by:
            out["remat_over_implicit_temp"] = by[("unrolled+remat", d)]["temp_bytes"] / i["temp_bytes"]
        out["at_least_10x"] = out["unrolled_over_implicit_temp"] >= 10.0
        if u["peak_bytes"] and i["peak_bytes"]:
            out["unrolled_over_implicit_peak"] = u["peak_bytes"] / i["peak_bytes"]
            peaks = [r["peak_bytes"] for _, r in imp]
            out["implicit_peak_spread"] = max(peaks) / min(peaks) - 1.0
    return out


PLOT_MIN_BYTES = 1024  # smaller temp sizes (68 bytes: a depth-1 unrolled step keeps no buffer) are not plotted


def plot(rows, path, settings):
    """Compiled temp memory vs depth, log-log. Points under 1 KiB (scalars, no real buffer) are
    left out, so the log axis spans the flat and the growing lines rather than 7 decades."""
    series = {}
    dropped = []
    for r in rows:
        label = r["method"] if len(settings) == 1 else f"{r['setting']}: {r['method']}"
        xs, ys = series.setdefault(label, ([], []))
        if r["temp_bytes"] < PLOT_MIN_BYTES:
            dropped.append(f"{label} L={r['depth']}")
            continue
        xs.append(r["depth"])
        ys.append(r["temp_bytes"] / C.MiB)
    styles = {k: STYLES.get(k.split(": ")[-1], "o-") for k in series}
    note = f"\n(not shown, temp < 1 KiB: {', '.join(dropped)})" if dropped else ""
    return C.plot_lines(
        path, series, styles=styles,
        xlabel="effective depth L (unrolled layers / DEQ solver iterations)",
        ylabel="compiled temp memory of the training step (MiB)",
        title="Training-step memory vs depth (XLA memory_analysis)\n" + "; ".join(s.description for s in settings)
        + note,
    )


COLUMNS = [
    ("setting", "setting", ""), ("method", "method", ""), ("depth", "L", "d"),
    ("fwd_iters", "fwd it", ".0f"), ("bwd_iters", "bwd it", ".0f"),
    ("temp_mib", "temp MiB", ".3f"), ("argument_mib", "arg MiB", ".3f"), ("output_mib", "out MiB", ".3f"),
    ("peak_mib", "peak MiB", ".2f"), ("compile_s", "compile s", ".2f"), ("step_ms", "step ms", ".2f"),
]


def table(rows) -> str:
    shown = []
    for r in rows:
        shown.append({**r, "temp_mib": r["temp_bytes"] / C.MiB, "argument_mib": r["argument_bytes"] / C.MiB,
                      "output_mib": r["output_bytes"] / C.MiB,
                      "peak_mib": r["peak_bytes"] / C.MiB if r["peak_bytes"] else None})
    return C.format_table(shown, COLUMNS)


def table_notes(rows, backend: str) -> list[str]:
    """What a '-' in the table means on this backend."""
    notes = ["table ('-': not measured here):"]
    if all(not r["peak_bytes"] for r in rows):
        notes.append(f"  peak MiB: the {backend} backend reports no device memory statistics "
                     "(jax.Device.memory_stats() returns none), so only XLA's compiled sizes (temp/arg/out MiB) "
                     "are measured; GPU and TPU report a peak.")
    if any(r["step_ms"] is None for r in rows):
        notes.append("  step ms: depth not timed (--time-depths; on CPU a subset by default).")
    return notes


def target_lines(t: dict[str, Any]) -> list[str]:
    if not t:
        return []
    lines = [
        f"targets ({t['setting']}):",
        f"  deq-implicit temp memory over L={t['implicit_depths'][0]}..{t['implicit_depths'][1]}: "
        f"{t['implicit_temp_min_bytes'] / C.MiB:.3f} .. {t['implicit_temp_max_bytes'] / C.MiB:.3f} MiB, "
        f"spread {100 * t['implicit_temp_spread']:.2f}% (target <= 5%: {'met' if t['flat_within_5pct'] else 'NOT met'})",
    ]
    if "ratio_depth" in t:
        lines.append(
            f"  plain unrolled / deq-implicit temp at L={t['ratio_depth']}: {t['unrolled_over_implicit_temp']:.1f}x "
            f"(target >= 10x: {'met' if t['at_least_10x'] else 'NOT met'}); temp+output "
            f"{t['unrolled_over_implicit_temp_plus_output']:.1f}x"
            + (f"; unrolled+remat / deq-implicit {t['remat_over_implicit_temp']:.1f}x" if "remat_over_implicit_temp" in t else "")
        )
    if "unrolled_over_implicit_peak" in t:
        lines.append(
            f"  measured device peak: unrolled / deq-implicit {t['unrolled_over_implicit_peak']:.1f}x at L={t['ratio_depth']}; "
            f"deq-implicit peak spread over L {100 * t['implicit_peak_spread']:.2f}%"
        )
    return lines


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_vs_depth", description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="MLP and conv, L up to 1024, every depth timed")
    p.add_argument("--conv", action="store_true", help="add the conv setting (16x16x32 maps)")
    p.add_argument("--settings", nargs="+", choices=["mlp", "conv"], help="explicit settings (overrides --conv)")
    p.add_argument("--depths", type=T.positive_int, nargs="+", help="depths / solver budgets (default 1 2 4 ... 256)")
    p.add_argument("--time-depths", type=T.positive_int, nargs="+",
                   help="depths whose step time is measured (default on CPU: 1 4 16 64 256 for mlp, 1 4 16 for "
                        "conv; all on GPU/TPU and with --full)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--steps", type=T.positive_int, default=20, help="timed steps after warm-up (median reported)")
    p.add_argument("--warmup", type=T.nonneg_int, default=2)
    p.add_argument("--batch", type=T.positive_int, default=64)
    p.add_argument("--width", type=T.positive_int, default=256, help="MLP width")
    p.add_argument("--channels", type=T.positive_int, default=32, help="conv channels")
    p.add_argument("--size", type=T.positive_int, default=16, help="conv map size")
    p.add_argument("--no-isolate", action="store_true",
                   help="on GPU/TPU, do not run each method in its own process (peak bytes become cumulative)")
    p.add_argument("--_only", help=argparse.SUPPRESS)
    p.add_argument("--_rows", help=argparse.SUPPRESS)
    C.out_dir_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    """Runs the benchmark; returns the JSON document it writes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t_start = time.perf_counter()
    names = args.settings or (["mlp", "conv"] if (args.full or args.conv) else ["mlp"])
    depths = tuple(args.depths or (FULL_DEPTHS if args.full else DEFAULT_DEPTHS))
    on_cpu = jax.default_backend() == "cpu"
    if args.time_depths is not None:
        time_depths = {n: set(args.time_depths) for n in names}
    elif args.full:
        time_depths = {n: set(depths) for n in names}
    else:
        time_depths = {"mlp": {d for d in depths if d in DEFAULT_TIMED} if on_cpu else set(depths),
                       "conv": {1, 4, 16} if on_cpu else set(depths)}
    settings = [C.make_setting(n, batch=args.batch, width=args.width, channels=args.channels, size=args.size)
                for n in names]
    methods = list(args.methods)

    if args._only:  # child process of an isolated run
        name, method = args._only.split(":")
        rows = run_rows([s for s in settings if s.name == name], [method], depths, time_depths,
                        steps=args.steps, warmup=args.warmup)
        with open(args._rows, "w") as fh:
            json.dump(rows, fh)
        return {"rows": rows}

    info = C.machine()
    C.flush_print(C.header(info, "memory vs depth: DEQ (jdeq) vs weight-tied unrolled networks, training step"))
    for s in settings:
        C.flush_print(f"setting {s.name}: {s.description}; Adam; DEQ solver Anderson(m=5, tol={TOL:g}, abs, maxiter=L)")
    isolate = (not on_cpu) and C.peak_bytes() is not None and not args.no_isolate
    if isolate:
        C.flush_print("device reports memory stats: each method runs in its own process (per-method peak)")
        rows = _isolated_rows(argv, settings, methods)
    else:
        rows = run_rows(settings, methods, depths, time_depths, steps=args.steps, warmup=args.warmup)

    summary = {s.name: targets(rows, setting=s.name) for s in settings}
    elapsed = time.perf_counter() - t_start
    doc = {
        "benchmark": "memory_vs_depth",
        "machine": info,
        "config": {
            "settings": {s.name: s.description for s in settings}, "methods": methods, "depths": list(depths),
            "time_depths": {k: sorted(v) for k, v in time_depths.items()}, "steps": args.steps,
            "warmup": args.warmup, "solver": f"Anderson(memory=5, tol={TOL:g}, stop_mode='abs', maxiter=L)",
            "optimizer": "optax.adam(1e-3)", "isolated_processes": isolate,
        },
        "rows": rows,
        "targets": summary,
        "elapsed_s": elapsed,
    }
    json_path = C.write_json(args.out, "memory_vs_depth", doc)
    png_path = plot(rows, os.path.join(args.out, "memory_vs_depth.png"), settings)
    doc["files"] = [str(json_path), str(png_path)]
    C.flush_print(f"wrote {json_path} and {png_path} ({elapsed:.0f} s)")
    for s in settings:
        for line in target_lines(summary[s.name]):
            C.flush_print(line)
    for line in table_notes(rows, info["backend"]):  # the legend, then the table last
        C.flush_print(line)
    C.flush_print(table(rows))
    return doc


if __name__ == "__main__":
    main()
