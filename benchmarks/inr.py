"""Implicit neural representations: a DEQ-INR with and without amortized warm starts against
SIREN and a Fourier-feature ReLU MLP at equal parameter count, fitting one image.

The image is scikit-learn's ``china.jpg`` (shipped with it; nothing is downloaded), center
cropped and area-downsampled to ``--size`` x ``--size`` (:mod:`jdeq.data.image`): each pixel's
coordinates in ``[-1, 1]^2`` -> its RGB. Models (:mod:`jdeq.models.inr`):

- ``deq_warm``: ``jdeq.models.DEQINR`` (Fourier features -> injection -> ``z* = sin(W z* + x)``
  -> linear readout; Anderson forward, implicit backward) with a ``jdeq.nnx.FixedPointCache``
  over the pixels: each pixel's solve starts from its ``z*`` of the previous epoch (Huang, Bai
  & Kolter 2021);
- ``deq_cold``: the same model, every solve started from ``z = 0``;
- ``siren``: SIREN (Sitzmann et al. 2020), 3 sine layers, width matched to the DEQ's parameters;
- ``relu_ff``: a ReLU MLP on the same Fourier features, 2 layers, width matched likewise.

Training: Adam on minibatches of pixels (``jdeq.train.batch_indices``: each epoch visits every
pixel once), MSE loss, the jitted ``jdeq.train.make_train_step`` (which returns the updated
cache). Every ``--eval-every`` steps: PSNR of the whole image (DEQs solved from a cold start
to the same tolerance, so the two DEQ variants are judged alike), the wall time of the training
steps so far (each step blocked until done; compilation and evaluation excluded; the models of one seed
train in the same process with their steps interleaved, so a busy machine slows them alike), and the forward NFE of the training steps since the last evaluation: the mean over pixels
(cell evaluations per pixel) and the batch maximum (the batched solver loop runs until the
slowest pixel of the batch has converged, so the maximum sets the forward wall time). The step donates its state (the cache is updated in
place). Training memory: XLA's ``memory_analysis`` of the
compiled step (temporaries + arguments). Seeds change the initialization and the batch order.

Run: ``python -m benchmarks.inr`` (``--size``, ``--steps``, ``--seeds``, ``--quick``).
Writes ``results/inr.json`` and ``results/inr.png``; the table is printed last.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jdeq
from benchmarks._common import MiB, compile_with_memory, flush_print, format_table, header, machine, out_dir_arg, write_json
from jdeq.data import image
from jdeq.models import DEQINR, SIREN, FourierMLP

MODELS = ("deq_warm", "deq_cold", "siren", "relu_ff")
LABELS = {"deq_warm": "DEQ-INR, warm start", "deq_cold": "DEQ-INR, cold start", "siren": "SIREN",
          "relu_ff": "ReLU MLP + Fourier features"}


def _deq(args, n, seed, cache):
    solver = jdeq.Anderson(tol=args.tol, maxiter=args.maxiter)
    return DEQINR(args.features, num_frequencies=args.frequencies, scale=args.scale,
                  num_examples=n if cache else None, solver=solver, rngs=nnx.Rngs(seed))


def _matched_width(count, target: int) -> int:
    """The width ``w`` whose parameter count ``count(w)`` is closest to ``target``."""
    return min(range(2, 1024), key=lambda w: abs(count(w) - target))


def build(name: str, args, n: int, seed: int) -> nnx.Module:
    """The model ``name`` at ``seed`` (the baselines' widths match the DEQ's parameter count)."""
    if name in ("deq_warm", "deq_cold"):
        return _deq(args, n, seed, cache=name == "deq_warm")
    h, f = args.features, 2 * args.frequencies
    target = f * h + h + h * h + 3 * h + 3  # DEQINR: injection, W (no bias), readout
    if name == "siren":  # 2 -> w, 2 x (w -> w), w -> 3, all with biases
        w = _matched_width(lambda w: 3 * w + 2 * (w * w + w) + 3 * w + 3, target)
        model = SIREN(w, depth=3, rngs=nnx.Rngs(seed))
    else:  # features -> w -> w -> 3
        w = _matched_width(lambda w: f * w + w + w * w + w + 3 * w + 3, target)
        model = FourierMLP(w, depth=2, num_frequencies=args.frequencies, scale=args.scale, rngs=nnx.Rngs(seed))
    return model


def mse_loss(model, batch, *, warm: bool):
    """MSE on the pixels (+ the DEQ's solver metrics); ``warm``: pass the pixels' indices."""
    rgb, stats = model(batch["coords"], index=batch["index"] if warm else None)
    loss = jnp.mean((rgb - batch["pixels"]) ** 2)
    extra = {} if stats is None else {"max_nsteps": jnp.max(stats.nsteps).astype(jnp.float32)}
    return loss, {"loss": loss, **jdeq.train.solver_metrics(stats), **extra}


class _Run:
    """One model's training state, compiled step, evaluation and records."""

    def __init__(self, name: str, args, data: dict, device_data: dict, seed: int):
        self.name, self.args, self.data, self.data_on_device = name, args, data, device_data
        model = build(name, args, data["index"].shape[0], seed)
        opt = optax.adam(args.lr)
        self.state = jdeq.train.TrainState.create(model, opt)
        step_fn = jdeq.train.make_train_step(functools.partial(mse_loss, warm=name == "deq_warm"), opt)
        first = {k: v[: args.batch_size] for k, v in device_data.items()}
        # the state is donated: the cache (and parameters) are updated in place, not copied each step
        self.step, memory, _ = compile_with_memory(step_fn, self.state, first, donate_argnums=0)
        eval_kw = {"maxiter": args.eval_maxiter} if name.startswith("deq") else {}

        def predict(state, coords):
            rgb, stats = state.model()(coords, **eval_kw)
            return rgb, (stats.nsteps.mean() if stats is not None else jnp.float32(0))

        self.predict = jax.jit(predict)
        self.curve, self.nfe, self.elapsed = [], [], 0.0
        self.record = {"name": name, "seed": seed, "params": jdeq.train.count_params(model),
                       "memory_bytes": (memory["temp"] or 0) + (memory["argument"] or 0), "memory": memory}

    def train_step(self, batch) -> None:
        t0 = time.perf_counter()
        self.state, metrics = self.step(self.state, batch)
        jax.block_until_ready(self.state)
        self.elapsed += time.perf_counter() - t0
        self.metrics = metrics
        self.nfe.append((metrics.get("nsteps", jnp.float32(0)), metrics.get("max_nsteps", jnp.float32(0))))

    def evaluate(self, step: int) -> None:
        rgb, eval_nfe = self.predict(self.state, self.data_on_device["coords"])
        self.curve.append({"step": step, "time": self.elapsed, "psnr": image.psnr(np.asarray(rgb), self.data["pixels"]),
                           "train_nfe": float(np.mean([float(x) for x, _ in self.nfe])),
                           "train_max_nfe": float(np.mean([float(x) for _, x in self.nfe])),
                           "eval_nfe": float(eval_nfe), "loss": float(self.metrics["loss"])})
        self.nfe = []

    def result(self) -> dict:
        r, curve = self.record, self.curve
        r.update(curve=curve, final_psnr=curve[-1]["psnr"], time=self.elapsed,
                 ms_per_step=1e3 * self.elapsed / self.args.steps)
        if self.name.startswith("deq"):
            r["mean_train_nfe"] = float(np.mean([c["train_nfe"] for c in curve]))
            r["late_train_nfe"] = float(np.mean([c["train_nfe"] for c in curve[len(curve) // 2 :]]))
            r["mean_train_max_nfe"] = float(np.mean([c["train_max_nfe"] for c in curve]))
        return r


def run_seed(names, args, data: dict, seed: int) -> list[dict]:
    """Trains every model of ``names`` at ``seed``, their steps interleaved (step ``k`` of each
    model, in an order rotated every step), so a busy machine slows them alike."""
    device_data = {k: jnp.asarray(v) for k, v in data.items()}
    runs = [_Run(name, args, data, device_data, seed) for name in names]
    n = data["index"].shape[0]
    for step in range(args.steps):
        idx = jdeq.train.batch_indices(n, args.batch_size, step, seed=seed)
        batch = {k: v[idx] for k, v in device_data.items()}
        for k in range(len(runs)):
            runs[(step + k) % len(runs)].train_step(batch)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            for r in runs:
                r.evaluate(step + 1)
    return [r.result() for r in runs]


def summarize(records: list[dict]) -> list[dict]:
    rows = []
    for name in MODELS:
        rs = [r for r in records if r["name"] == name]
        if not rs:
            continue
        ps = [r["final_psnr"] for r in rs]
        row = {"model": name, "params": rs[0]["params"], "psnr": float(np.mean(ps)), "psnr_std": float(np.std(ps)),
               "seconds": float(np.mean([r["time"] for r in rs])),
               "ms_per_step": float(np.mean([r["ms_per_step"] for r in rs])),
               "memory_mib": rs[0]["memory_bytes"] / MiB}
        if "mean_train_nfe" in rs[0]:
            row["nfe"] = float(np.mean([r["mean_train_nfe"] for r in rs]))
            row["late_nfe"] = float(np.mean([r["late_train_nfe"] for r in rs]))
            row["max_nfe"] = float(np.mean([r["mean_train_max_nfe"] for r in rs]))
        rows.append(row)
    return rows


def plot(path, records: list[dict], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), dpi=110)
    colors = dict(zip(MODELS, ("C0", "C1", "C2", "C3")))
    for name in MODELS:
        rs = [r for r in records if r["name"] == name]
        if not rs:
            continue
        steps = [c["step"] for c in rs[0]["curve"]]
        psnr = np.array([[c["psnr"] for c in r["curve"]] for r in rs])
        times = np.array([[c["time"] for c in r["curve"]] for r in rs]).mean(0)
        for ax, xs in ((axes[0], steps), (axes[1], times)):
            ax.plot(xs, psnr.mean(0), color=colors[name], label=LABELS[name])
            ax.fill_between(xs, psnr.min(0), psnr.max(0), color=colors[name], alpha=0.2)
        if name.startswith("deq"):
            nfe = np.array([[c["train_nfe"] for c in r["curve"]] for r in rs]).mean(0)
            axes[2].plot(steps, nfe, color=colors[name], label=LABELS[name] + ": mean")
            top = np.array([[c["train_max_nfe"] for c in r["curve"]] for r in rs]).mean(0)
            axes[2].plot(steps, top, "--", color=colors[name], label=LABELS[name] + ": batch max")
    for row in rows:
        axes[3].scatter(row["memory_mib"], row["psnr"], color=colors[row["model"]], label=LABELS[row["model"]])
    for ax, xl, yl in ((axes[0], "training step", "PSNR (dB)"), (axes[1], "training wall time (s)", "PSNR (dB)"),
                       (axes[2], "training step", "forward NFE (train)"),
                       (axes[3], "training step memory (MiB, XLA temp + args)", "final PSNR (dB)")):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("INR fit of china.jpg: mean over seeds (band: min-max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=48, help="image side after downsampling (default 48)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--features", type=int, default=64, help="DEQ state width (sets the parameter budget)")
    p.add_argument("--frequencies", type=int, default=64)
    p.add_argument("--scale", type=float, default=10.0, help="Fourier feature scale")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--maxiter", type=int, default=30)
    p.add_argument("--eval-maxiter", type=int, default=60)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--quick", action="store_true", help="a small run (< 60 s) for tests")
    out_dir_arg(p)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.eval_every, args.seeds, args.features, args.frequencies = 16, 24, 8, 1, 16, 16
        args.batch_size = 64
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        raise SystemExit(f"--models: unknown {sorted(unknown)}; choose from {MODELS}")
    info = machine()
    flush_print(header(info, f"INR fit of china.jpg at {args.size}x{args.size}: DEQ-INR (warm/cold) vs SIREN vs "
                             f"ReLU+FF, {args.steps} steps of {args.batch_size} pixels, {args.seeds} seeds"))
    data = image.load(args.size)
    records = []
    for seed in range(args.seeds):
        for r in run_seed(models, args, data, seed):
            flush_print(f"seed {seed} {r['name']:9s} params {r['params']:6d}  PSNR {r['final_psnr']:6.2f} dB  "
                        f"{r['ms_per_step']:.2f} ms/step" + (f"  train NFE {r['mean_train_nfe']:.1f}"
                                                            if "mean_train_nfe" in r else ""))
            records.append(r)
    rows = summarize(records)
    result = {"machine": info, "args": vars(args), "records": records, "summary": rows}
    out = Path(args.out)
    write_json(out, "inr", result)
    out.mkdir(parents=True, exist_ok=True)
    plot(out / "inr.png", records, rows)
    flush_print(format_table(rows, [("model", "model", ""), ("params", "params", "d"), ("psnr", "PSNR dB", ".2f"),
                                    ("psnr_std", "+-", ".2f"), ("seconds", "train s", ".1f"),
                                    ("ms_per_step", "ms/step", ".2f"), ("memory_mib", "step MiB", ".2f"),
                                    ("nfe", "fwd NFE", ".1f"), ("late_nfe", "fwd NFE 2nd half", ".1f"),
                                    ("max_nfe", "batch max NFE", ".1f")]))
    return result


if __name__ == "__main__":
    main()
