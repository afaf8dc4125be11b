"""SHINE: the backward pass reuses the forward solver's inverse-Jacobian estimate.

Run: ``python -m benchmarks.shine`` (``--quick``: the MLP only, Broyden only, tiny sizes, a few
timed steps: < 60 s).

For the MLP DEQ (``jdeq.models.MLPCell``) and the multiscale DEQ (``jdeq.models.MDEQClassifier``,
small sizes for CPU), each with a Broyden and an Anderson forward solve, it compares the
gradient modes

- ``Implicit()``: the default backward (the forward solver's algorithm, tol and budget);
- ``Implicit(shine="direct")``: the forward estimate as the adjoint, no backward iterations;
- ``Implicit(shine="fallback")``: the estimate where its adjoint residual is at most
  ``shine_tol`` (default 0.5; also 0.1), the full solve for the other examples;
- ``Implicit(shine="refine")``: the backward iterations started at the estimate;
- ``JacobianFree()`` (JFB): no ``(I - J)^{-T}`` at all;

on: backward iterations (matvecs, ``Implicit``'s callback, mean over examples), the median
adjoint residual of the estimate ``||g - (I - J^T) u0|| / ||g||``, the fraction of examples
``"fallback"`` accepted, the gradient's relative error and cosine against a tight
reference (the same forward solve, ``Implicit(tol=1e-6, maxiter=400)``: the exact gradient at
this ``z*`` to float32 accuracy), over every parameter upstream of ``z*`` (the head's gradient
does not depend on the backward), and the loss+gradient step time, all variants timed in
alternation in one run (with the counting callback attached: one host call per step, the
baseline's too); ratio to ``Implicit()`` with the same forward solver. Writes
``results/shine.json`` and ``results/shine.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jdeq
from jdeq import argtypes as T
from benchmarks import _common as C

REF_BACKWARD = {"tol": 1e-6, "maxiter": 400}


def variants(quick: bool = False) -> dict[str, Any]:
    """Name -> ``jdeq.Implicit`` options (None: ``JacobianFree``); the callback for the iteration
    count is added per call. ``--quick`` leaves out the strict fallback."""
    out = {
        "Implicit()": {},
        "shine direct": {"shine": "direct"},
        "shine fallback": {"shine": "fallback"},
        "shine fallback 0.1": {"shine": "fallback", "shine_tol": 0.1},
        "shine refine": {"shine": "refine"},
        "JacobianFree": None,
    }
    if quick:
        del out["shine fallback 0.1"]
    return out


def forward_solvers(model: str, quick: bool) -> dict[str, jdeq.Solver]:
    """Name -> forward solver (``--quick``: Broyden only)."""
    if model == "mlp":
        out = {"Broyden": jdeq.Broyden(tol=1e-4, maxiter=40), "Anderson": jdeq.Anderson(tol=1e-4, maxiter=40)}
    else:
        out = {"Broyden": jdeq.Broyden(tol=1e-3, maxiter=20), "Anderson": jdeq.Anderson(tol=1e-3, maxiter=20)}
    return {"Broyden": out["Broyden"]} if quick else out


def make_model(model: str, args, solver, gradient) -> tuple[nnx.Module, str]:
    """The classifier (same initial weights for every solver and gradient) and its description."""
    if model == "mlp":
        setting = C.make_setting("mlp", batch=args.batch, width=args.width)
        return setting.model(lambda cell: jdeq.nnx.DEQ(cell, solver=solver, gradient=gradient)), setting.description
    widths = tuple(args.mdeq_widths)
    net = jdeq.models.MDEQClassifier(3, 10, widths=widths, solver=solver, gradient=gradient, rngs=nnx.Rngs(0))
    desc = f"MDEQClassifier widths {widths}, {args.size}x{args.size}x3 inputs, batch {args.batch}"
    return net, desc


def make_data(model: str, args):
    kx, ky = jax.random.split(jax.random.key(0))
    if model == "mlp":
        setting = C.make_setting("mlp", batch=args.batch, width=args.width)
        return setting.x, setting.y
    x = jax.random.normal(kx, (args.batch, args.size, args.size, 3), jnp.float32)
    return x, jax.random.randint(ky, (args.batch,), 0, 10)


def _upstream(grads) -> np.ndarray:
    """Gradients of every parameter upstream of z* (everything but the head)."""
    leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    keep = [np.ravel(np.asarray(v, np.float64)) for path, v in leaves
            if not str(getattr(path[0], "key", path[0])).startswith("head")]
    return np.concatenate(keep)


def _loss_and_grad(net):
    graphdef, params = nnx.split(net)

    def loss(p, x, y):
        logits, _ = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.jit(jax.value_and_grad(loss)), params


def measure(model: str, args) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    x, y = make_data(model, args)
    rows, calls, desc = [], {}, ""
    for sname, solver in forward_solvers(model, args.quick).items():
        net, desc = make_model(model, args, solver, jdeq.Implicit(**REF_BACKWARD))
        ref_fn, params = _loss_and_grad(net)
        ref = _upstream(ref_fn(params, x, y)[1])
        for vname, kw in variants(args.quick).items():
            seen: list[Any] = []
            cb = lambda s: seen.append(s)  # noqa: E731
            counted = jdeq.JacobianFree() if kw is None else jdeq.Implicit(callback=cb, **kw)
            fn, p = _loss_and_grad(make_model(model, args, solver, counted)[0])
            g = _upstream(jax.block_until_ready(fn(p, x, y))[1])
            jax.effects_barrier()
            nsteps = np.asarray(seen[-1].nsteps) if seen else None
            row = {
                "model": model, "forward": sname, "gradient": vname,
                "bwd_iters": float(np.mean(nsteps)) if nsteps is not None else 0.0,
                "bwd_iters_max": int(np.max(nsteps)) if nsteps is not None else 0,
                "accepted": float(np.mean(nsteps == 1)) if kw and kw.get("shine") == "fallback" else None,
                "rel_error": float(np.linalg.norm(g - ref) / np.linalg.norm(ref)),
                "cosine": float(g @ ref / (np.linalg.norm(g) * np.linalg.norm(ref))),
                # the estimate's adjoint residual ||g - (I - J^T) u0|| / ||g|| (what "fallback" tests)
                "est_residual": float(np.median(np.asarray(seen[-1].rel_residual)))
                if kw == {"shine": "direct"} else None,
            }
            rows.append(row)
            # the counted call is the timed one (one compile each): its callback is one host
            # call per step, in the baseline too (JacobianFree has none)
            calls[(sname, vname)] = (lambda f, q: lambda: f(q, x, y))(fn, p)
            C.flush_print(f"  {model} {sname:8s} {vname:15s} bwd iters {row['bwd_iters']:5.1f} "
                          f"rel err {row['rel_error']:.2e} cos {row['cosine']:.4f}")
    names = {k: f"{k[0]}|{k[1]}" for k in calls}
    rounds = max(args.steps // 5, 1)
    times = C.time_alternating({names[k]: c for k, c in calls.items()}, rounds=rounds, steps=5, warmup=args.warmup)
    for r in rows:
        t = times[f"{r['forward']}|{r['gradient']}"]
        base = times[f"{r['forward']}|Implicit()"]
        r["step_ms"] = 1e3 * C.median(t)
        per_round = [C.median(t[i * 5:(i + 1) * 5]) / C.median(base[i * 5:(i + 1) * 5]) for i in range(rounds)]
        r["ratio_vs_implicit"] = C.median(per_round)
        r["ratio_range"] = [min(per_round), max(per_round)]
    return rows, {"description": desc}, desc


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.shine", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (< 60 s)")
    p.add_argument("--models", nargs="+", choices=["mlp", "mdeq"], default=None,
                   help="default: both (--quick: mlp)")
    p.add_argument("--batch", type=T.positive_int, default=None, help="batch (default 32, quick 8)")
    p.add_argument("--width", type=T.positive_int, default=None, help="MLP width (default 256, quick 32)")
    p.add_argument("--size", type=T.positive_int, default=None, help="MDEQ input size (default 16, quick 8)")
    p.add_argument("--mdeq-widths", type=T.positive_int, nargs="+", default=None,
                   help="MDEQ channels per scale (default 8 16, quick 4 8)")
    p.add_argument("--steps", type=T.positive_int, default=None, help="timed steps per variant (rounds of 5)")
    p.add_argument("--warmup", type=T.nonneg_int, default=2)
    C.out_dir_arg(p)
    args = p.parse_args(argv)
    q = args.quick
    args.models = args.models or (["mlp"] if q else ["mlp", "mdeq"])
    args.batch = args.batch or (8 if q else 32)
    args.width = args.width or (32 if q else 256)
    args.size = args.size or (8 if q else 16)
    args.mdeq_widths = args.mdeq_widths or ([4, 8] if q else [8, 16])
    args.steps = args.steps or (5 if q else 20)
    if q:
        args.warmup = min(args.warmup, 1)
    return args


def main(argv=None) -> dict[str, Any]:
    """Runs the benchmark; returns the JSON document it writes."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    t_start = time.perf_counter()
    info = C.machine()
    C.flush_print(C.header(info, "SHINE: the backward reuses the forward's inverse-Jacobian estimate"))
    rows, settings = [], {}
    for model in args.models:
        r, s, desc = measure(model, args)
        C.flush_print(f"{model}: {desc}")
        rows += r
        settings[model] = s
    elapsed = time.perf_counter() - t_start
    doc = {
        "benchmark": "shine", "machine": info,
        "config": {"quick": args.quick, "models": settings, "reference_backward": REF_BACKWARD,
                   "forward": {m: {k: repr(v) for k, v in forward_solvers(m, args.quick).items()} for m in args.models},
                   "steps": args.steps, "shine_tol": jdeq.Implicit().shine_tol},
        "rows": rows, "elapsed_s": elapsed,
    }
    json_path = C.write_json(args.out, "shine", doc)
    png_path = _plot(rows, os.path.join(args.out, "shine.png"))
    doc["files"] = [str(json_path), str(png_path)]
    C.flush_print(f"wrote {json_path} and {png_path} ({elapsed:.0f} s)")
    C.flush_print(C.format_table(rows, [
        ("model", "model", ""), ("forward", "forward", ""), ("gradient", "gradient", ""),
        ("bwd_iters", "bwd iters", ".1f"), ("est_residual", "est. resid", ".2f"), ("accepted", "accepted", ".2f"), ("rel_error", "grad rel err", ".2e"),
        ("cosine", "cosine", ".4f"), ("step_ms", "step ms", ".2f"), ("ratio_vs_implicit", "vs Implicit()", ".2f"),
    ]))
    return doc


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    markers = {"Implicit()": "o", "shine direct": "s", "shine fallback": "D", "shine fallback 0.1": "d",
               "shine refine": "^", "JacobianFree": "x"}
    colors = {"Broyden": "C0", "Anderson": "C1"}
    for r in rows:
        ax.scatter(r["ratio_vs_implicit"], max(r["rel_error"], 1e-8), marker=markers[r["gradient"]],
                   color=colors[r["forward"]], alpha=0.9 if r["model"] == "mlp" else 0.5,
                   s=40 if r["model"] == "mlp" else 80)
    for name, m in markers.items():
        ax.scatter([], [], marker=m, color="gray", label=name)
    for name, c in colors.items():
        ax.scatter([], [], marker="o", color=c, label=f"forward {name}")
    ax.set_yscale("log")
    ax.set_xlabel("loss+grad step time / Implicit() (same forward)")
    ax.set_ylabel("gradient rel. error vs tight Implicit")
    ax.set_title("SHINE vs default backward and JFB (small: MLP, large: MDEQ)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
