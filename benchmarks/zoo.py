"""The model zoo on real data: MDEQ, monDEQ and a transformer-cell sequence DEQ against explicit
baselines of similar size, on scikit-learn's digits and on MNIST-1D (generated offline).

Run: ``python -m benchmarks.zoo`` (default: digits and MNIST-1D, 3 seeds x 150 steps, batch
64; ~5 minutes on 2 free CPU cores); ``--full``: MNIST-1D at Greydanus 2020's setting (batch 100,
6000 steps; the slow DEQs fewer: MDEQ, the sequence DEQ and the conv monDEQ 2000), plus the conv
monDEQ, 3 seeds, written to ``results/zoo_full.json`` / ``.png``. Options:
``--only NAME[,NAME]``, ``--tasks``, ``--seeds``, ``--steps``, ``--steps-scale``, ``--lr`` (default 3e-3,
AdamW with cosine decay, for every model).

For every model: test accuracy (mean +- std over seeds; each seed re-draws the initialization
and the batch order; the data split is fixed), trainable parameters, XLA's compiled memory of
one training step (``memory_analysis``: temp + argument + output bytes), the step time (median
and minimum of 20 calls of the compiled step, and the mean over the training run; on a shared
machine the median can sit far above the minimum: the 1-minute load average is recorded), and
for DEQs the mean forward solver steps (NFE) on the test set and the fraction converged.
Recipes (MNIST-1D): the same MDEQ-1D trained with unrolled pre-training for the first 20% of
its steps (``jdeq.train.Pretrain``, Bai et al. 2020) and with Jacobian regularization
(``jdeq.train.JacReg``, Bai et al. 2021), beside the plain one. Baselines: a ResNet-style CNN (untied residual blocks with GroupNorm) against MDEQ, an MLP
against the dense monDEQ, a GRU (linear head on all 40 states, as Greydanus's) against the
sequence DEQ. On MNIST-1D the published accuracies of Greydanus 2020 (logistic regression 32%,
MLP 68%, CNN 94%, GRU 91%) are printed beside ours.

Writes ``results/zoo.json`` and ``results/zoo.png`` (``zoo_full.*`` with ``--full``); the
table comes last.

References: Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models", NeurIPS 2020; Winston &
Kolter, "Monotone operator equilibrium networks", NeurIPS 2020; Bai, Kolter & Koltun, "Deep
Equilibrium Models", NeurIPS 2019; Greydanus, "Scaling down Deep Learning" (MNIST-1D),
arXiv:2011.14439, 2020.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jdeq
from jdeq import argtypes as T
from benchmarks import _common as C
from jdeq.data import digits, mnist1d
from jdeq.train import JacReg, Pretrain, batch_indices, count_params
from jdeq.train.jacobian import penalty, start_recording

MiB = 2.0**20


# ----------------------------------------------------------------------------- baselines


class ResBlock(nnx.Module):
    """``relu(x + GN(conv(relu(GN(conv(x))))))``."""

    def __init__(self, width, nd, groups, rngs):
        self.c1 = nnx.Conv(width, width, (3,) * nd, padding="SAME", use_bias=False, rngs=rngs)
        self.c2 = nnx.Conv(width, width, (3,) * nd, padding="SAME", use_bias=False, rngs=rngs)
        self.g1 = nnx.GroupNorm(width, groups, rngs=rngs)
        self.g2 = nnx.GroupNorm(width, groups, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(x + self.g2(self.c2(jax.nn.relu(self.g1(self.c1(x))))))


class ResNet(nnx.Module):
    """Explicit ResNet-style CNN: stem, per stage ``blocks`` residual blocks then a stride-2
    conv to the next width, global average pool, linear head. Returns logits."""

    def __init__(self, in_ch, classes, widths, *, nd, blocks=2, groups=4, rngs):
        self.stem = nnx.Conv(in_ch, widths[0], (3,) * nd, padding="SAME", rngs=rngs)
        stages = []
        for i, w in enumerate(widths):
            layers = [ResBlock(w, nd, groups, rngs) for _ in range(blocks)]
            if i + 1 < len(widths):
                layers.append(nnx.Conv(w, widths[i + 1], (3,) * nd, strides=(2,) * nd, padding="SAME", rngs=rngs))
            stages.append(nnx.List(layers))
        self.stages = nnx.List(stages)
        self.head = nnx.Linear(widths[-1], classes, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.stem(x))
        for stage in self.stages:
            for layer in stage:
                h = layer(h)
        return self.head(h.mean(axis=tuple(range(1, h.ndim - 1))))


class MLP(nnx.Module):
    def __init__(self, din, hidden, classes, *, layers=2, rngs):
        dims = [din] + [hidden] * layers
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.head = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        h = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            h = jax.nn.relu(layer(h))
        return self.head(h)


class GRU(nnx.Module):
    """A GRU reading the signal left to right; a linear head reads its states at every position
    (flattened), as Greydanus 2020's GRU baseline does (his is bidirectional, hidden 6). Reading
    only the last state trains far slower: it sat at chance (10.5%) after 150 steps at lr 3e-3."""

    def __init__(self, din, hidden, classes, *, length, rngs):
        self.hidden = hidden
        self.rnn = nnx.RNN(nnx.GRUCell(din, hidden, rngs=rngs))
        self.head = nnx.Linear(hidden * length, classes, rngs=rngs)

    def __call__(self, x):
        h0 = jnp.zeros((x.shape[0], self.hidden), x.dtype)
        hs = self.rnn(x, initial_carry=h0)
        return self.head(hs.reshape(x.shape[0], -1))


class SignalTransformerDEQ(nnx.Module):
    """Sequence DEQ on real-valued signals: a patch embedding of each position (a width-5
    convolution, so a token sees its neighbourhood, not one scalar) + learned positions,
    injected into ``jdeq.models.transformer.TransformerCell`` (the cell of the arithmetic study,
    reused), mean pool, linear head. Returns ``(logits, stats)``."""

    def __init__(self, length, din, features, heads, classes, *, solver, patch=5, rngs):
        from jdeq.models.transformer import TransformerCell

        self.embed = nnx.Conv(din, features, (patch,), padding="SAME", rngs=rngs)
        self.pos = nnx.Param(0.1 * jax.random.normal(rngs.params(), (length, features)))
        self.core = jdeq.nnx.DEQ(TransformerCell(features, heads, rngs=rngs), solver=solver)
        self.head = nnx.Linear(features, classes, rngs=rngs)

    def __call__(self, x):
        emb = self.embed(x) + self.pos[...]
        valid = jnp.ones(x.shape[:2], x.dtype)
        z, stats = self.core((emb, valid))
        return self.head(z.mean(axis=1)), stats


# ----------------------------------------------------------------------------- the zoo

FWD = jdeq.Anderson(tol=1e-3, maxiter=20)  # DEQ forward budget (train and test)


def _mdeq1d(seed):
    return jdeq.models.MDEQClassifier(1, 10, widths=(8, 16, 16), spatial_dims=1, solver=FWD, rngs=nnx.Rngs(seed))


def zoo(full: bool) -> list[dict]:
    """``[{task, name, kind, family, build(seed) -> model}]``, and for the recipe rows
    ``recipe={"pretrain": (fraction of the steps, depth), "jac_reg": jdeq.train.JacReg}``."""
    mon_solver = jdeq.FixedPointIteration(tol=1e-3, maxiter=60)
    entries = [
        # digits: 8x8 images
        dict(task="digits", name="mdeq", kind="deq", family="MDEQ (2 scales, widths 8/16)",
             build=lambda s: jdeq.models.MDEQClassifier(1, 10, widths=(8, 16), solver=FWD, rngs=nnx.Rngs(s))),
        dict(task="digits", name="resnet", kind="explicit", family="ResNet CNN (2x2 blocks, 8/16)",
             build=lambda s: ResNet(1, 10, (8, 16), nd=2, rngs=nnx.Rngs(s))),
        dict(task="digits", name="mondeq-dense", kind="deq", family="monDEQ dense n=64, PR splitting",
             build=lambda s: jdeq.models.MonDEQClassifier(
                 jdeq.models.MonotoneDenseCell(64, 64, rngs=nnx.Rngs(s)), 10, input_shape=(8, 8, 1),
                 solver=mon_solver, rngs=nnx.Rngs(s + 100))),
        dict(task="digits", name="mlp", kind="explicit", family="MLP 64-96-96-10",
             build=lambda s: MLP(64, 96, 10, rngs=nnx.Rngs(s))),
        # MNIST-1D: 40-point signals
        dict(task="mnist1d", name="mdeq", kind="deq", full_steps=2000, family="MDEQ-1D (3 scales, 8/16/16)",
             build=_mdeq1d),
        # the DEQ papers' training recipes on the same MDEQ-1D (before: the row above)
        dict(task="mnist1d", name="mdeq+pretrain", kind="deq", full_steps=2000,
             family="MDEQ-1D + unrolled pre-training (first 20% of steps, depth 6)",
             recipe=dict(pretrain=(0.2, 6)), build=_mdeq1d),
        dict(task="mnist1d", name="mdeq+jacreg", kind="deq", full_steps=2000,
             family="MDEQ-1D + Jacobian regularization (gamma 0.5, half the steps)",
             recipe=dict(jac_reg=JacReg(gamma=0.5, prob=0.5)), build=_mdeq1d),
        dict(task="mnist1d", name="resnet", kind="explicit", family="ResNet-1D CNN (3x2 blocks, 8/16/16)",
             build=lambda s: ResNet(1, 10, (8, 16, 16), nd=1, rngs=nnx.Rngs(s))),
        dict(task="mnist1d", name="mondeq-dense", kind="deq", family="monDEQ dense n=100, PR splitting",
             build=lambda s: jdeq.models.MonDEQClassifier(
                 jdeq.models.MonotoneDenseCell(40, 100, rngs=nnx.Rngs(s)), 10, input_shape=(40, 1),
                 solver=mon_solver, rngs=nnx.Rngs(s + 100))),
        dict(task="mnist1d", name="mlp", kind="explicit", family="MLP 40-128-128-10",
             build=lambda s: MLP(40, 128, 10, rngs=nnx.Rngs(s))),
        dict(task="mnist1d", name="seq-deq", kind="deq", full_steps=2000, family="transformer-cell DEQ (D=16, 2 heads)",
             build=lambda s: SignalTransformerDEQ(40, 1, 16, 2, 10, solver=FWD, rngs=nnx.Rngs(s))),
        dict(task="mnist1d", name="gru", kind="explicit",
             family="GRU (hidden 16, head on all 40 states)",
             build=lambda s: GRU(1, 16, 10, length=40, rngs=nnx.Rngs(s))),
    ]
    if full:
        entries.append(dict(
            task="mnist1d", name="mondeq-conv", kind="deq", full_steps=2000,
            family="monDEQ conv-1D (16 ch), FB + Anderson",
            build=lambda s: jdeq.models.MonDEQClassifier(
                jdeq.models.MonotoneConvCell(1, 16, spatial_dims=1, rngs=nnx.Rngs(s)), 10, input_shape=(40, 1),
                pool=4, solver=jdeq.Anderson(tol=1e-3, maxiter=60), rngs=nnx.Rngs(s + 100))))
    return entries


# ----------------------------------------------------------------------------- training


def _logits(model, x):
    out = model(x)
    return out if isinstance(out, tuple) else (out, None)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _train_step(graphdef, tx, jac_reg, params, rest, opt_state, x, y, key):
    def loss_fn(p):
        net = nnx.merge(graphdef, p, rest, copy=True)
        layers = start_recording(net) if jac_reg is not None else []
        logits, _ = _logits(net, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss + penalty(jac_reg, layers, key) if jac_reg is not None else loss

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnums=(0,))
def _eval(graphdef, params, rest, x, y):
    logits, stats = _logits(nnx.merge(graphdef, params, rest), x)
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    nfe = jnp.mean(stats.nsteps.astype(jnp.float32)) if stats is not None else jnp.nan
    conv = jnp.mean(stats.converged.astype(jnp.float32)) if stats is not None else jnp.nan
    return acc, nfe, conv


def run_model(entry, data, *, seeds, steps, batch, lr, measure: bool) -> dict:
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)
    xtr, ytr = data.train["inputs"], data.train["labels"]
    xte, yte = jnp.asarray(data.test["inputs"]), jnp.asarray(data.test["labels"])
    row = {"task": entry["task"], "name": entry["name"], "kind": entry["kind"], "family": entry["family"]}
    accs, nfes, convs, losses, train_s = [], [], [], [], []
    recipe = entry.get("recipe", {})
    jac_reg, pretrain = recipe.get("jac_reg"), None
    if "pretrain" in recipe:  # (fraction of the steps, depth)
        pretrain = Pretrain(steps=max(1, int(recipe["pretrain"][0] * steps)), depth=recipe["pretrain"][1])
    for seed in seeds:
        model = entry["build"](seed)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        opt_state = tx.init(params)
        key = jax.random.key(seed)
        pre_step = None
        if pretrain is not None:  # the first steps on the graph with the DEQ layers unrolled
            pre_step = functools.partial(_train_step, pretrain.graphdef(model), tx, jac_reg)
        if seed == seeds[0]:
            step = functools.partial(_train_step, graphdef, tx, jac_reg)
            row["params"] = count_params(model)
            if measure:
                x0, y0 = jnp.asarray(xtr[:batch]), jnp.asarray(ytr[:batch])
                fn = functools.partial(_train_step.__wrapped__, graphdef, tx, jac_reg)
                compiled, mem, compile_s = C.compile_with_memory(fn, params, rest, opt_state, x0, y0, key)
                row["memory_MiB"] = sum(v for k, v in mem.items() if k in ("temp", "argument", "output") and v) / MiB
                row["temp_MiB"] = (mem["temp"] or 0) / MiB
                row["compile_s"] = compile_s
                times = C.time_calls(lambda: compiled(params, rest, opt_state, x0, y0, key), steps=20, warmup=3)
                row["step_ms"] = 1e3 * C.median(times)
                row["step_ms_min"] = 1e3 * min(times)
                step = compiled  # train with the step just compiled and measured (no second compile)
        loss, elapsed, t0, untimed = jnp.nan, 0.0, time.perf_counter(), 0
        for k in range(steps):
            idx = batch_indices(len(ytr), batch, k, seed=seed)
            run = pre_step if pre_step is not None and k < pretrain.steps else step
            first = k == 0 or (pre_step is not None and k == pretrain.steps)  # a step that may compile
            if first:  # not timed: close the timed span before it
                if k > 0:
                    jax.block_until_ready(loss)
                    elapsed += time.perf_counter() - t0
                untimed += 1
            params, opt_state, loss = run(params, rest, opt_state, jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx]),
                                          jax.random.fold_in(key, k))
            if first:
                jax.block_until_ready(loss)
                t0 = time.perf_counter()
        losses.append(float(loss))
        train_s.append(elapsed + time.perf_counter() - t0)
        row["timed_steps"] = steps - untimed
        if seed == seeds[0]:
            row["load_avg"] = os.getloadavg()[0]
        acc, nfe, conv = map(float, _eval(graphdef, params, rest, xte, yte))
        accs.append(acc)
        nfes.append(nfe)
        convs.append(conv)
        C.flush_print(f"  {entry['task']:8s} {entry['name']:13s} seed {seed}: test acc {acc:.3f}  "
                      f"final loss {float(loss):.3f}  nfe {nfe:.1f}  ({train_s[-1]:.1f} s)")
    row.update(
        acc_mean=float(np.mean(accs)), acc_std=float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
        accs=accs, final_loss=float(np.mean(losses)), train_s=float(np.mean(train_s)),
        nfe=float(np.mean(nfes)) if entry["kind"] == "deq" else None,
        converged=float(np.mean(convs)) if entry["kind"] == "deq" else None,
    )
    return row


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), dpi=120, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rs = [r for r in rows if r["task"] == task]
        colors = ["tab:blue" if r["kind"] == "deq" else "tab:gray" for r in rs]
        ax.bar(range(len(rs)), [r["acc_mean"] for r in rs], yerr=[r["acc_std"] for r in rs], color=colors, capsize=3)
        ax.set_xticks(range(len(rs)), [r["name"] for r in rs], rotation=30, fontsize=8)
        if task == "mnist1d":
            for label, acc in mnist1d.PUBLISHED.items():
                if label in ("MLP", "CNN", "GRU"):
                    ax.axhline(acc, ls=":", lw=1, color="k")
                    ax.text(len(rs) - 0.5, acc, f"paper {label} {acc:.0%}", fontsize=7, va="bottom", ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"{task}: test accuracy (blue: DEQ, gray: explicit)", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _one_blas_thread():
    """One OpenBLAS thread for the LAPACK calls of XLA:CPU (the dense monDEQ's SVD and inverse).

    jaxlib runs LAPACK through scipy's OpenBLAS, whose worker threads spin while waiting: on a
    shared machine (load 8-12 on 2 cores here) the dense monDEQ's training step took 56-640 ms
    instead of 1.3 ms. ``threadpoolctl`` (a scikit-learn dependency) limits them at run time;
    ``OPENBLAS_NUM_THREADS=1`` in the environment does the same."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - depends on the environment
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _run_all(args, tasks, only, budget, datasets, seeds, rows, save):
    """Trains and measures every selected model, appending one row per model to ``rows``."""
    for entry in zoo(args.full):
        if entry["task"] not in tasks or (only and entry["name"] not in only):
            continue
        steps, batch = budget[entry["task"]]
        lr = args.lr
        if args.full:
            steps = entry.get("full_steps", steps)
        if args.steps is not None:
            steps = args.steps
        steps = max(1, int(steps * args.steps_scale))
        rows.append(run_model(entry, datasets[entry["task"]], seeds=seeds, steps=steps, batch=batch, lr=lr,
                              measure=True))
        rows[-1].update(steps=steps, batch=batch, lr=lr)
        save(partial=True)  # after each model, so that a cut-off long run keeps what it finished


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="MNIST-1D at Greydanus 2020's setting (batch 100, up to 6000 steps), conv monDEQ")
    parser.add_argument("--only", default="", help="comma-separated model names (e.g. mdeq,resnet)")
    parser.add_argument("--tasks", default=None, help="default: digits,mnist1d (--full: mnist1d)")
    parser.add_argument("--seeds", type=T.positive_int, default=None, help="default 3")
    parser.add_argument("--steps-scale", type=T.positive_float, default=1.0, help="multiply every step budget")
    parser.add_argument("--steps", type=T.positive_int, default=None,
                        help="one step budget for every model (before --steps-scale)")
    parser.add_argument("--lr", type=T.positive_float, default=3e-3)
    C.out_dir_arg(parser)
    args = parser.parse_args(argv)
    for option, given, known in (("--only", args.only, {e["name"] for e in zoo(True)}),
                                 ("--tasks", args.tasks or "", {e["task"] for e in zoo(True)})):
        unknown = sorted({s for s in given.split(",") if s} - known)
        if unknown:
            parser.error(f"{option}: unknown {unknown}; choose from {sorted(known)}")

    info = C.machine()
    C.flush_print(C.header(info, "zoo: DEQ models vs explicit baselines on digits and MNIST-1D"))
    seeds = list(range(args.seeds or 3))
    # (steps, batch): --full follows Greydanus 2020 on MNIST-1D (batch 100, 6000 steps); the slow
    # DEQs (MDEQ, sequence DEQ, conv monDEQ) get their entry's smaller ``full_steps``.
    budget = {"digits": (1500, 64) if args.full else (150, 64), "mnist1d": (6000, 100) if args.full else (150, 64)}
    tasks = [t for t in (args.tasks or ("mnist1d" if args.full else "digits,mnist1d")).split(",") if t]
    name = "zoo_full" if args.full else "zoo"
    loaders = {"digits": lambda: digits.load(seed=0), "mnist1d": mnist1d.load}
    datasets = {t: loaders[t]() for t in tasks}
    only = {s for s in args.only.split(",") if s}
    rows = []
    t_all = time.perf_counter()
    out = Path(args.out)
    command = "python -m benchmarks.zoo " + " ".join(sys.argv[1:] if argv is None else argv)

    def save(partial):
        for r in rows:
            r["train_ms"] = 1e3 * r["train_s"] / max(1, r.get("timed_steps", r["steps"] - 1))
        C.write_json(out, name, {"command": command, "machine": info, "seeds": seeds, "partial": partial,
                                 "total_s": time.perf_counter() - t_all, "blas_threads": 1,
                                 "published_mnist1d": mnist1d.PUBLISHED, "forward_solver": repr(FWD), "rows": rows})

    with _one_blas_thread():
        _run_all(args, tasks, only, budget, datasets, seeds, rows, save)
    total = time.perf_counter() - t_all
    save(partial=False)
    png = plot(rows, out / f"{name}.png") if rows else None
    C.flush_print(f"\nwrote {out / (name + '.json')}" + (f" and {png}" if png else "") + f"; total {total:.0f} s")
    C.flush_print("published MNIST-1D test accuracy (Greydanus 2020, trained ~6000 steps): "
                  + ", ".join(f"{k} {v:.0%}" for k, v in mnist1d.PUBLISHED.items()))
    for r in rows:
        r["acc"] = f"{100 * r['acc_mean']:.1f} +- {100 * r['acc_std']:.1f}"
    columns = [("task", "task", ""), ("name", "model", ""), ("family", "what", ""), ("acc", "test acc %", ""),
               ("params", "params", "d"), ("memory_MiB", "train mem MiB", ".2f"), ("step_ms", "step ms", ".1f"),
               ("train_ms", "train ms/step", ".1f"),
               ("nfe", "fwd NFE", ".1f"), ("converged", "conv.", ".2f"), ("steps", "steps", "d")]
    C.flush_print("")
    C.flush_print(C.format_table(rows, columns))


if __name__ == "__main__":
    main()
