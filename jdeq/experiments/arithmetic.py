"""The depth study on symbolic arithmetic expressions: do DEQs behave like infinitely deep nets?

Task (``jdeq.data.arithmetic``): expressions of ``operands`` digits joined by ``+``/``-``, whose
nesting depth is the only thing that varies; the label is the exact value, kept in ``[0, 9]``.
Every model trains on depths ``<= train_max_depth`` and is tested on every depth up to
``max_depth``: the deeper ones measure extrapolation.

Models (``arith_study.model_names``), all at about the same parameter count:

- ``deq``: the convolutional-GRU cell of ``arith_models`` as a ``jdeq.nnx.DEQ`` (Anderson,
  ``deq_maxiter`` iterations at most, ``deq_gradient``); ``deq-<gradient>`` with the other
  gradients; ``deq-budget<b>`` trained with ``maxiter=b`` (the layer does not converge);
- ``unrolled-L``: the same cell applied ``L`` times (explicit, weight-tied, backprop through all);
- ``transformer`` (untied) and ``lstm``.

Measurements (``arith_study.run_seed``; aggregated by ``arith_report``): accuracy per depth;
test-time compute (the DEQ with budgets ``test_iters``, the unrolled net run that many layers
deep); solver iterations per depth; path independence (AA score of Anil et al. 2022) against
out-of-distribution accuracy; the small-budget DEQs (residual, limit cycles vs slow
convergence, extra test iterations); implicit vs phantom vs JFB gradients.

Writes ``summary.json`` (the schema of issue 16), ``summary.md`` and figures to ``--out``.

Usage::

    python -m jdeq.experiments.arithmetic            # the study: 3 seeds, CPU-sized
    python -m jdeq.experiments.arithmetic --quick    # seconds: one seed, tiny (the tests)

References: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019; Geng et al., "On
Training Implicit Models", NeurIPS 2021; Fung et al., "JFB", AAAI 2022; Schwarzschild et al.
2021 and Bansal et al. 2022 (Deep Thinking nets, recall); Anil et al., "Path Independent
Equilibrium Models Can Better Exploit Test-Time Computation", NeurIPS 2022.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Sequence

from jdeq import _validate as V
from jdeq import argtypes
from jdeq.experiments.arith_study import GRADIENTS, build_model, data, matched_sizes, model_names, run_seed

__all__ = ["Config", "FULL", "GRADIENTS", "QUICK", "build_model", "data", "main", "matched_sizes", "model_names",
           "run"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the study (see :data:`FULL` and :data:`QUICK`).

    Attributes:
      operands: digits per expression (the same at every depth).
      max_depth: deepest nesting tested (needs ``operands >= max_depth + 2``).
      train_max_depth: deepest nesting trained on; deeper test depths are out of distribution.
      n_train: training examples; n_test: test examples per depth.
      features, kernel, readout: width, taps and readout (``"mean"`` or ``"last"``) of the
        weight-tied cell; the baselines are matched to its
        parameter count (``untied_layers`` blocks of ``num_heads`` heads; an LSTM).
      steps, batch_size, lr, model_lr: training (AdamW, warmup + cosine, clipping at 1);
        ``model_lr = ((class, lr), ...)`` overrides ``lr`` per class (``deq``, ``unrolled``,
        ``transformer``, ``lstm``).
      seeds, data_seed: model/batch-order seeds; the data's seed.
      deq_solver, deq_tol, deq_maxiter, deq_gradient: the DEQ's solver (``"fpi"``: plain
        iteration, or ``"anderson"``), tolerance, budget and gradient in training.
      pretrain_steps: the DEQs' first steps trained as the weight-tied net of depth equal to
        their training budget (``jdeq.train.Pretrain``, Bai et al. 2020); 0: none.
      extra_gradients: more gradients, trained as ``deq-<gradient>``.
      train_budgets: training budgets of the ``deq-budget<b>`` models.
      unrolled_depth: depth ``L`` of the ``unrolled-L`` baseline.
      baselines: ``"transformer"``, ``"lstm"``.
      test_iters: test-time budgets (DEQ) and depths (unrolled net) of the compute curves.
      aa_examples, aa_maxiter: examples and budget of the path-independence score.
      traj_examples, traj_steps: plain-iteration trajectories classified per DEQ.
      eval_batch_size: batch size of evaluation.
    """

    operands: int = 6
    max_depth: int = 4
    train_max_depth: int = 1
    n_train: int = 20_000
    n_test: int = 200
    features: int = 64
    kernel: int = 1
    readout: str = "last"
    num_heads: int = 4
    untied_layers: int = 4
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-2
    model_lr: tuple = ()
    seeds: tuple = (0, 1, 2)
    data_seed: int = 1234
    deq_solver: str = "fpi"
    deq_tol: float = 1e-3
    deq_maxiter: int = 24
    deq_gradient: str = "implicit"
    pretrain_steps: int = 0
    extra_gradients: tuple = ("phantom", "jfb")
    train_budgets: tuple = (2, 4, 8)
    unrolled_depth: int = 16
    baselines: tuple = ("transformer", "lstm")
    test_iters: tuple = (1, 2, 4, 8, 16, 24, 32, 64)
    aa_examples: int = 300
    aa_maxiter: int = 64
    traj_examples: int = 150
    traj_steps: int = 64
    eval_batch_size: int = 500

    def __post_init__(self):
        # The rules of jdeq._validate, the ones the command line's argparse types apply to the
        # options that override these fields (--steps, --max-depth, ...).
        for name in ("operands", "n_train", "n_test", "features", "num_heads", "untied_layers", "steps",
                     "batch_size", "deq_maxiter", "unrolled_depth", "aa_examples", "aa_maxiter", "traj_examples",
                     "traj_steps", "eval_batch_size"):
            V.positive_int(getattr(self, name), name)
        for name in ("max_depth", "train_max_depth", "data_seed", "pretrain_steps"):
            V.nonnegative_int(getattr(self, name), name)
        V.positive_number(self.lr, "lr")
        V.positive_number(self.deq_tol, "deq_tol")
        V.one_of(self.kernel, "kernel", (1, 2, 3))
        V.one_of(self.readout, "readout", ("mean", "last"))
        V.one_of(self.deq_solver, "deq_solver", ("fpi", "anderson"))
        V.one_of(self.deq_gradient, "deq_gradient", tuple(GRADIENTS))
        for g in self.extra_gradients:
            V.one_of(g, "extra_gradients", tuple(GRADIENTS))
        for name in ("seeds", "train_budgets", "test_iters"):
            for v in getattr(self, name):
                (V.nonnegative_int if name == "seeds" else V.positive_int)(v, name)
        for v in self.baselines:
            V.one_of(v, "baselines", ("transformer", "lstm"))
        for kind, lr in self.model_lr:
            V.one_of(kind, "model_lr", ("deq", "unrolled", "transformer", "lstm"))
            V.positive_number(lr, "model_lr")


FULL = Config()
QUICK = Config(operands=4, max_depth=2, train_max_depth=1, n_train=512, n_test=64, features=8, num_heads=2,
               untied_layers=1, steps=20, batch_size=64, seeds=(0,), deq_maxiter=6, extra_gradients=(),
               train_budgets=(2,), unrolled_depth=3, baselines=("lstm",), test_iters=(1, 3), aa_examples=64,
               aa_maxiter=8, traj_examples=16, traj_steps=6, eval_batch_size=256)
"""Seconds-sized settings for the tests: a DEQ, a small-budget DEQ, the unrolled net and an LSTM
through every measurement; nothing is learned."""


def _save_partial(out: str, runs: list[dict]) -> None:
    """Writes the records of the seeds done so far to ``out/runs.partial.json``."""
    import json

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "runs.partial.json"), "w") as fh:
        json.dump(runs, fh)


def _seed_job(cfg: Config, seed: int) -> list[dict]:
    """One seed in a worker process (``run(..., jobs>1)``)."""
    return run_seed(cfg, seed, data(cfg), log=lambda line: print(line, flush=True))


def run(cfg: Config, out: str, *, progress: bool = False, command: str = "", log=print, jobs: int = 1) -> dict:
    """Runs the study and writes ``summary.json``, ``summary.md`` and figures to ``out``.

    Args:
      cfg: the :class:`Config`.
      out: output folder (created).
      progress: show progress bars.
      command: the command line recorded in the reports.
      log: where progress lines go.
      jobs: seeds trained at the same time, in separate processes (1: in this process).

    Returns:
      The summary (the content of ``summary.json``), with the per-seed records under ``"runs"``
      (not written to ``summary.json``; ``runs.json`` holds them).
    """
    from jdeq.experiments import arith_report

    t0 = time.perf_counter()
    sets = data(cfg)
    runs = []
    if jobs > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(cfg.seeds)),
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            for job in concurrent.futures.as_completed([pool.submit(_seed_job, cfg, s) for s in cfg.seeds]):
                runs.extend(job.result())
                _save_partial(out, runs)
    else:
        for seed in cfg.seeds:
            runs.extend(run_seed(cfg, seed, sets, progress=progress, log=log))
            _save_partial(out, runs)
    runs.sort(key=lambda r: r["seed"])
    return arith_report.write(cfg, sets, runs, out, seconds=time.perf_counter() - t0, command=command)


def main(argv: Sequence[str] | None = None) -> dict:
    """The command line: ``python -m jdeq.experiments.arithmetic [--quick] [...]``."""
    p = argparse.ArgumentParser(prog="python -m jdeq.experiments.arithmetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds; checks that everything runs)")
    p.add_argument("--out", default=os.path.join("results", "arithmetic"), help="output folder")
    p.add_argument("--seeds", type=argtypes.positive_int, help="number of seeds (0..N-1)")
    p.add_argument("--steps", type=argtypes.positive_int, help="training steps per model")
    p.add_argument("--operands", type=argtypes.positive_int, help="digits per expression")
    p.add_argument("--length", type=argtypes.positive_int, help=argparse.SUPPRESS)  # old flag: rejected below
    p.add_argument("--max-depth", type=argtypes.nonneg_int, help="deepest nesting tested")
    p.add_argument("--train-max-depth", type=argtypes.nonneg_int, help="deepest nesting trained on")
    p.add_argument("--n-train", type=argtypes.positive_int, help="training examples")
    p.add_argument("--features", type=argtypes.positive_int, help="width of the tied cell")
    p.add_argument("--deq-gradient", choices=sorted(GRADIENTS), help="gradient of the model `deq`")
    p.add_argument("--experiments", default="all", help=argparse.SUPPRESS)  # old flag: only 'all' remains
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--jobs", type=argtypes.positive_int, default=1, help="seeds trained in parallel processes")
    args = p.parse_args(argv)
    if args.experiments != "all":
        p.error(f"--experiments: unknown {sorted(args.experiments.split(','))}; the study runs as one piece")
    if args.length is not None:
        p.error("--length: the token length follows from --operands and --max-depth")
    cfg = QUICK if args.quick else FULL
    overrides = {k: v for k, v in dict(steps=args.steps, operands=args.operands, max_depth=args.max_depth,
                                        train_max_depth=args.train_max_depth, n_train=args.n_train,
                                        features=args.features, deq_gradient=args.deq_gradient).items()
                 if v is not None}
    if args.seeds is not None:
        overrides["seeds"] = tuple(range(args.seeds))
    cfg = dataclasses.replace(cfg, **overrides)
    command = "python -m jdeq.experiments.arithmetic " + " ".join(sys.argv[1:] if argv is None else argv)
    summary = run(cfg, args.out, progress=args.progress, command=command.strip(), jobs=args.jobs)
    print(f"wrote {args.out}/ in {summary['wall_seconds']:.0f} s")
    return summary


if __name__ == "__main__":
    main()
