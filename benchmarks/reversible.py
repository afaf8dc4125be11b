"""Reversible DEQ (McCallum et al. 2025): float32 drift, gradient accuracy, memory, training.

``jdeq.Reversible()`` differentiates ``jdeq.ReversibleIteration`` exactly by rebuilding its
iterates in reverse. Four measurements on an MLP cell ``z' = tanh(z W + x U + b)``:

1. reconstruction drift in float32 against ``beta`` and the number of evaluations (the
   tolerance is unreachable, so every step is replayed, the worst case): the relative error of
   the rebuilt start ``z_0`` and of the float32 gradient against the float64 gradient of the
   same iterations (float32 backprop through stored iterates, ``Unrolled``, is the floor);
2. gradient accuracy at equal forward NFE (float64): the relative error, against the exact
   gradient of the true fixed point, of ``Reversible`` (``ReversibleIteration``, ``N``
   evaluations) and of ``Implicit`` (Anderson, ``N`` evaluations forward and the same budget
   backward); plus ``Reversible`` against backprop through its own iterations;
3. compiled temporary memory of ``jit(grad)`` against ``maxiter`` for ``Reversible``,
   ``Unrolled`` through the same iterations, and ``Implicit`` (Anderson);
4. a short training run on sklearn's digits: ``Reversible`` against ``Implicit`` (Anderson):
   test accuracy, forward NFE per example, training time (steps only, compilation excluded).

Run: ``python -m benchmarks.reversible`` (``--quick`` for a smoke run). Writes
``results/reversible.json`` and ``results/reversible.png``; the training table is printed last.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jdeq
from benchmarks._common import flush_print, format_table, header, machine, out_dir_arg, write_json
from jdeq import argtypes as T
from jdeq._reversible import _forward

IN, CLASSES = 64, 10


def cell(z, p):
    return jnp.tanh(z @ p["W"] + p["x"] @ p["U"] + p["b"])


def init_params(key, width, w_scale, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "W": (w_scale / np.sqrt(width)) * jax.random.normal(k1, (width, width), dtype),
        "U": jax.random.normal(k2, (IN, width), dtype) / np.sqrt(IN),
        "b": jnp.zeros((width,), dtype),
        "head": jax.random.normal(k3, (width, CLASSES), dtype) / np.sqrt(width),
    }


def probe_loss(p, x, solver, gradient, maxiter=None):
    z0 = jnp.zeros((x.shape[0], p["W"].shape[0]), x.dtype)
    sol = jdeq.fixed_point(cell, z0, {**p, "x": x}, solver=solver, gradient=gradient, maxiter=maxiter)
    return jnp.mean(jnp.sin(sol.value @ p["head"])), sol.stats


def _grad(p, x, solver, gradient, with_stats=False):
    keys = ("W", "U", "b")
    fn = jax.jit(jax.grad(lambda q: probe_loss({**p, **q}, x, solver, gradient), has_aux=True))
    g, stats = fn({k: p[k] for k in keys})
    g = jnp.concatenate([jnp.ravel(g[k]).astype(jnp.float64) for k in keys])
    return (g, stats) if with_stats else g


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def drift_study(cfg, p64, x64):
    """Float32 reconstruction and gradient drift against beta and evaluations."""
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p64)
    x32 = x64.astype(jnp.float32)
    rows = []
    for beta in cfg.betas:
        for n in cfg.nfes:
            rev = jdeq.ReversibleIteration(beta=beta, tol=1e-30, maxiter=n)
            g_true = _grad(p64, x64, rev, jdeq.Unrolled())
            g_rev = _grad(p32, x32, rev, jdeq.Reversible())
            g_unr = _grad(p32, x32, rev, jdeq.Unrolled())
            # rebuild z_0 from the final states, in float32
            F = lambda z: cell(z, {**p32, "x": x32})  # noqa: E731
            z0 = jnp.zeros((x32.shape[0], p32["W"].shape[0]), jnp.float32)
            _, _, (y, z, steps, _) = _forward(beta, 1e-30, 1, F, z0, n, stop_fraction=1.0)
            for _ in range(int(steps.max())):
                z = (z - beta * F(y)) / (1 - beta)
                y = (y - beta * F(z)) / (1 - beta)
            fz_scale = float(jnp.linalg.norm(F(z0)))
            rows.append({
                "beta": beta, "nfe": n, "steps": int(steps.max()),
                "z0_error": float(jnp.linalg.norm(z - z0) / fz_scale),
                "grad_error": _rel(g_rev, g_true), "unrolled_f32_error": _rel(g_unr, g_true),
            })
            flush_print(f"  drift beta {beta:.1f} NFE {n:3d}: z0 {rows[-1]['z0_error']:.1e}  "
                        f"grad {rows[-1]['grad_error']:.1e} (unrolled f32 {rows[-1]['unrolled_f32_error']:.1e})")
    return rows


def accuracy_study(cfg, p64, x64):
    """Float64 gradient error against the exact fixed-point gradient at equal forward NFE."""
    exact = _grad(p64, x64, jdeq.Anderson(tol=1e-13, maxiter=300),
                  jdeq.Implicit(solver=jdeq.Anderson(tol=1e-13, maxiter=300)))
    rows = []
    for n in cfg.nfes:
        rev = jdeq.ReversibleIteration(beta=cfg.beta, tol=1e-30, maxiter=n)
        g_rev, s_rev = _grad(p64, x64, rev, jdeq.Reversible(), with_stats=True)
        g_unr = _grad(p64, x64, rev, jdeq.Unrolled())
        g_imp, s_imp = _grad(p64, x64, jdeq.Anderson(tol=1e-30, maxiter=n), jdeq.Implicit(), with_stats=True)
        rows.append({
            "nfe": n, "reversible_vs_exact": _rel(g_rev, exact), "implicit_vs_exact": _rel(g_imp, exact),
            "reversible_vs_own_unrolled": _rel(g_rev, g_unr),
            "reversible_residual": float(jnp.median(s_rev.rel_residual)),
            "anderson_residual": float(jnp.median(s_imp.rel_residual)),
        })
        flush_print(f"  accuracy NFE {n:3d}: reversible {rows[-1]['reversible_vs_exact']:.1e} "
                    f"implicit {rows[-1]['implicit_vs_exact']:.1e}")
    return rows


def memory_study(cfg):
    p = init_params(jax.random.key(0), cfg.mem_width, 0.9)
    x = jax.random.normal(jax.random.key(1), (cfg.mem_batch, IN), jnp.float32)
    rows = []
    for m in cfg.mem_maxiters:
        rev = jdeq.ReversibleIteration(beta=cfg.beta, tol=1e-30, maxiter=m)
        row = {"maxiter": m}
        for name, solver, grad in (("reversible", rev, jdeq.Reversible()), ("unrolled", rev, jdeq.Unrolled()),
                                   ("implicit", jdeq.Anderson(tol=1e-30, maxiter=m), jdeq.Implicit())):
            fn = jax.jit(jax.grad(lambda q: probe_loss(q, x, solver, grad)[0]))
            row[name] = fn.lower(p).compile().memory_analysis().temp_size_in_bytes / 2**20
        rows.append(row)
        flush_print(f"  memory maxiter {m:4d}: " + "  ".join(f"{k} {v:.2f} MiB" for k, v in row.items() if k != "maxiter"))
    return rows


def train_study(cfg):
    from jdeq.data import digits

    data = digits.load(seed=cfg.seed, flat=True)
    xtr, ytr = data.train["inputs"], data.train["labels"]
    xte, yte = jnp.asarray(data.test["inputs"]), jnp.asarray(data.test["labels"])
    methods = {
        "reversible": (jdeq.ReversibleIteration(beta=cfg.beta, tol=cfg.tol, maxiter=cfg.maxiter), jdeq.Reversible()),
        "implicit": (jdeq.Anderson(tol=cfg.tol, maxiter=cfg.maxiter), jdeq.Implicit()),
    }
    tx = optax.adam(cfg.lr)
    out = {}
    for name, (solver, gradient) in methods.items():
        p = init_params(jax.random.key(cfg.seed), cfg.width, cfg.w_scale)

        def forward(p, x):
            z0 = jnp.zeros((x.shape[0], cfg.width), x.dtype)
            sol = jdeq.fixed_point(cell, z0, {**p, "x": x}, solver=solver, gradient=gradient)
            return sol.value @ p["head"], sol.stats

        @jax.jit
        def step(p, opt, x, y):
            def loss_fn(p):
                logits, stats = forward(p, x)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats

            (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
            upd, opt = tx.update(g, opt, p)
            return optax.apply_updates(p, upd), opt, loss, jnp.mean(stats.nsteps.astype(jnp.float32))

        @jax.jit
        def evaluate(p):
            logits, stats = forward(p, xte)
            return jnp.mean(jnp.argmax(logits, -1) == yte), jnp.mean(stats.nsteps.astype(jnp.float32))

        opt = tx.init(p)
        t0 = time.perf_counter()
        jax.block_until_ready(step(p, opt, jnp.asarray(xtr[: cfg.batch]), jnp.asarray(ytr[: cfg.batch])))  # compile
        jax.block_until_ready(evaluate(p))
        compile_s = time.perf_counter() - t0
        rng = np.random.default_rng(cfg.seed)
        n = len(ytr)
        train_s, nfes, history = 0.0, [], []
        for epoch in range(1, cfg.epochs + 1):
            perm = rng.permutation(n)
            for i in range(n // cfg.batch):
                idx = perm[i * cfg.batch : (i + 1) * cfg.batch]
                t = time.perf_counter()
                p, opt, loss, nfe = step(p, opt, jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx]))
                loss, nfe = float(loss), float(nfe)
                train_s += time.perf_counter() - t
                nfes.append(nfe)
            acc, test_nfe = map(float, evaluate(p))
            history.append({"epoch": epoch, "test_acc": acc, "test_nfe": test_nfe, "train_nfe": float(np.mean(nfes[-(n // cfg.batch):]))})
        out[name] = {"history": history, "train_s": train_s, "compile_s": compile_s, "train_nfe_mean": float(np.mean(nfes)),
                     "test_acc": history[-1]["test_acc"], "test_nfe": history[-1]["test_nfe"], "loss_last": loss}
        flush_print(f"  train {name:10s}: acc {acc:.3f}  train NFE {out[name]['train_nfe_mean']:.1f}  "
                    f"test NFE {test_nfe:.1f}  {train_s:.1f} s")
    return out


def plot(path, drift, acc, mem):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=110)
    ax = axes[0]
    for beta in sorted({r["beta"] for r in drift}):
        rs = [r for r in drift if r["beta"] == beta]
        ax.semilogy([r["nfe"] for r in rs], [max(r["grad_error"], 1e-9) for r in rs], "o-", label=f"beta {beta}")
    ax.axhline(1e-3, color="k", lw=0.8, ls="--")
    ax.set(xlabel="evaluations of f (every step replayed)", ylabel="rel. gradient error (float32)",
           title="reconstruction drift, float32")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.semilogy([r["nfe"] for r in acc], [r["reversible_vs_exact"] for r in acc], "o-", label="Reversible")
    ax.semilogy([r["nfe"] for r in acc], [r["implicit_vs_exact"] for r in acc], "s-", label="Implicit (Anderson)")
    ax.set(xlabel="forward NFE", ylabel="rel. error vs exact fixed-point gradient", title="gradient accuracy (float64)")
    ax.legend(fontsize=7)
    ax = axes[2]
    for k, s in (("reversible", "o-"), ("unrolled", "s-"), ("implicit", "^-")):
        ax.loglog([r["maxiter"] for r in mem], [max(r[k], 1e-3) for r in mem], s, label=k)
    ax.set(xlabel="maxiter", ylabel="compiled temp memory (MiB)", title="jit(grad) memory")
    ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.reversible", description=__doc__.split("\n")[0])
    ap.add_argument("--beta", type=float, default=0.8, help="beta of the accuracy, memory and training runs")
    ap.add_argument("--betas", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.8, 0.9])
    ap.add_argument("--nfes", type=T.positive_int, nargs="+", default=[5, 9, 13, 21, 41, 81])
    ap.add_argument("--probe-width", type=T.positive_int, default=64)
    ap.add_argument("--probe-batch", type=T.positive_int, default=32)
    ap.add_argument("--mem-width", type=T.positive_int, default=256)
    ap.add_argument("--mem-batch", type=T.positive_int, default=64)
    ap.add_argument("--mem-maxiters", type=T.positive_int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--width", type=T.positive_int, default=64)
    ap.add_argument("--w-scale", type=T.positive_float, default=1.1)
    ap.add_argument("--lr", type=T.positive_float, default=3e-3)
    ap.add_argument("--batch", type=T.positive_int, default=128)
    ap.add_argument("--tol", type=T.positive_float, default=1e-3, help="forward tolerance in training")
    ap.add_argument("--maxiter", type=T.positive_int, default=41, help="forward budget (NFE) in training")
    ap.add_argument("--epochs", type=T.positive_int, default=8)
    ap.add_argument("--seed", type=T.nonneg_int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one epoch")
    out_dir_arg(ap)
    cfg = ap.parse_args(argv)
    if cfg.quick:
        cfg.betas, cfg.nfes, cfg.mem_maxiters, cfg.epochs = [0.5, 0.8], [5, 13], [16, 64], 1
        cfg.probe_width, cfg.probe_batch, cfg.mem_width, cfg.mem_batch = 16, 8, 32, 8
    info = machine()
    flush_print(header(info, "reversible: RevDEQ drift, gradient accuracy, memory, training"))
    t_start = time.perf_counter()
    with jax.enable_x64(True):
        p64 = init_params(jax.random.key(cfg.seed), cfg.probe_width, 0.9, jnp.float64)
        p64["U"] = p64["U"] * 2.0
        x64 = jax.random.normal(jax.random.key(cfg.seed + 1), (cfg.probe_batch, IN), jnp.float64)
        drift = drift_study(cfg, p64, x64)
        acc = accuracy_study(cfg, p64, x64)
    mem = memory_study(cfg)
    train = train_study(cfg)
    doc = {"machine": info, "config": vars(cfg), "drift": drift, "accuracy": acc, "memory": mem,
           "training": train, "total_s": time.perf_counter() - t_start}
    path = write_json(cfg.out, "reversible", doc)
    png = Path(cfg.out) / "reversible.png"
    plot(png, drift, acc, mem)
    flush_print(f"wrote {path} and {png} (total {doc['total_s']:.0f} s)")
    flush_print("\nfloat32 drift (tol unreachable: every step replayed); errors relative to the float64 gradient:")
    flush_print(format_table(drift, [("beta", "beta", ".1f"), ("nfe", "NFE", "d"), ("z0_error", "z0 rebuilt err", ".1e"),
                                     ("grad_error", "grad err (Reversible)", ".1e"),
                                     ("unrolled_f32_error", "grad err (Unrolled f32)", ".1e")]))
    flush_print(f"\ngradient accuracy at equal forward NFE (float64, beta {cfg.beta}), rel. error vs exact fixed-point gradient:")
    flush_print(format_table(acc, [("nfe", "NFE", "d"), ("reversible_vs_exact", "Reversible", ".1e"),
                                   ("implicit_vs_exact", "Implicit", ".1e"),
                                   ("reversible_vs_own_unrolled", "Rev vs own Unrolled", ".1e"),
                                   ("reversible_residual", "rev resid", ".1e"), ("anderson_residual", "AA resid", ".1e")]))
    flush_print(f"\ncompiled temp memory of jit(grad), MiB (width {cfg.mem_width}, batch {cfg.mem_batch}, float32):")
    flush_print(format_table(mem, [("maxiter", "maxiter", "d"), ("reversible", "Reversible", ".2f"),
                                   ("unrolled", "Unrolled", ".2f"), ("implicit", "Implicit", ".2f")]))
    rows = [{"method": k, **{kk: v[kk] for kk in ("test_acc", "train_nfe_mean", "test_nfe", "train_s", "compile_s")}}
            for k, v in train.items()]
    flush_print(f"\ntraining on digits ({cfg.epochs} epochs, width {cfg.width}, tol {cfg.tol}, maxiter {cfg.maxiter}, "
                f"beta {cfg.beta}; time = steps only):")
    flush_print(format_table(rows, [("method", "method", ""), ("test_acc", "test acc", ".3f"),
                                    ("train_nfe_mean", "train NFE", ".1f"), ("test_nfe", "test NFE", ".1f"),
                                    ("train_s", "train s", ".1f"), ("compile_s", "compile s", ".1f")]))


if __name__ == "__main__":
    main()
