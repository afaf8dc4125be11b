"""Per-example code under ``jax.vmap`` against the batched solve, side by side.

Run: ``python -m benchmarks.vmap_speed`` (``--quick`` for a tiny run, ``--rounds N``).

Three ways to solve the same batch of DEQ fixed points (MLP cell ``tanh(z W + x U + b)``, width
``--width``, batch ``--batch``), each jitted, timed in alternation (interleaved rounds, medians):

* ``batched``: ``jdeq.fixed_point`` on the ``(batch, width)`` state (the reference);
* ``vmap``: ``jax.vmap`` of per-example code (``batched=False``), which jdeq's batching rule maps
  onto the same batch-wide loop;
* ``vmap, generic rule``: the same per-example solve vmapped with JAX's own while-loop batching
  (jdeq's loop called on a batch of one without the rule), which selects over the whole loop
  carry, solver history included, every iteration: what a per-example solve costs without the
  rule.

For each solver (FixedPointIteration, Anderson, Broyden) it times the forward solve and the
training step (loss + gradient with ``jdeq.Implicit``) and reports ratios to ``batched``. Also
checks that the three give the same values. Writes ``results/vmap_speed.json`` and ``.png``;
prints the machine first and the table last.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jdeq
from jdeq import argtypes as T
from jdeq._loop import run_loop
from benchmarks import _common as C

SOLVERS = {
    "fpi": lambda: jdeq.FixedPointIteration(tol=1e-4, maxiter=100),
    "anderson": lambda: jdeq.Anderson(tol=1e-4, maxiter=100),
    "broyden": lambda: jdeq.Broyden(tol=1e-4, maxiter=100),
}


def cell(z, p):
    return jnp.tanh(z @ p["W"] + p["x"] @ p["U"] + p["b"])


def make_problem(width: int, batch: int, seed: int = 0):
    k = jax.random.split(jax.random.key(seed), 3)
    W = jax.random.normal(k[0], (width, width)) * 0.9 / np.sqrt(width)
    U = jax.random.normal(k[1], (width, width)) / np.sqrt(width)
    x = jax.random.normal(k[2], (batch, width))
    return {"W": W, "U": U, "b": jnp.zeros(width)}, x


def variants(solver, width: int):
    """name -> f(params, x) returning the (batch, width) fixed points."""

    def batched(p, x):
        return jdeq.fixed_point(cell, jnp.zeros_like(x), {**p, "x": x}, solver=solver).value

    def vmapped(p, x):
        one = lambda xi: jdeq.fixed_point(cell, jnp.zeros(width), {**p, "x": xi}, solver=solver,  # noqa: E731
                                          batched=False).value
        return jax.vmap(one)(x)

    def generic(p, x):  # forward only: jdeq's loop on one row, vmapped by JAX's own rule
        def one(xi):
            F = lambda z: cell(z, {**p, "x": xi[None]})  # noqa: E731
            return run_loop(solver, F, jnp.zeros((1, width)), solver.maxiter)[0][0]

        return jax.vmap(one)(x)

    return {"batched": batched, "vmap": vmapped, "vmap, generic rule": generic}


def train_step(solve):
    def loss(p, x):
        return jnp.mean(solve(p, x) ** 2)

    return jax.value_and_grad(loss)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=T.positive_int, default=64)
    parser.add_argument("--batch", type=T.positive_int, default=64)
    parser.add_argument("--rounds", type=T.positive_int, default=5)
    parser.add_argument("--steps", type=T.positive_int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds (smoke test)")
    C.out_dir_arg(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.batch, args.rounds, args.steps = 8, 4, 2, 2
    info = C.machine()
    C.flush_print(C.header(info, "vmap of per-example code vs the batched solve"))
    p, x = make_problem(args.width, args.batch)
    rows = []
    for sname, make in SOLVERS.items():
        solver = make()
        fns = variants(solver, args.width)
        fwd = {k: jax.jit(f) for k, f in fns.items()}
        ref = fwd["batched"](p, x)
        err = {k: float(jnp.max(jnp.abs(f(p, x) - ref))) for k, f in fwd.items()}
        grads = {k: jax.jit(train_step(fns[k])) for k in ("batched", "vmap")}
        g_ref = grads["batched"](p, x)[1]
        g_err = float(max(jnp.max(jnp.abs(a - b)) for a, b in zip(jax.tree.leaves(grads["vmap"](p, x)[1]),
                                                                      jax.tree.leaves(g_ref))))
        calls = {f"fwd {k}": (lambda f=f: f(p, x)) for k, f in fwd.items()}
        calls.update({f"train {k}": (lambda f=f: f(p, x)) for k, f in grads.items()})
        times = C.time_alternating(calls, rounds=args.rounds, steps=args.steps)
        med = {k: C.median(v) for k, v in times.items()}
        for kind in ("fwd", "train"):
            base = med[f"{kind} batched"]
            for name in ("batched", "vmap", "vmap, generic rule"):
                key = f"{kind} {name}"
                if key not in med:
                    continue
                rows.append({
                    "solver": sname, "pass": kind, "variant": name, "ms": 1e3 * med[key],
                    "ratio": med[key] / base,
                    "max |diff|": err[name] if kind == "fwd" else (g_err if name == "vmap" else 0.0),
                })
    out = {"machine": info, "args": vars(args), "rows": rows}
    C.write_json(args.out, "vmap_speed", out)
    series = {}
    for name in ("vmap", "vmap, generic rule"):
        pts = [(i, r["ratio"]) for i, r in enumerate(rr for rr in rows if rr["pass"] == "fwd" and rr["variant"] == name)]
        if pts:
            series[f"forward, {name}"] = ([i + 1 for i, _ in pts], [v for _, v in pts])
    C.plot_lines(f"{args.out}/vmap_speed.png", series, xlabel="solver (1 fpi, 2 anderson, 3 broyden)",
                 ylabel="time / batched", title=f"vmap vs batched ({info.get('cpu', '')})", loglog=False)
    C.flush_print(C.format_table(rows, [("solver", "solver", ""), ("pass", "pass", ""), ("variant", "variant", ""),
                                        ("ms", "median ms", ".3f"), ("ratio", "x batched", ".2f"),
                                        ("max |diff|", "max |diff| vs batched", ".1e")]))
    return out


if __name__ == "__main__":
    main()
