"""Stabilization and faster solving, measured on a real training run (sklearn's digits).

The same DEQ classifier (``jdeq.models.MLPCell`` on the 64 pixels, Anderson forward solve,
implicit gradient, linear head on ``z*``) is trained with and without each of jdeq's tools:

- ``baseline``: nothing added;
- ``jac_reg``: ``+ gamma * ||J||_F^2 / dim`` (``jdeq.jacobian_penalty``, Bai et al. 2021);
- ``spectral``: spectral norm on the recurrent weight, target 0.9 (``jdeq.models.apply_norm``,
  ``u`` refined by ``jdeq.models.update_norm`` once per step, outside the solve);
- ``weight_norm``: weight norm on the recurrent weight;
- ``dropout``: variational dropout on the state (``jdeq.models.VariationalDropout``, one mask
  per forward solve);
- ``correction``: fixed-point correction, 3 states with phantom gradients and exp weights
  (``jdeq.fixed_point_states`` + ``jdeq.correction_loss``, Geng et al. 2021).

Per epoch it records the train loss, the forward NFE (mean evaluations of the cell per example
in the training forward passes), and on the test set: accuracy, NFE, final relative residual,
``||J||_F`` (Hutchinson, per example, ``sqrt(||J||_F^2)``) and the spectral radius of ``J`` at
``z*`` (power method). Wall time per variant is measured in the same run (training steps only,
compilation excluded), so ratios to the baseline are comparable even on a shared machine.

Then the hypersolver (Bai et al. 2022): ``jdeq.models.HyperSolver`` (learned ``z0`` and learned
Anderson mixing) is trained on the frozen baseline DEQ and compared with plain Anderson on the
test set: evaluations and wall time to reach a relative residual of ``--tol`` (timings
interleaved, median of repeats), and the residual-vs-NFE curves.

Run: ``python -m benchmarks.stabilization`` (``--epochs``, ``--variants``, ``--quick``).
Writes ``results/stabilization.json`` and ``results/stabilization.png``; the table is printed last.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jdeq
from jdeq import argtypes as T
from benchmarks._common import flush_print, format_table, header, machine, out_dir_arg, write_json
from jdeq.data import digits

VARIANTS = ("baseline", "jac_reg", "spectral", "weight_norm", "dropout", "correction")
IN, CLASSES = 64, 10


class DropoutCell(nnx.Module):
    """``MLPCell`` whose state goes through variational dropout: ``tanh(W (m * z) + U x + b)``."""

    def __init__(self, cell, rate, *, rngs):
        self.cell = cell
        self.drop = jdeq.models.VariationalDropout((cell.features,), rate, rngs=rngs)

    def __call__(self, z, x):
        return self.cell(self.drop(z), x)

    def init_z(self, x):
        return self.cell.init_z(x)


class Net(nnx.Module):
    def __init__(self, variant: str, cfg, *, rngs: nnx.Rngs):
        cell = jdeq.models.MLPCell(IN, cfg.width, w_scale=cfg.w_scale, rngs=rngs)
        if variant == "spectral":
            jdeq.models.apply_norm(cell, "spectral", names=("w",), target=0.9, rngs=rngs)
        elif variant == "weight_norm":
            jdeq.models.apply_norm(cell, "weight", names=("w",), rngs=rngs)
        elif variant == "dropout":
            cell = DropoutCell(cell, cfg.dropout, rngs=rngs)
        solver = jdeq.Anderson(tol=cfg.tol, maxiter=cfg.maxiter)
        self.deq = jdeq.nnx.DEQ(cell, solver=solver, gradient=jdeq.Implicit())
        self.head = nnx.Linear(cfg.width, CLASSES, rngs=rngs)
        self.variant = variant


def pure_cell(net):
    """``(f, args_state)``: the DEQ's cell as ``f(z, (state, x))`` (parameters as arguments)."""
    graphdef, state = nnx.split(net.deq.cell)
    return (lambda z, a: nnx.merge(graphdef, a[0])(z, a[1])), state


def make_step(net, tx, cfg):
    opt = nnx.Optimizer(net, tx, wrt=nnx.Param)
    variant = net.variant

    @nnx.jit
    def step(net, opt, x, y, key):
        if variant == "spectral":
            jdeq.models.update_norm(net)  # power iteration once per step, outside the solve
        if variant == "dropout":
            jdeq.models.reset_dropout(net, x.shape[0])  # one mask per forward solve

        def loss_fn(net):
            f, state = pure_cell(net)
            z0 = jnp.zeros((x.shape[0], cfg.width), x.dtype)
            ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(net.head(z), y).mean()
            if variant == "correction":
                sol = jdeq.fixed_point_states(
                    f, z0, (state, x), states=3, solver=net.deq.solver,
                    gradient=jdeq.Phantom(steps=5, damping=0.8),
                )
                loss, _ = jdeq.correction_loss(ce, sol.value, weights="exp", gamma=0.8)
                return loss, sol.stats
            z, stats = net.deq(x)
            loss = ce(z)
            if variant == "jac_reg":
                loss = loss + jdeq.jacobian_penalty(
                    f, jax.lax.stop_gradient(z), (state, x), key, gamma=cfg.gamma, prob=cfg.prob
                )
            return loss, stats

        (loss, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(net)
        opt.update(net, grads)
        return loss, jnp.mean(stats.nsteps.astype(jnp.float32))

    return opt, step


@nnx.jit
def evaluate(net, x, y, key):
    f, state = pure_cell(net)
    z, stats = net.deq(x)
    acc = jnp.mean(jnp.argmax(net.head(z), -1) == y)
    z = jax.lax.stop_gradient(z)
    k1, k2 = jax.random.split(key)
    dim = z.shape[1]
    jf = jnp.sqrt(dim * jdeq.jacobian_frobenius(f, z, (state, x), k1, num_samples=8))
    rho = jdeq.spectral_radius(f, z, (state, x), k2, iters=40)
    return {
        "test_acc": acc,
        "test_nfe": jnp.mean(stats.nsteps.astype(jnp.float32)),
        "test_rel_residual": jnp.mean(stats.rel_residual),
        "test_converged": jnp.mean(stats.converged.astype(jnp.float32)),
        "jac_fro": jnp.mean(jf),
        "spectral_radius": jnp.mean(rho),
    }


def train_variant(variant, data, cfg):
    net = Net(variant, cfg, rngs=nnx.Rngs(params=cfg.seed, dropout=cfg.seed + 1))
    opt, step = make_step(net, optax.adam(cfg.lr), cfg)
    xtr, ytr = data.train["inputs"], data.train["labels"]
    xte, yte = jnp.asarray(data.test["inputs"]), jnp.asarray(data.test["labels"])
    n = len(ytr)
    rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed)
    steps_per_epoch = n // cfg.batch
    # compile (not timed): one step, then restore the state, so training starts from the init.
    # In train mode first: .train()/.eval() flip static flags (nnx.SpectralNorm's
    # use_running_average, dropout's deterministic) that are part of the compiled graph.
    net.train()
    if variant == "dropout":
        jdeq.models.reset_dropout(net, cfg.batch)  # the mask's shape from here on
    snapshot = jax.tree_util.tree_map(jnp.copy, nnx.state((net, opt)))
    t0 = time.perf_counter()
    jax.block_until_ready(step(net, opt, jnp.asarray(xtr[: cfg.batch]), jnp.asarray(ytr[: cfg.batch]), key))
    nnx.update((net, opt), snapshot)
    compile_s = time.perf_counter() - t0
    net.eval()
    ev = {k: float(v) for k, v in evaluate(net, xte, yte, key).items()}
    net.train()
    history = [{"epoch": 0, "train_loss": None, "train_nfe": None, **ev}]
    train_time = 0.0
    for epoch in range(1, cfg.epochs + 1):
        perm = rng.permutation(n)
        losses, nfes = [], []
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch : (i + 1) * cfg.batch]
            xb, yb = jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx])
            key, sub = jax.random.split(key)
            t = time.perf_counter()
            loss, nfe = step(net, opt, xb, yb, sub)
            loss, nfe = float(loss), float(nfe)
            train_time += time.perf_counter() - t
            losses.append(loss)
            nfes.append(nfe)
        net.eval()
        ev = {k: float(v) for k, v in evaluate(net, xte, yte, jax.random.fold_in(key, 7)).items()}
        net.train()
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)),
                        "train_nfe": float(np.mean(nfes)), **ev})
    return net, {"history": history, "train_time_s": train_time, "compile_s": compile_s,
                 "steps": steps_per_epoch * cfg.epochs}


def hypersolver_study(net, data, cfg):
    """HyperSolver trained on the frozen baseline DEQ vs plain Anderson, on the test set."""
    deq = net.deq
    xtr = jnp.asarray(data.train["inputs"])
    xte = jnp.asarray(data.test["inputs"])
    hyper = jdeq.models.HyperSolver(IN, cfg.width, hidden=cfg.hyper_hidden, memory=5,
                                    rngs=nnx.Rngs(cfg.seed + 2))
    frozen = jax.tree_util.tree_map(np.asarray, nnx.state(deq))
    t0 = time.perf_counter()
    losses = hyper.fit(deq, xtr, steps=cfg.hyper_steps, batch_size=128, unroll=cfg.hyper_unroll,
                       learning_rate=3e-3, init_weight=cfg.hyper_init_weight)
    fit_s = time.perf_counter() - t0
    for a, b in zip(jax.tree_util.tree_leaves(frozen), jax.tree_util.tree_leaves(nnx.state(deq))):
        assert np.array_equal(a, b), "the DEQ must stay frozen"
    # calibration on training inputs (the test set is kept for the measurement), by wall time:
    # on a cell this small the mixer's own cost per iteration matters
    calib = hyper.calibrate(deq, xtr[-cfg.eval_batch:], tol=cfg.hyper_tol,
                            maxiter=cfg.maxiter_eval, criterion="time", repeats=cfg.repeats)

    f, state = pure_cell(net)
    tol, maxiter = cfg.hyper_tol, cfg.maxiter_eval
    solvers = {
        "anderson": (lambda x: jnp.zeros((x.shape[0], cfg.width), x.dtype),
                     jdeq.Anderson(tol=tol, maxiter=maxiter)),
        "hyper: init": (hyper_init(hyper, True), jdeq.Anderson(tol=tol, maxiter=maxiter)),
        "hyper: init+mixer": (hyper_init(hyper, True),
                              jdeq.HyperAnderson(params=hyper.mixer_params(), tol=tol,
                                                 maxiter=maxiter)),
        "hyper: calibrated": (hyper_init(hyper, hyper.use_init), hyper.solver(tol=tol, maxiter=maxiter)),
    }
    runs, traces = {}, {}
    for name, (init, solver) in solvers.items():
        def solve(x, state, init=init, solver=solver):
            z0 = init(x)
            sol = jdeq.fixed_point(f, z0, (state, x), solver=solver, gradient=jdeq.JacobianFree())
            return sol.value, sol.stats
        runs[name] = jax.jit(solve)
        jax.block_until_ready(runs[name](xte, state))  # compile
        traced = jax.jit(lambda x, state, init=init, solver=solver: jdeq.fixed_point(
            f, init(x), (state, x), solver=_with_trace(solver, maxiter),
            gradient=jdeq.JacobianFree()).stats.trace)
        tr = np.asarray(traced(xte, state))
        # an example's trace ends (NaN) once it converged: carry its last residual forward
        idx = np.maximum.accumulate(np.where(np.isnan(tr), 0, np.arange(tr.shape[1])), axis=1)
        traces[name] = np.median(np.take_along_axis(tr, idx, axis=1), axis=0)
    # wall time to solve the test set, in batches of 1 (latency: the loop stops when that one
    # example reaches the residual, so time follows its NFE) and of --eval-batch (throughput: a
    # batch's loop runs until its slowest example converges, so per-batch maxima count);
    # interleaved (each repeat times every solver once), median over repeats
    def chunks(bs):
        return [xte[i:i + bs] for i in range(0, len(xte) - bs + 1, bs)]

    timing = {}
    for bs, repeats in ((1, max(3, cfg.repeats // 3)), (cfg.eval_batch, cfg.repeats)):
        parts = chunks(bs)
        for run in runs.values():
            jax.block_until_ready(run(parts[0], state))  # compile this batch shape
        times = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                t = time.perf_counter()
                for c in parts:
                    jax.block_until_ready(run(c, state))
                times[name].append(time.perf_counter() - t)
        timing[bs] = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    out = {}
    z_ref, conv_ref = None, None
    for name, run in runs.items():
        z, stats = run(xte, state)
        if z_ref is None:
            z_ref, conv_ref = z, stats.converged
        both = conv_ref & stats.converged
        batch_max = [int(jnp.max(run(c, state)[1].nsteps)) for c in chunks(cfg.eval_batch)]
        out[name] = {
            "nfe_mean": float(jnp.mean(stats.nsteps)),
            "nfe_batch_max": float(np.mean(batch_max)),
            "converged": float(jnp.mean(stats.converged)),
            "rel_residual": float(jnp.mean(stats.rel_residual)),
            "time_ms_batch1": timing[1][name],
            "time_ms": timing[cfg.eval_batch][name],
            # same fixed point? per example max |z - z_anderson| over examples both converged on
            # (a DEQ may have several fixed points for a few inputs: count those separately)
            "median_dz_vs_anderson": float(jnp.median(jnp.max(jnp.abs(z - z_ref), 1)[both])),
            "frac_dz_gt_0.05": float(jnp.mean((jnp.max(jnp.abs(z - z_ref), 1) > 0.05)[both])),
        }
    base = out["anderson"]
    for r in out.values():
        r["nfe_speedup"] = base["nfe_mean"] / r["nfe_mean"]
        r["time_speedup"] = base["time_ms"] / r["time_ms"]
        r["time_speedup_batch1"] = base["time_ms_batch1"] / r["time_ms_batch1"]
    return {"fit_s": fit_s, "fit_loss_first": losses[0], "fit_loss_last": float(np.mean(losses[-10:])),
            "calibration_s": calib, "kept": {"init": hyper.use_init, "mixer": hyper.use_mixer},
            "solvers": out, "median_residual_trace": {k: v.tolist() for k, v in traces.items()}}


def hyper_init(hyper, on):
    if not on:
        return lambda x: jnp.zeros((x.shape[0], hyper.features), x.dtype)
    graphdef, state = nnx.split(hyper)
    return lambda x: nnx.merge(graphdef, state).init_z(x)


def _with_trace(solver, maxiter):
    import dataclasses

    return dataclasses.replace(solver, trace=True, maxiter=maxiter)


def plot(path, results, hyper):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    panels = [("train_nfe", "forward NFE per example (train)"), ("test_acc", "test accuracy"),
              ("jac_fro", "Frobenius norm of J at z* (test)"), ("spectral_radius", "spectral radius of J (test)")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 3.8), dpi=110)
    for ax, (key, title) in zip(axes, panels):
        for name in names:
            h = [r for r in results[name]["history"] if r[key] is not None]
            ax.plot([r["epoch"] for r in h], [r[key] for r in h], "o-", ms=3, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    if hyper is not None:
        for name, trace in hyper["median_residual_trace"].items():
            ax.semilogy(np.arange(1, len(trace) + 1), trace, ".-", label=name)
        ax.axhline(hyper["tol"], color="k", lw=0.8, ls="--")
        ax.set_title(f"hypersolver on '{hyper['deq']}': median rel. residual (test)", fontsize=9)
        ax.set_xlabel("evaluations of f")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.stabilization", description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=T.positive_int, default=8)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--width", type=T.positive_int, default=64)
    p.add_argument("--w-scale", type=T.positive_float, default=1.1)
    p.add_argument("--lr", type=T.positive_float, default=3e-3)
    p.add_argument("--batch", type=T.positive_int, default=128)
    p.add_argument("--tol", type=T.positive_float, default=1e-3, help="forward tolerance in training")
    p.add_argument("--maxiter", type=T.positive_int, default=40)
    p.add_argument("--gamma", type=T.nonneg_float, default=1.0, help="Jacobian regularization weight")
    p.add_argument("--prob", type=T.probability, default=1.0, help="probability of the Jacobian term")
    p.add_argument("--dropout", type=T.rate, default=0.1)
    p.add_argument("--hyper-on", default="jac_reg",
                   help="the trained variant whose frozen DEQ gets a hypersolver (default jac_reg: "
                        "every test example converges, so time-to-residual is defined; falls back "
                        "to baseline when jac_reg is not run)")
    p.add_argument("--hyper-steps", type=T.positive_int, default=1000)
    p.add_argument("--hyper-unroll", type=T.positive_int, default=10)
    p.add_argument("--hyper-hidden", type=T.positive_int, default=256)
    p.add_argument("--hyper-init-weight", type=T.nonneg_float, default=1.0)
    p.add_argument("--hyper-tol", type=T.positive_float, default=1e-3)
    p.add_argument("--maxiter-eval", type=T.positive_int, default=60)
    p.add_argument("--repeats", type=T.positive_int, default=15)
    p.add_argument("--eval-batch", type=T.positive_int, default=40, help="batch size of the timed solves")
    p.add_argument("--seed", type=T.nonneg_int, default=0)
    p.add_argument("--no-hyper", action="store_true")
    p.add_argument("--quick", action="store_true", help="2 epochs, 2 variants, short hypersolver")
    out_dir_arg(p)
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.epochs, cfg.variants, cfg.hyper_steps, cfg.repeats = 2, "baseline,jac_reg", 100, 5
    variants = [v for v in cfg.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {VARIANTS}")
    info = machine()
    flush_print(header(info, "stabilization: Jacobian reg., norms, dropout, correction, hypersolver"))
    data = digits.load(seed=cfg.seed, flat=True)
    flush_print(f"data: digits, {len(data.train['labels'])} train / {len(data.test['labels'])} test; "
                f"DEQ MLPCell width {cfg.width}, w_scale {cfg.w_scale}, Anderson tol {cfg.tol}, "
                f"maxiter {cfg.maxiter}, {cfg.epochs} epochs of batch {cfg.batch}, adam {cfg.lr}")
    t_start = time.perf_counter()
    results, nets = {}, {}
    for v in variants:
        t = time.perf_counter()
        nets[v], results[v] = train_variant(v, data, cfg)
        last = results[v]["history"][-1]
        flush_print(f"  {v:12s} acc {last['test_acc']:.3f}  train NFE {last['train_nfe']:.1f}  "
                    f"||J||_F {last['jac_fro']:.2f}  rho {last['spectral_radius']:.2f}  "
                    f"({time.perf_counter() - t:.0f} s incl. compile)")
    hyper = None
    hyper_on = cfg.hyper_on if cfg.hyper_on in nets else "baseline"
    if not cfg.no_hyper and hyper_on in nets:
        t = time.perf_counter()
        hyper = hypersolver_study(nets[hyper_on], data, cfg)
        hyper["tol"], hyper["deq"] = cfg.hyper_tol, hyper_on
        flush_print(f"  hypersolver trained in {hyper['fit_s']:.0f} s; calibration by time (ms): "
                    f"{ {k: round(1e3 * v, 2) for k, v in hyper['calibration_s'].items()} }, kept "
                    f"{hyper['kept']} ({time.perf_counter() - t:.0f} s)")
    base_time = results.get("baseline", {}).get("train_time_s")
    rows = []
    for v, r in results.items():
        h = r["history"]
        rows.append({
            "variant": v,
            "acc": h[-1]["test_acc"],
            "nfe_first": h[1]["train_nfe"],
            "nfe_last": h[-1]["train_nfe"],
            "nfe_mean": float(np.mean([e["train_nfe"] for e in h[1:]])),
            "test_nfe": h[-1]["test_nfe"],
            "resid": h[-1]["test_rel_residual"],
            "jac": h[-1]["jac_fro"],
            "rho": h[-1]["spectral_radius"],
            "time": r["train_time_s"],
            "ratio": r["train_time_s"] / base_time if base_time else None,
        })
    data_out = {"machine": info, "config": vars(cfg), "variants": results, "hypersolver": hyper,
                "summary": rows, "total_s": time.perf_counter() - t_start}
    path = write_json(cfg.out, "stabilization", data_out)
    from pathlib import Path

    png = Path(cfg.out) / "stabilization.png"
    plot(png, results, hyper)
    flush_print(f"wrote {path} and {png} (total {data_out['total_s']:.0f} s)")
    if hyper is not None:
        hrows = [{"solver": k, **v} for k, v in hyper["solvers"].items()]
        flush_print(f"\nhypersolver vs Anderson on the frozen '{hyper['deq']}' DEQ (test set, "
                    f"rel. residual {cfg.hyper_tol:g}; time to solve all {len(data.test['labels'])} "
                    "in batches of 1 and of " f"{cfg.eval_batch}; x = speedup over Anderson):")
        flush_print(format_table(hrows, [
            ("solver", "solver", ""), ("nfe_mean", "NFE mean", ".2f"),
            ("nfe_batch_max", "NFE batch max", ".1f"),
            ("converged", "conv.", ".3f"), ("nfe_speedup", "NFE x", ".2f"),
            ("time_ms_batch1", "ms (bs 1)", ".1f"), ("time_speedup_batch1", "x (bs 1)", ".2f"),
            ("time_ms", f"ms (bs {cfg.eval_batch})", ".1f"), ("time_speedup", f"x (bs {cfg.eval_batch})", ".2f"),
            ("median_dz_vs_anderson", "med |dz|", ".1e"), ("frac_dz_gt_0.05", "|dz|>.05", ".3f")]))
    flush_print(f"\ntraining with each tool ({cfg.epochs} epochs; NFE = forward evaluations per "
                "example; time = training steps only, ratio to baseline):")
    flush_print(format_table(rows, [
        ("variant", "variant", ""), ("acc", "test acc", ".3f"), ("nfe_first", "NFE ep1", ".1f"),
        ("nfe_last", "NFE last", ".1f"), ("nfe_mean", "NFE mean", ".1f"),
        ("test_nfe", "test NFE", ".1f"), ("resid", "test resid", ".1e"), ("jac", "||J||_F", ".2f"),
        ("rho", "rho(J)", ".2f"), ("time", "train s", ".1f"), ("ratio", "time x", ".2f")]))


if __name__ == "__main__":
    main()
