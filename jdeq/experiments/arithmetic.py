"""The depth study on symbolic arithmetic expressions (mod 10), four experiments.

1. ``depth``: accuracy per nesting depth of a DEQ (trained with the phantom gradient; the
   implicit-gradient DEQ as a second row), of the same weight-tied transformer cell
   unrolled at depths 1, 2, 4, 8, 16, of an untied transformer and of an LSTM, all at (about)
   the same parameter count; with the compute spent (forward evaluations of the cell).
2. ``extrapolation``: train on depth ``<= d``, test on each deeper depth separately.
3. ``compute``: test-time compute: accuracy vs the solver's ``maxiter`` at test time (a run-time
   value: no recompile), and the weight-tied unrolled nets run at other depths than trained.
4. ``convergence``: per-example residual at exit vs correctness; DEQs trained with small
   iteration budgets (the cell does not reach its fixed point): does accuracy hold, what do the
   solver trajectories look like, and does iterating further at test time help?

Each experiment writes ``NAME.json``, ``NAME.png`` and ``NAME.md`` under the output folder
(default ``results/arithmetic/``); ``summary.md`` indexes them.

Usage::

    python -m jdeq.experiments.arithmetic --quick            # all four, CPU-sized (minutes)
    python -m jdeq.experiments.arithmetic --experiments depth,compute --seeds 3
    python -m jdeq.experiments.arithmetic                    # the full study (needs a GPU)

References: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019; Geng et al., "On
Training Implicit Models", NeurIPS 2021 (phantom gradients); Anil et al., "Path Independent
Equilibrium Models Can Better Exploit Test-Time Computation", NeurIPS 2022.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import nnx

import jdeq
from jdeq import train as T
from jdeq.data import arithmetic as A
from jdeq import argtypes
from jdeq.models.transformer import LSTMClassifier, TiedTransformerClassifier, TransformerClassifier

__all__ = ["Config", "EXPERIMENTS", "FULL", "GRADIENTS", "QUICK", "build_model", "main", "run"]

EXPERIMENTS = ("depth", "extrapolation", "compute", "convergence")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the study (see :data:`QUICK` and :data:`FULL`).

    Attributes:
      length: tokens per expression; max_depth: deepest nesting generated (0..max_depth, uniform).
      n_train, n_test: examples (one ``generate`` call, split: no duplicates).
      features, num_heads, mlp_ratio: width of the weight-tied cell; the untied transformer
        (``untied_layers`` blocks) and the LSTM are sized to match its parameter count.
      steps, batch_size, lr: training (AdamW, warmup + cosine decay, gradient clipping at 1).
      model_lr: ``((model, lr), ...)`` learning rates that override ``lr`` for a model class
        (``"lstm"``, ``"transformer"``, ``"unrolled"``, ``"deq"``); tuned per class.
      seeds: model/batch-order seeds (the data is fixed by ``data_seed``).
      unrolled_depths: depths of the weight-tied unrolled baselines.
      baselines: the conventional baselines of experiment 1 (``"transformer"``, ``"lstm"``).
      deq_tol, deq_maxiter: the DEQ's Anderson solver at training (and default test) time.
      deq_gradient: the gradient the model ``"deq"`` trains with (``"phantom"``, ``"implicit"``
        or ``"jfb"``); experiments 2-4 use that model.
      extra_deqs: more gradients trained in experiment 1, as models ``"deq-<gradient>"``.
      extrap_train_depth, extrap_models: experiment 2.
      test_maxiters: experiment 3's test-time budgets (also the depths of the unrolled nets).
      train_budgets: experiment 4's training budgets (``maxiter`` of the DEQ during training).
      trace_maxiter, trace_examples: experiment 4's recorded solver trajectories.
    """

    length: int = 32
    max_depth: int = 7
    n_train: int = 100_000
    n_test: int = 10_000
    features: int = 64
    num_heads: int = 4
    mlp_ratio: int = 2
    untied_layers: int = 4
    steps: int = 20_000
    batch_size: int = 128
    lr: float = 1e-3
    model_lr: tuple = ()
    seeds: tuple = (0, 1, 2)
    data_seed: int = 1234
    unrolled_depths: tuple = (1, 2, 4, 8, 16)
    baselines: tuple = ("transformer", "lstm")
    deq_tol: float = 1e-3
    deq_maxiter: int = 30
    deq_gradient: str = "phantom"
    extra_deqs: tuple = ("implicit",)
    extrap_train_depth: int = 3
    extrap_models: tuple = ("deq", "unrolled-8", "transformer", "lstm")
    test_maxiters: tuple = (1, 2, 4, 8, 16, 32, 64)
    train_budgets: tuple = (2, 4, 8)
    trace_maxiter: int = 64
    trace_examples: int = 16
    eval_batch_size: int = 500


FULL = Config()
# CPU-sized: 10 tokens (depth 0: five digits; depth 2 is the deepest that fits 9 tokens), where
# every model class learns well above the majority class within 800 steps. Learning rates from a
# sweep over {1e-3, 3e-3, 1e-2} per class at this size (LSTM best at 1e-2, the transformers at 3e-3).
QUICK = Config(
    length=10,
    max_depth=2,
    n_train=20_000,
    n_test=2000,
    features=32,
    num_heads=4,
    steps=800,
    batch_size=128,
    lr=3e-3,
    model_lr=(("lstm", 1e-2),),
    seeds=(0,),
    unrolled_depths=(1, 4, 16),
    extrap_train_depth=1,
    extrap_models=("deq", "unrolled-4", "transformer", "lstm"),
    test_maxiters=(1, 2, 4, 8, 16, 32, 64),
    train_budgets=(2, 4, 8),
    trace_maxiter=48,
)


# ----------------------------------------------------------------------------- models


GRADIENTS = {
    "implicit": jdeq.Implicit(),  # exact gradient at z* (Bai et al. 2019)
    "phantom": jdeq.Phantom(steps=5),  # 5 unrolled steps from z* (Geng et al. 2021)
    "jfb": jdeq.JacobianFree(),  # one step (Fung et al. 2022)
}
"""The DEQ gradients a study can name (``Config.deq_gradient``, ``Config.extra_deqs``)."""


def _models(cfg: Config) -> list[str]:
    return ["deq", *(f"deq-{g}" for g in cfg.extra_deqs), *(f"unrolled-{d}" for d in cfg.unrolled_depths),
            *cfg.baselines]


def _abstract_params(make) -> int:
    return T.count_params(nnx.eval_shape(make))


@functools.lru_cache(maxsize=None)
def _matched_sizes(cfg: Config) -> tuple[int, int, int]:
    """``(tied params, untied width, LSTM hidden)`` with the baselines' counts closest to the tied."""
    v, c = len(A.VOCAB), A.NUM_CLASSES
    tied = _abstract_params(
        lambda: TiedTransformerClassifier(
            v, c, length=cfg.length, features=cfg.features, num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio, depth=1, rngs=nnx.Rngs(0))
    )
    def closest(candidates, count):  # counts grow with the size: bisect, then compare neighbours
        lo, hi = 0, len(candidates) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if count(candidates[mid]) < tied else (lo, mid)
        near = candidates[max(lo - 1, 0) : lo + 1]
        return min(near, key=lambda c: abs(count(c) - tied))

    width = closest(
        list(range(cfg.num_heads, 4 * cfg.features + 1, cfg.num_heads)),
        lambda w: _abstract_params(
            lambda: TransformerClassifier(
                v, c, length=cfg.length, features=w, num_heads=cfg.num_heads,
                num_layers=cfg.untied_layers, mlp_ratio=cfg.mlp_ratio, rngs=nnx.Rngs(0))
        ),
    )
    hidden = closest(
        list(range(2, 4 * cfg.features + 1)),
        lambda h: _abstract_params(lambda: LSTMClassifier(v, c, features=cfg.features, hidden=h, rngs=nnx.Rngs(0))),
    )
    return tied, width, hidden


def build_model(kind: str, cfg: Config, seed: int, *, maxiter: int | None = None) -> nnx.Module:
    """One model of the study: ``"deq"``, ``"unrolled-L"``, ``"transformer"`` or ``"lstm"``.

    Args:
      kind: the model name; ``"deq"`` trains with ``cfg.deq_gradient``, ``"deq-<gradient>"``
        with another gradient of :data:`GRADIENTS`.
      cfg: the study's :class:`Config`.
      seed: initialization seed.
      maxiter: the DEQ's training budget (default ``cfg.deq_maxiter``).

    Returns:
      An ``nnx.Module`` taking tokens ``(batch, length)``.
    """
    v, c, rngs = len(A.VOCAB), A.NUM_CLASSES, nnx.Rngs(seed)
    common = dict(length=cfg.length, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, rngs=rngs)
    if kind == "deq" or kind.startswith("deq-"):
        name = cfg.deq_gradient if kind == "deq" else kind[4:]
        if name not in GRADIENTS:
            raise ValueError(f"unknown DEQ gradient {name!r} in `kind` or `cfg.deq_gradient`; "
                             f"expected one of {sorted(GRADIENTS)}.")
        solver = jdeq.Anderson(tol=cfg.deq_tol, maxiter=maxiter or cfg.deq_maxiter)
        return TiedTransformerClassifier(v, c, features=cfg.features, solver=solver, gradient=GRADIENTS[name],
                                         **common)
    if kind.startswith("unrolled-"):
        return TiedTransformerClassifier(v, c, features=cfg.features, depth=int(kind.split("-")[1]), **common)
    _, width, hidden = _matched_sizes(cfg)
    if kind == "transformer":
        return TransformerClassifier(v, c, features=width, num_layers=cfg.untied_layers, **common)
    if kind == "lstm":
        return LSTMClassifier(v, c, features=cfg.features, hidden=hidden, rngs=rngs)
    raise ValueError(f"unknown model `kind` {kind!r}; expected deq, deq-<gradient>, unrolled-L, transformer or lstm.")


def _forward_iterations(kind: str, cfg: Config, stats) -> float:
    """Mean sequential layer applications at test time (cell evaluations; layers; time steps)."""
    if stats is not None:
        return float(np.mean(stats.nsteps))
    return float(cfg.untied_layers if kind == "transformer" else cfg.length)


def _learning_rate(cfg: Config, kind: str) -> float:
    return dict(cfg.model_lr).get(kind.split("-")[0], cfg.lr)


def _optimizer(cfg: Config, kind: str = ""):
    lr = _learning_rate(cfg, kind)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=max(1, cfg.steps // 20), decay_steps=cfg.steps, end_value=lr / 20
    )
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))


def _train(model, cfg: Config, data: A.Dataset, seed: int, progress: bool, desc: str):
    t0 = time.perf_counter()
    history = T.fit(
        model, _optimizer(cfg, desc), data.arrays(), steps=cfg.steps, batch_size=cfg.batch_size,
        seed=seed, log_every=max(1, min(50, cfg.steps)), progress=progress,
    )
    return history, time.perf_counter() - t0


def _per_depth(correct: np.ndarray, depth: np.ndarray) -> dict[str, float]:
    return {str(int(d)): float(correct[depth == d].mean()) for d in np.unique(depth)}


def _score(model, data: A.Dataset, cfg: Config, **kwargs) -> tuple[dict, np.ndarray, Any]:
    logits, stats = T.predict(model, data.tokens, batch_size=cfg.eval_batch_size, **kwargs)
    correct = logits.argmax(-1) == data.labels
    out = {"accuracy": float(correct.mean()), "per_depth": _per_depth(correct, data.depth)}
    if stats is not None:
        out.update(
            nsteps=float(np.mean(stats.nsteps)),
            rel_residual=float(np.mean(stats.rel_residual)),
            converged=float(np.mean(stats.converged)),
        )
    return out, correct, stats


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


# ----------------------------------------------------------------------------- the four experiments


def _data(cfg: Config) -> tuple[A.Dataset, A.Dataset]:
    data = A.generate(cfg.n_train + cfg.n_test, length=cfg.length, max_depth=cfg.max_depth, seed=cfg.data_seed)
    return A.train_test_split(data, cfg.n_test, seed=cfg.data_seed)


def exp_depth(cfg: Config, progress: bool, keep: dict) -> dict:
    """Experiment 1; keeps the trained models in ``keep`` for experiments 3 and 4."""
    train, test = _data(cfg)
    majority = float(np.mean(test.labels == np.bincount(train.labels).argmax()))
    tied = _matched_sizes(cfg)[0]
    runs = []
    for seed in cfg.seeds:
        for kind in _models(cfg):
            model = build_model(kind, cfg, seed)
            history, seconds = _train(model, cfg, train, seed, progress, kind)
            score, correct, stats = _score(model, test, cfg)
            runs.append(
                dict(model=kind, seed=seed, params=T.count_params(model), train_seconds=seconds,
                     lr=_learning_rate(cfg, kind),
                     forward_iterations=_forward_iterations(kind, cfg, stats),
                     final_train_loss=history.train[-1]["loss"], **score)
            )
            keep[(kind, seed)] = (model, correct, stats)
            print(f"[depth] {kind:12s} seed {seed}: acc {score['accuracy']:.3f} "
                  f"iters {runs[-1]['forward_iterations']:.1f} ({seconds:.0f}s)", flush=True)
    summary = {}
    for kind in _models(cfg):
        rs = [r for r in runs if r["model"] == kind]
        depths = sorted(rs[0]["per_depth"], key=int)
        summary[kind] = {
            "params": rs[0]["params"],
            "lr": rs[0]["lr"],
            "accuracy": _mean_std([r["accuracy"] for r in rs]),
            "per_depth": {d: _mean_std([r["per_depth"][d] for r in rs]) for d in depths},
            "forward_iterations": _mean_std([r["forward_iterations"] for r in rs]),
            "train_seconds": _mean_std([r["train_seconds"] for r in rs]),
        }
    return {"runs": runs, "summary": summary, "majority_baseline": majority, "tied_params": tied,
            "test_depth_counts": {str(d): int((test.depth == d).sum()) for d in np.unique(test.depth)}}


def exp_extrapolation(cfg: Config, progress: bool) -> dict:
    data = A.generate(cfg.n_train + cfg.n_test, length=cfg.length, max_depth=cfg.max_depth, seed=cfg.data_seed + 1)
    train_all, deeper = A.depth_split(data, cfg.extrap_train_depth)
    n_in = min(cfg.n_test // 2, len(train_all) // 5)
    train, test_in = A.train_test_split(train_all, n_in, seed=cfg.data_seed)
    runs = []
    for seed in cfg.seeds:
        for kind in cfg.extrap_models:
            model = build_model(kind, cfg, seed)
            _, seconds = _train(model, cfg, train, seed, progress, kind)
            per_depth = dict(_score(model, test_in, cfg)[0]["per_depth"])
            for d, part in deeper.items():
                per_depth[str(d)] = _score(model, part, cfg)[0]["accuracy"]
            runs.append(dict(model=kind, seed=seed, per_depth=per_depth, train_seconds=seconds))
            print(f"[extrapolation] {kind:12s} seed {seed}: " +
                  " ".join(f"d{d}={a:.3f}" for d, a in per_depth.items()), flush=True)
    summary = {}
    for kind in cfg.extrap_models:
        rs = [r for r in runs if r["model"] == kind]
        summary[kind] = {d: _mean_std([r["per_depth"][d] for r in rs]) for d in sorted(rs[0]["per_depth"], key=int)}
    return {"train_max_depth": cfg.extrap_train_depth, "n_train": len(train), "runs": runs, "summary": summary}


def exp_compute(cfg: Config, keep: dict) -> dict:
    _, test = _data(cfg)
    out: dict[str, Any] = {"maxiters": list(cfg.test_maxiters), "deq": [], "unrolled": []}
    for seed in cfg.seeds:
        model = keep[("deq", seed)][0]
        rows = []
        for k in cfg.test_maxiters:  # maxiter is a traced argument: one compile for all k
            score, _, _ = _score(model, test, cfg, maxiter=k)
            rows.append(dict(maxiter=k, **score))
        out["deq"].append({"seed": seed, "rows": rows})
        for depth in cfg.unrolled_depths:
            model = keep[(f"unrolled-{depth}", seed)][0]
            rows = []
            for k in cfg.test_maxiters:
                model.core.depth = k  # the same weight-tied cell, applied k times
                rows.append(dict(depth=k, **_score(model, test, cfg)[0]))
            model.core.depth = depth
            out["unrolled"].append({"seed": seed, "trained_depth": depth, "rows": rows})
    deq_acc = np.array([[r["accuracy"] for r in run["rows"]] for run in out["deq"]])
    out["deq_accuracy_mean"] = deq_acc.mean(0).tolist()
    out["deq_accuracy_std"] = (deq_acc.std(0, ddof=1) if len(deq_acc) > 1 else 0 * deq_acc[0]).tolist()
    print("[compute] DEQ accuracy vs test maxiter: " +
          " ".join(f"{k}:{a:.3f}" for k, a in zip(cfg.test_maxiters, out["deq_accuracy_mean"])), flush=True)
    return out


def _residual_bins(rel_residual: np.ndarray, correct: np.ndarray, bins: int = 5) -> list[dict]:
    edges = np.unique(np.quantile(rel_residual, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, rel_residual, side="right") - 1, 0, len(edges) - 2)
    return [
        dict(lo=float(edges[i]), hi=float(edges[i + 1]), n=int((which == i).sum()),
             accuracy=float(correct[which == i].mean()))
        for i in range(len(edges) - 1) if (which == i).any()
    ]


def _auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative): 0.5 means no relation."""
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="stable")
    ranks = np.empty(len(order)); ranks[order] = np.arange(1, len(order) + 1)
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _trajectories(model, test: A.Dataset, cfg: Config) -> list[list[float]]:
    solver = model.core.solver
    model.core.solver = dataclasses.replace(solver, trace=True, maxiter=cfg.trace_maxiter)
    try:
        _, stats = T.predict(model, test.tokens[: cfg.trace_examples], batch_size=cfg.trace_examples)
    finally:
        model.core.solver = solver
    return np.where(np.isnan(stats.trace), None, stats.trace).tolist()


def _convergence_record(model, test, cfg: Config, budget: int) -> dict:
    at_budget, correct, stats = _score(model, test, cfg, maxiter=budget)
    more, correct_more, stats_more = _score(model, test, cfg, maxiter=cfg.trace_maxiter)
    return dict(
        at_train_budget=at_budget,
        at_large_budget=more,
        residual_bins=_residual_bins(stats.rel_residual, correct),
        accuracy_converged=float(correct[stats.converged].mean()) if stats.converged.any() else None,
        accuracy_not_converged=float(correct[~stats.converged].mean()) if (~stats.converged).any() else None,
        auc_low_residual_is_correct=_auc(-stats.rel_residual, correct),
        trajectories=_trajectories(model, test, cfg),
    )


def exp_convergence(cfg: Config, progress: bool, keep: dict) -> dict:
    train, test = _data(cfg)
    out: dict[str, Any] = {"budgets": {}, "reference_maxiter": cfg.deq_maxiter}
    for seed in cfg.seeds:
        out.setdefault("reference", []).append(
            dict(seed=seed, **_convergence_record(keep[("deq", seed)][0], test, cfg, cfg.deq_maxiter)))
    for budget in cfg.train_budgets:
        for seed in cfg.seeds:
            model = build_model("deq", cfg, seed, maxiter=budget)
            _, seconds = _train(model, cfg, train, seed, progress, f"deq-maxiter{budget}")
            rec = dict(seed=seed, train_seconds=seconds, **_convergence_record(model, test, cfg, budget))
            out["budgets"].setdefault(str(budget), []).append(rec)
            print(f"[convergence] train maxiter {budget} seed {seed}: acc {rec['at_train_budget']['accuracy']:.3f} "
                  f"(converged {rec['at_train_budget']['converged']:.2f}, rel res "
                  f"{rec['at_train_budget']['rel_residual']:.3g}); at maxiter {cfg.trace_maxiter}: "
                  f"{rec['at_large_budget']['accuracy']:.3f}", flush=True)
    return out


# ----------------------------------------------------------------------------- reports


def machine() -> dict:
    """The machine and versions a result came from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), cpu)
    except OSError:
        pass
    import flax

    return {
        "cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
        "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
    }


def _fmt(ms) -> str:
    m, s = ms
    return f"{m:.3f} ± {s:.3f}" if s else f"{m:.3f}"


def _report_depth(res: dict, cfg: Config, plt, out: str) -> list[str]:
    s = res["summary"]
    depths = sorted(next(iter(s.values()))["per_depth"], key=int)
    lines = [f"Majority-class baseline: {res['majority_baseline']:.3f}. Tied cell: {res['tied_params']} params. "
             f"`deq` trains with the {cfg.deq_gradient} gradient, `deq-G` with gradient G; forward iterations: "
             "mean solver steps (DEQ), layers (unrolled, transformer), time steps (LSTM).", "",
             "| model | params | lr | fwd iterations | accuracy | " + " | ".join(f"depth {d}" for d in depths)
             + " | train s |", "|---" * (6 + len(depths)) + "|"]
    for kind, r in s.items():
        lines.append(f"| {kind} | {r['params']} | {r['lr']:g} | {r['forward_iterations'][0]:.1f} | {_fmt(r['accuracy'])} | "
                     + " | ".join(_fmt(r["per_depth"][d]) for d in depths) + f" | {r['train_seconds'][0]:.0f} |")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, r in s.items():
        m = np.array([r["per_depth"][d][0] for d in depths]); e = np.array([r["per_depth"][d][1] for d in depths])
        a.errorbar([int(d) for d in depths], m, yerr=e, marker="o", label=kind, capsize=2)
        b.errorbar(r["forward_iterations"][0], r["accuracy"][0], yerr=r["accuracy"][1], marker="o", capsize=2)
        b.annotate(kind, (r["forward_iterations"][0], r["accuracy"][0]), fontsize=7)
    a.axhline(res["majority_baseline"], color="gray", ls=":", label="majority")
    a.set(xlabel="nesting depth", ylabel="test accuracy", title="accuracy per depth")
    a.legend(fontsize=7)
    b.set(xscale="log", xlabel="forward iterations (cell evals / layers / steps)", ylabel="test accuracy",
          title="accuracy vs compute")
    fig.tight_layout(); fig.savefig(os.path.join(out, "depth.png"), dpi=120); plt.close(fig)
    return lines


def _report_extrapolation(res: dict, plt, out: str) -> list[str]:
    s = res["summary"]
    depths = sorted(next(iter(s.values())), key=int)
    lines = [f"Trained on depth <= {res['train_max_depth']} ({res['n_train']} examples); depths above are unseen.", "",
             "| model | " + " | ".join(f"depth {d}" for d in depths) + " |", "|---" * (1 + len(depths)) + "|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, r in s.items():
        lines.append(f"| {kind} | " + " | ".join(_fmt(r[d]) for d in depths) + " |")
        ax.errorbar([int(d) for d in depths], [r[d][0] for d in depths], yerr=[r[d][1] for d in depths],
                    marker="o", label=kind, capsize=2)
    ax.axvline(res["train_max_depth"] + 0.5, color="gray", ls="--")
    ax.set(xlabel="nesting depth", ylabel="test accuracy", title="depth extrapolation")
    ax.legend(fontsize=7); fig.tight_layout(); fig.savefig(os.path.join(out, "extrapolation.png"), dpi=120); plt.close(fig)
    return lines


def _report_compute(res: dict, cfg: Config, plt, out: str) -> list[str]:
    ks = res["maxiters"]
    lines = ["DEQ (trained with maxiter " f"{cfg.deq_maxiter}) evaluated with another maxiter; "
             "weight-tied unrolled nets applied k times.", "",
             "| model | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (1 + len(ks)) + "|",
             "| DEQ accuracy | " + " | ".join(f"{a:.3f}" for a in res["deq_accuracy_mean"]) + " |"]
    d0 = res["deq"][0]["rows"]
    lines.append("| DEQ mean nsteps | " + " | ".join(f"{r['nsteps']:.1f}" for r in d0) + " |")
    lines.append("| DEQ rel residual | " + " | ".join(f"{r['rel_residual']:.2g}" for r in d0) + " |")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.errorbar(ks, res["deq_accuracy_mean"], yerr=res["deq_accuracy_std"], marker="o", label="DEQ", lw=2, capsize=2)
    for run in res["unrolled"]:
        if run["seed"] != res["deq"][0]["seed"]:
            continue
        acc = [r["accuracy"] for r in run["rows"]]
        lines.append(f"| unrolled-{run['trained_depth']} (seed {run['seed']}) | " + " | ".join(f"{x:.3f}" for x in acc) + " |")
        a.plot(ks, acc, marker=".", ls="--", label=f"unrolled-{run['trained_depth']}")
    for run in res["deq"]:
        b.plot(ks, [r["rel_residual"] for r in run["rows"]], marker="o", label=f"seed {run['seed']}")
    a.set(xscale="log", xlabel="test-time iterations k", ylabel="test accuracy", title="test-time compute")
    a.legend(fontsize=7)
    b.set(xscale="log", yscale="log", xlabel="test-time maxiter", ylabel="mean rel residual", title="DEQ residual")
    fig.tight_layout(); fig.savefig(os.path.join(out, "compute.png"), dpi=120); plt.close(fig)
    return lines


def _report_convergence(res: dict, cfg: Config, plt, out: str) -> list[str]:
    lines = [f"Test accuracy of DEQs trained with a small `maxiter`, evaluated at that budget and at "
             f"maxiter {cfg.trace_maxiter}; AUC: probability that a correct example has a lower residual "
             "than a wrong one (0.5 = no relation).", "",
             "| train maxiter | seed | acc @train budget | converged | rel residual | acc @"
             f"{cfg.trace_maxiter} | converged | acc converged / not | AUC |", "|---" * 9 + "|"]
    groups = [(str(cfg.deq_maxiter) + " (exp 1)", res["reference"])] + list(res["budgets"].items())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, recs in groups:
        for r in recs:
            tb, lb = r["at_train_budget"], r["at_large_budget"]
            ac, an = r["accuracy_converged"], r["accuracy_not_converged"]
            auc = r["auc_low_residual_is_correct"]
            lines.append(f"| {label} | {r['seed']} | {tb['accuracy']:.3f} | {tb['converged']:.2f} | "
                         f"{tb['rel_residual']:.2g} | {lb['accuracy']:.3f} | {lb['converged']:.2f} | "
                         f"{'-' if ac is None else f'{ac:.3f}'} / {'-' if an is None else f'{an:.3f}'} | "
                         f"{'-' if auc is None else f'{auc:.2f}'} |")
        r = recs[0]
        bins = r["residual_bins"]
        axes[0].plot([np.sqrt(max(b["lo"], 1e-12) * b["hi"]) for b in bins], [b["accuracy"] for b in bins],
                     marker="o", label=f"train maxiter {label}")
        tr = np.array([[np.nan if x is None else x for x in row] for row in r["trajectories"]])
        line = axes[1].plot(np.arange(1, tr.shape[1] + 1), np.nanmedian(tr, 0), label=f"train maxiter {label}")
        axes[1].plot(np.arange(1, tr.shape[1] + 1), tr.T, color=line[0].get_color(), alpha=0.15, lw=0.7)
    axes[0].set(xscale="log", xlabel="rel residual at exit (quantile bins)", ylabel="accuracy",
                title="correctness vs convergence")
    axes[0].legend(fontsize=7)
    axes[1].set(yscale="log", xlabel="solver iteration", ylabel="rel residual",
                title=f"trajectories (maxiter {cfg.trace_maxiter}, median bold)")
    axes[1].legend(fontsize=7)
    fig.tight_layout(); fig.savefig(os.path.join(out, "convergence.png"), dpi=120); plt.close(fig)
    return lines


def _write(out: str, name: str, title: str, res: dict, lines: list[str], header: dict) -> None:
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump({**header, "result": res}, fh, indent=1)
    with open(os.path.join(out, f"{name}.md"), "w") as fh:
        fh.write(f"# {title}\n\n{header['how']}\n\n" + "\n".join(lines) + f"\n\n![{name}]({name}.png)\n")


# ----------------------------------------------------------------------------- entry points


def run(cfg: Config, out: str, experiments: Sequence[str] = EXPERIMENTS, *, progress: bool = True,
        command: str = "") -> dict:
    """Runs the chosen experiments and writes ``NAME.json/.png/.md`` and ``summary.md`` to ``out``.

    Args:
      cfg: the :class:`Config`.
      out: output folder (created).
      experiments: a subset of :data:`EXPERIMENTS` (``compute`` and ``convergence`` reuse the
        models of ``depth``, which is then run first).
      progress: show progress bars.
      command: the command line to record in the reports.

    Returns:
      ``{name: result}`` for each experiment run, plus ``"seconds"``.
    """
    unknown = set(experiments) - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"unknown `experiments` {sorted(unknown)}; choose from {EXPERIMENTS}.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    header = {"config": dataclasses.asdict(cfg), "machine": machine(), "command": command}
    header["how"] = (f"Produced by `{command or 'jdeq.experiments.arithmetic.run'}` on {header['machine']['cpu']} "
                     f"({header['machine']['cores']} cores, backend {header['machine']['backend']}, jax "
                     f"{header['machine']['jax']}); seeds {list(cfg.seeds)}; mean ± std over seeds.")
    results: dict[str, Any] = {}
    keep: dict = {}
    t0 = time.perf_counter()
    wanted = [e for e in EXPERIMENTS if e in experiments]
    if {"compute", "convergence"} & set(wanted) and "depth" not in wanted:
        wanted.insert(0, "depth")
    titles = {"depth": "1. Accuracy per nesting depth", "extrapolation": "2. Depth extrapolation",
              "compute": "3. Test-time compute", "convergence": "4. Convergence vs accuracy"}
    for name in wanted:
        t = time.perf_counter()
        if name == "depth":
            res = exp_depth(cfg, progress, keep); lines = _report_depth(res, cfg, plt, out)
        elif name == "extrapolation":
            res = exp_extrapolation(cfg, progress); lines = _report_extrapolation(res, plt, out)
        elif name == "compute":
            res = exp_compute(cfg, keep); lines = _report_compute(res, cfg, plt, out)
        else:
            res = exp_convergence(cfg, progress, keep); lines = _report_convergence(res, cfg, plt, out)
        res["seconds"] = time.perf_counter() - t
        _write(out, name, titles[name], res, lines + ["", f"Wall time: {res['seconds']:.0f} s."], header)
        results[name] = res
    results["seconds"] = time.perf_counter() - t0
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write("# Depth study on symbolic arithmetic expressions\n\n" + header["how"] + "\n\n"
                 + "\n".join(f"- [{titles[n]}]({n}.md): {results[n]['seconds']:.0f} s" for n in wanted)
                 + f"\n\nTotal: {results['seconds']:.0f} s.\n")
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    """The command line: ``python -m jdeq.experiments.arithmetic [--quick] [...]``."""
    p = argparse.ArgumentParser(prog="python -m jdeq.experiments.arithmetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized settings (a few minutes on 2 cores)")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS), help=f"comma-separated subset of {EXPERIMENTS}")
    p.add_argument("--out", default=os.path.join("results", "arithmetic"), help="output folder")
    p.add_argument("--seeds", type=argtypes.positive_int, help="number of seeds (0..N-1)")
    p.add_argument("--steps", type=argtypes.positive_int, help="training steps per model")
    p.add_argument("--length", type=argtypes.positive_int, help="tokens per expression")
    p.add_argument("--max-depth", type=argtypes.nonneg_int, help="deepest nesting generated")
    p.add_argument("--n-train", type=argtypes.positive_int, help="training examples")
    p.add_argument("--features", type=argtypes.positive_int, help="width of the tied cell")
    p.add_argument("--deq-gradient", choices=sorted(GRADIENTS), help="gradient of the model `deq`")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    unknown = sorted({e.strip() for e in args.experiments.split(",") if e.strip()} - set(EXPERIMENTS))
    if unknown:
        p.error(f"--experiments: unknown {unknown}; choose from {list(EXPERIMENTS)}")
    cfg = QUICK if args.quick else FULL
    overrides = {k: v for k, v in dict(steps=args.steps, length=args.length, max_depth=args.max_depth,
                                        n_train=args.n_train, features=args.features,
                                        deq_gradient=args.deq_gradient).items() if v is not None}
    if args.seeds is not None:
        overrides["seeds"] = tuple(range(args.seeds))
    cfg = dataclasses.replace(cfg, **overrides)
    experiments = [e.strip() for e in args.experiments.split(",") if e.strip()]
    command = "python -m jdeq.experiments.arithmetic " + " ".join(sys.argv[1:] if argv is None else argv)
    results = run(cfg, args.out, experiments, progress=not args.no_progress, command=command.strip())
    print(f"wrote {args.out}/ in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
