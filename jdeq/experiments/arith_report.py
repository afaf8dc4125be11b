"""Aggregates the arithmetic study's per-seed records into ``summary.json``, ``summary.md`` and figures.

``summary.json`` holds, over the seeds (``[mean, std]`` pairs):

- ``models``: per model, ``in_distribution_accuracy``, ``ood_accuracy``, ``per_depth``,
  ``params``, ``forward_iterations`` and ``train_seconds``;
- ``test_time_compute``: per weight-tied model, accuracy per depth at each test-time budget
  (DEQ ``maxiter``) or depth (unrolled net), and the DEQ's solver steps and residuals;
- ``path_independence``: per weight-tied model, the AA score (overall and per depth), the
  out-of-distribution accuracy of the examples above/below the median AA score, the AUC of AA as
  a predictor of a correct answer, and the correlation of AA with OOD accuracy across models;
- ``convergence``: solver iterations per depth; per DEQ its training budget, residual and
  converged fraction at that budget, the accuracy of converged vs unconverged solves, the
  accuracy at the largest test budget, and the kinds of plain-iteration trajectories.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform

import numpy as np

from jdeq.experiments.arith_measure import mean_std

__all__ = ["write"]


def _models(runs):
    return list(dict.fromkeys(r["model"] for r in runs))


def _agg(recs, get):
    vals = [get(r) for r in recs]
    vals = [v for v in vals if v is not None]
    return mean_std(vals) if vals else None


def summarize(cfg, sets, runs: list[dict], seconds: float, command: str) -> dict:
    """The content of ``summary.json`` (see the module docstring)."""
    test = sets["test"]
    depths = sorted({int(d) for d in np.unique(test.depth)})
    by = {m: [r for r in runs if r["model"] == m] for m in _models(runs)}
    models = {}
    for m, rs in by.items():
        models[m] = {
            "in_distribution_accuracy": _agg(rs, lambda r: r["in_distribution_accuracy"]),
            "ood_accuracy": _agg(rs, lambda r: r["ood_accuracy"]),
            "per_depth": {str(d): _agg(rs, lambda r, d=d: r["per_depth"][str(d)]) for d in depths},
            "params": rs[0]["params"],
            "forward_iterations": _agg(rs, lambda r: r["forward_iterations"]),
            "train_seconds": _agg(rs, lambda r: r["train_seconds"]),
        }
    tied = [m for m, rs in by.items() if "compute" in rs[0]]
    compute = {"iterations": list(cfg.test_iters), "models": {}}
    for m in tied:
        rs = by[m]
        entry = {"per_depth": {str(d): [_agg(rs, lambda r, i=i, d=d: r["compute"][i]["per_depth"][str(d)])
                                        for i in range(len(cfg.test_iters))] for d in depths}}
        if m.startswith("deq"):
            for key in ("nsteps", "rel_residual"):
                entry[key] = {str(d): [_agg(rs, lambda r, i=i, d=d, key=key: r["compute"][i][key][str(d)])[0]
                                       for i in range(len(cfg.test_iters))] for d in depths}
        compute["models"][m] = entry
    path = {"examples": cfg.aa_examples, "deq_maxiter": cfg.aa_maxiter, "models": {}}
    for m in tied:
        rs = by[m]
        path["models"][m] = {
            "aa": _agg(rs, lambda r: r["aa"]["mean"]),
            "aa_per_depth": {str(d): _agg(rs, lambda r, d=d: r["aa"]["per_depth"].get(str(d))) for d in depths},
            "same_prediction": _agg(rs, lambda r: r["aa"]["same_prediction"]),
            "ood_accuracy": models[m]["ood_accuracy"],
            "ood_accuracy_high_aa": _agg(rs, lambda r: r["aa"]["ood_accuracy_high_aa"]),
            "ood_accuracy_low_aa": _agg(rs, lambda r: r["aa"]["ood_accuracy_low_aa"]),
            "auc_aa_predicts_correct_ood": _agg(rs, lambda r: r["aa"]["auc_aa_predicts_correct_ood"]),
        }
    pairs = [(r["aa"]["mean"], r["ood_accuracy"]) for m in tied for r in by[m] if r["ood_accuracy"] is not None]
    if len(pairs) > 2 and np.std([p[0] for p in pairs]) > 0 and np.std([p[1] for p in pairs]) > 0:
        path["pearson_aa_vs_ood_accuracy"] = float(np.corrcoef(np.array(pairs).T)[0, 1])
        path["n_model_seed_pairs"] = len(pairs)
    conv = {"solver_iterations_per_depth": {}, "models": {}, "tol": cfg.deq_tol}
    big = len(cfg.test_iters) - 1
    for m in tied:
        if not m.startswith("deq"):
            continue
        rs = by[m]
        budget = int(m[10:]) if m.startswith("deq-budget") else cfg.deq_maxiter
        conv["solver_iterations_per_depth"][m] = {str(d): _agg(rs, lambda r, d=d: r["compute"][big]["nsteps"][str(d)])
                                                  for d in depths}
        kinds = ("converged", "limit_cycle", "slow", "irregular")
        conv["models"][m] = {
            "train_budget": budget,
            "in_distribution_accuracy": models[m]["in_distribution_accuracy"],
            "converged_at_train_budget": _agg(rs, lambda r: r["residual"]["converged"]),
            "rel_residual_median": _agg(rs, lambda r: r["residual"]["rel_residual_median"]),
            "accuracy_converged": _agg(rs, lambda r: r["residual"]["accuracy_converged"]),
            "accuracy_not_converged": _agg(rs, lambda r: r["residual"]["accuracy_not_converged"]),
            "auc_low_residual_correct": _agg(rs, lambda r: r["residual"]["auc_low_residual_correct"]),
            f"in_distribution_accuracy_at_{cfg.test_iters[big]}": _agg(rs, lambda r: float(np.mean(
                [r["compute"][big]["per_depth"][str(d)] for d in depths if d <= cfg.train_max_depth]))),
            f"ood_accuracy_at_{cfg.test_iters[big]}": _agg(rs, lambda r: float(np.mean(
                [r["compute"][big]["per_depth"][str(d)] for d in depths if d > cfg.train_max_depth])))
            if cfg.max_depth > cfg.train_max_depth else None,
            "trajectories": {k: _agg(rs, lambda r, k=k: r["trajectories"][k]) for k in kinds},
            "trajectory_steps": cfg.traj_steps,
        }
    test_counts = {str(d): int((test.depth == d).sum()) for d in depths}
    majority = float(np.mean(test.labels == np.bincount(sets["train"].labels).argmax()))
    return {
        "seeds": list(cfg.seeds),
        "train_depths": list(range(cfg.train_max_depth + 1)),
        "test_depths": depths,
        "models": models,
        "test_time_compute": compute,
        "path_independence": path,
        "convergence": conv,
        "task": {"operands": cfg.operands, "target": "exact value in [0, 9]", "n_train": len(sets["train"]),
                 "n_test_per_depth": test_counts, "majority_class_accuracy": majority,
                 "example": sets["test"].text[-1]},
        "config": dataclasses.asdict(cfg),
        "wall_seconds": seconds,
        "machine": {"python": platform.python_version(), "cores": os.cpu_count(), "cpu": platform.machine()},
        "command": command,
    }


def _fmt(ms, digits: int = 3) -> str:
    if ms is None:
        return "-"
    m, s = ms
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _markdown(s: dict) -> str:
    depths = [str(d) for d in s["test_depths"]]
    train = s["train_depths"]
    lines = [f"# Depth study on arithmetic expressions\n",
             f"`{s['command']}`: {len(s['seeds'])} seeds, {s['wall_seconds'] / 60:.1f} min on {s['machine']['cores']} cores. "
             f"Task: {s['task']['operands']} digits joined by + and -, label = the exact value in [0, 9]; "
             f"trained on depths {train[0]}-{train[-1]} ({s['task']['n_train']} examples), tested on "
             f"depths {depths[0]}-{depths[-1]} ({s['task']['n_test_per_depth'][depths[0]]} per depth); majority class "
             f"{s['task']['majority_class_accuracy']:.3f}. Mean ± std over seeds; numbers from "
             "[`summary.json`](summary.json).\n",
             "## Accuracy per depth (depths above the training range are out of distribution)\n",
             "| model | params | fwd iterations | in-dist | OOD | " + " | ".join(f"d{d}" for d in depths) + " |",
             "|---" * (5 + len(depths)) + "|"]
    for m, r in s["models"].items():
        lines.append(f"| {m} | {r['params']} | {r['forward_iterations'][0]:.1f} | {_fmt(r['in_distribution_accuracy'])} | "
                     f"{_fmt(r['ood_accuracy'])} | " + " | ".join(f"{r['per_depth'][d][0]:.2f}" for d in depths) + " |")
    lines += ["", "![accuracy per depth](depth.png)", "", "## Test-time compute\n",
              "Accuracy per depth when the DEQ gets `k` solver iterations at test time, and when the "
              "unrolled net is run `k` layers deep (seed mean).\n",
              "| model | depth | " + " | ".join(f"k={k}" for k in s["test_time_compute"]["iterations"]) + " |",
              "|---" * (2 + len(s["test_time_compute"]["iterations"])) + "|"]
    for m, r in s["test_time_compute"]["models"].items():
        for d in depths:
            lines.append(f"| {m} | {d} | " + " | ".join(f"{x[0]:.2f}" for x in r["per_depth"][d]) + " |")
    lines += ["", "![test-time compute](compute.png)", "", "## Path independence (AA score)\n",
              "| model | AA | OOD acc | OOD acc, AA above / below median | AUC (AA -> correct, OOD) |", "|---|---|---|---|---|"]
    for m, r in s["path_independence"]["models"].items():
        lines.append(f"| {m} | {_fmt(r['aa'])} | {_fmt(r['ood_accuracy'])} | {_fmt(r['ood_accuracy_high_aa'], 2)} / "
                     f"{_fmt(r['ood_accuracy_low_aa'], 2)} | {_fmt(r['auc_aa_predicts_correct_ood'], 2)} |")
    if "pearson_aa_vs_ood_accuracy" in s["path_independence"]:
        lines.append(f"\nPearson r of AA vs OOD accuracy over {s['path_independence']['n_model_seed_pairs']} "
                     f"(model, seed) pairs: {s['path_independence']['pearson_aa_vs_ood_accuracy']:.2f}.")
    lines += ["", "![path independence](path.png)", "", "## Convergence\n",
              "| DEQ | train budget | in-dist | converged at budget | median rel residual | acc converged / not (all depths) | "
              f"in-dist at k={s['test_time_compute']['iterations'][-1]} | OOD at k={s['test_time_compute']['iterations'][-1]} | "
              "trajectories: converged / cycle / slow / irregular |", "|---" * 9 + "|"]
    big = s["test_time_compute"]["iterations"][-1]
    for m, r in s["convergence"]["models"].items():
        t = r["trajectories"]
        lines.append(f"| {m} | {r['train_budget']} | {_fmt(r['in_distribution_accuracy'])} | "
                     f"{_fmt(r['converged_at_train_budget'], 2)} | {r['rel_residual_median'][0]:.2g} | "
                     f"{_fmt(r['accuracy_converged'], 2)} / {_fmt(r['accuracy_not_converged'], 2)} | "
                     f"{_fmt(r[f'in_distribution_accuracy_at_{big}'])} | {_fmt(r.get(f'ood_accuracy_at_{big}'))} | "
                     + " / ".join(f"{t[k][0]:.2f}" for k in ("converged", "limit_cycle", "slow", "irregular")) + " |")
    solver = {"fpi": "plain iteration", "anderson": "Anderson"}[s["config"]["deq_solver"]]
    lines += ["", f"Solver iterations per depth ({solver}, tol "
              f"{s['convergence']['tol']:g}, budget {big}):", "",
              "| DEQ | " + " | ".join(f"d{d}" for d in depths) + " |", "|---" * (1 + len(depths)) + "|"]
    for m, r in s["convergence"]["solver_iterations_per_depth"].items():
        lines.append(f"| {m} | " + " | ".join(f"{r[d][0]:.1f}" for d in depths) + " |")
    lines += ["", "![convergence](convergence.png)", ""]
    return "\n".join(lines)


def _plots(s: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = [str(d) for d in s["test_depths"]]
    edge = s["train_depths"][-1] + 0.5
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, r in s["models"].items():
        ax.errorbar([int(d) for d in depths], [r["per_depth"][d][0] for d in depths],
                    yerr=[r["per_depth"][d][1] for d in depths], marker="o", capsize=2, label=m)
    ax.axvline(edge, color="gray", ls="--")
    ax.axhline(s["task"]["majority_class_accuracy"], color="k", ls=":", lw=0.8)
    ax.set(xlabel="nesting depth (right of the dashed line: unseen in training)", ylabel="test accuracy",
           title="accuracy per depth")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout(); fig.savefig(os.path.join(out, "depth.png"), dpi=110); plt.close(fig)

    tc = s["test_time_compute"]
    names = [m for m in tc["models"] if m == "deq" or m.startswith("unrolled")]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), squeeze=False)
    for ax, m in zip(axes[0], names):
        for d in depths:
            ax.plot(tc["iterations"], [x[0] for x in tc["models"][m]["per_depth"][d]], marker="o", label=f"depth {d}",
                    ls="-" if int(d) <= s["train_depths"][-1] else "--")
        ax.set(xscale="log", xlabel="test-time iterations / layers k", ylabel="accuracy", title=m)
        ax.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(os.path.join(out, "compute.png"), dpi=110); plt.close(fig)

    pi = s["path_independence"]["models"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m, r in pi.items():
        if r["ood_accuracy"] is not None:
            ax.errorbar(r["aa"][0], r["ood_accuracy"][0], xerr=r["aa"][1], yerr=r["ood_accuracy"][1], marker="o", capsize=2)
            ax.annotate(m, (r["aa"][0], r["ood_accuracy"][0]), fontsize=7)
    ax.set(xlabel="AA score (path independence)", ylabel="OOD accuracy", title="path independence vs extrapolation")
    fig.tight_layout(); fig.savefig(os.path.join(out, "path.png"), dpi=110); plt.close(fig)

    cv = s["convergence"]["models"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m in cv:
        r = tc["models"][m]["rel_residual"]
        a.plot(tc["iterations"], [np.mean([r[d][i] for d in depths]) for i in range(len(tc["iterations"]))],
               marker="o", label=f"{m} (train budget {cv[m]['train_budget']})")
    a.set(xscale="log", yscale="log", xlabel="test-time maxiter", ylabel="mean rel residual", title="residual")
    a.legend(fontsize=7)
    kinds = ("converged", "limit_cycle", "slow", "irregular")
    bottom = np.zeros(len(cv))
    for k in kinds:
        v = np.array([cv[m]["trajectories"][k][0] for m in cv])
        b.bar(range(len(cv)), v, bottom=bottom, label=k)
        bottom += v
    b.set_xticks(range(len(cv)), list(cv), rotation=30, fontsize=7)
    b.set(ylabel="fraction of examples", title="plain-iteration trajectories")
    b.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(os.path.join(out, "convergence.png"), dpi=110); plt.close(fig)


def write(cfg, sets, runs: list[dict], out: str, *, seconds: float, command: str) -> dict:
    """Writes ``summary.json``, ``runs.json``, ``summary.md`` and the figures to ``out``.

    Args:
      cfg: the study's ``Config``.
      sets: ``{"train", "test"}`` datasets.
      runs: the per-seed records of ``arith_study.run_seed``.
      out: output folder (created).
      seconds: wall time of the study.
      command: the command line.

    Returns:
      The summary, plus ``"runs"``.
    """
    os.makedirs(out, exist_ok=True)
    s = summarize(cfg, sets, runs, seconds, command)
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(s, fh, indent=1)
    with open(os.path.join(out, "runs.json"), "w") as fh:
        json.dump(runs, fh, indent=1)
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write(_markdown(s))
    _plots(s, out)
    return {**s, "runs": runs}
