"""Training and measuring the models of the arithmetic depth study (see ``arithmetic.py``).

:func:`run_seed` trains every model of a :class:`~jdeq.experiments.arithmetic.Config` for one
seed on the expressions of depth ``<= train_max_depth`` and measures it on every depth; the
report module aggregates the seeds.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import optax
from flax import nnx

import jdeq
from jdeq import train as T
from jdeq.data import arithmetic as A
from jdeq.experiments import arith_measure as M
from jdeq.experiments.arith_models import SequenceClassifier
from jdeq.models.transformer import LSTMClassifier, TransformerClassifier

__all__ = ["GRADIENTS", "build_model", "data", "matched_sizes", "model_names", "optimizer", "run_seed"]

GRADIENTS = {
    "implicit": jdeq.Implicit(),  # exact gradient at z* (Bai et al. 2019)
    "phantom": jdeq.Phantom(steps=5),  # 5 damped steps from z* (Geng et al. 2021)
    "jfb": jdeq.JacobianFree(),  # one step (Fung et al. 2022)
}
"""The DEQ gradients a study can name (``Config.deq_gradient``, ``Config.extra_gradients``)."""


def model_names(cfg) -> list[str]:
    """The models of a study, in report order (DEQ names start with ``"deq"``)."""
    return ["deq", *(f"deq-{g}" for g in cfg.extra_gradients), *(f"deq-budget{b}" for b in cfg.train_budgets),
            f"unrolled-{cfg.unrolled_depth}", *cfg.baselines]


def data(cfg) -> dict[str, A.Dataset]:
    """``{"train", "test"}``: one ``generate`` call (distinct expressions), depths ``0..max_depth``;
    training examples have depth ``<= train_max_depth``, the test set holds ``n_test`` per depth."""
    depths = cfg.max_depth + 1
    n_in = cfg.train_max_depth + 1
    total = cfg.n_train + cfg.n_test * depths
    weights = [(cfg.n_train / n_in + cfg.n_test) if d < n_in else cfg.n_test for d in range(depths)]
    full = A.generate(total, operands=cfg.operands, max_depth=cfg.max_depth, seed=cfg.data_seed, depth_weights=weights)
    rng = np.random.default_rng(cfg.data_seed)
    test_idx = np.concatenate([rng.permutation(np.flatnonzero(full.depth == d))[: cfg.n_test] for d in range(depths)])
    mask = np.zeros(len(full), bool)
    mask[test_idx] = True
    train = full.take(~mask & (full.depth <= cfg.train_max_depth))
    return {"train": train, "test": full.take(np.sort(test_idx))}


def _count(make) -> int:
    return T.count_params(nnx.eval_shape(make))


def _tied(cfg, seed: int = 0, **kw) -> SequenceClassifier:
    return SequenceClassifier(len(A.VOCAB), A.NUM_CLASSES, length=2 * cfg.operands - 1 + 2 * cfg.max_depth,
                              features=cfg.features, kernel=cfg.kernel, readout=cfg.readout, rngs=nnx.Rngs(seed), **kw)


@functools.lru_cache(maxsize=None)
def matched_sizes(cfg) -> tuple[int, int, int]:
    """``(tied params, untied transformer width, LSTM hidden)``, baselines closest to the tied count."""
    tied = _count(lambda: _tied(cfg))
    length = 2 * cfg.operands - 1 + 2 * cfg.max_depth
    width = min(range(cfg.num_heads, 8 * cfg.features + 1, cfg.num_heads), key=lambda w: abs(_count(
        lambda: TransformerClassifier(len(A.VOCAB), A.NUM_CLASSES, length=length, features=w, num_heads=cfg.num_heads,
                                      num_layers=cfg.untied_layers, rngs=nnx.Rngs(0))) - tied))
    hidden = min(range(2, 8 * cfg.features + 1), key=lambda h: abs(_count(
        lambda: LSTMClassifier(len(A.VOCAB), A.NUM_CLASSES, features=cfg.features, hidden=h, rngs=nnx.Rngs(0))) - tied))
    return tied, width, hidden


def build_model(kind: str, cfg, seed: int) -> nnx.Module:
    """One model of the study.

    Args:
      kind: ``"deq"`` (gradient ``cfg.deq_gradient``, budget ``cfg.deq_maxiter``),
        ``"deq-<gradient>"`` (a gradient of :data:`GRADIENTS`), ``"deq-budget<b>"`` (trained with
        ``maxiter=b``), ``"unrolled-L"``, ``"transformer"`` or ``"lstm"``.
      cfg: the study's ``Config``.
      seed: initialization seed.

    Returns:
      An ``nnx.Module`` taking tokens ``(batch, length)``.
    """
    if kind == "deq" or kind.startswith("deq-"):
        rest, maxiter, grad = kind[4:], cfg.deq_maxiter, cfg.deq_gradient
        if rest.startswith("budget") and rest[6:].isdigit():
            maxiter = int(rest[6:])
        elif rest:
            grad = rest
        if grad not in GRADIENTS:
            raise ValueError(f"unknown DEQ gradient {grad!r} in `kind` {kind!r}; expected one of {sorted(GRADIENTS)}.")
        solver = {"fpi": jdeq.FixedPointIteration, "anderson": jdeq.Anderson}[cfg.deq_solver]
        return _tied(cfg, seed, solver=solver(tol=cfg.deq_tol, maxiter=maxiter), gradient=GRADIENTS[grad])
    if kind.startswith("unrolled-") and kind[9:].isdigit():
        return _tied(cfg, seed)
    _, width, hidden = matched_sizes(cfg)
    length = 2 * cfg.operands - 1 + 2 * cfg.max_depth
    if kind == "transformer":
        return TransformerClassifier(len(A.VOCAB), A.NUM_CLASSES, length=length, features=width,
                                     num_heads=cfg.num_heads, num_layers=cfg.untied_layers, rngs=nnx.Rngs(seed))
    if kind == "lstm":
        return LSTMClassifier(len(A.VOCAB), A.NUM_CLASSES, features=cfg.features, hidden=hidden, rngs=nnx.Rngs(seed))
    raise ValueError(f"unknown model `kind` {kind!r}; expected deq, deq-<gradient>, deq-budget<b>, unrolled-L, "
                     "transformer or lstm.")


def _depth_of(kind: str) -> int | None:
    return int(kind[9:]) if kind.startswith("unrolled-") else None


def optimizer(cfg, kind: str):
    """AdamW with warmup + cosine decay and clipping; ``cfg.model_lr`` overrides ``cfg.lr`` per class."""
    lr = dict(cfg.model_lr).get(kind.split("-")[0], cfg.lr)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, cfg.steps // 20), cfg.steps, lr / 20)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))


def _pretrain(model, kind: str, cfg):
    """The DEQs' unrolled pre-training (``cfg.pretrain_steps`` steps at their training budget)."""
    if not cfg.pretrain_steps or not kind.startswith("deq"):
        return None
    return T.Pretrain(steps=cfg.pretrain_steps, depth=model.deq.solver.maxiter)


def _train(model, kind: str, cfg, train: A.Dataset, seed: int, progress: bool) -> float:
    depth = _depth_of(kind)
    loss = T.classification_loss if depth is None else functools.partial(T.classification_loss, depth=depth)
    t0 = time.perf_counter()
    T.fit(model, optimizer(cfg, kind), train.arrays(), steps=cfg.steps, batch_size=cfg.batch_size, seed=seed,
          loss_fn=loss, log_every=max(1, min(100, cfg.steps)), progress=progress,
          pretrain=_pretrain(model, kind, cfg))
    return time.perf_counter() - t0


def _tied_record(model, kind: str, cfg, test: A.Dataset, in_dist: np.ndarray) -> dict[str, Any]:
    """Compute curves, solver iterations per depth, AA scores, convergence of one tied model."""
    depth = _depth_of(kind)
    rec: dict[str, Any] = {"compute": []}
    for k in cfg.test_iters:  # the DEQ with test-time budget k; the unrolled net run k layers deep
        kw = {"depth": k} if depth is not None else {"maxiter": k}
        logits, stats = M.evaluate(model, test.tokens, batch_size=cfg.eval_batch_size, **kw)
        ok = logits.argmax(-1) == test.labels
        row = {"k": k, "per_depth": M.per_depth(ok, test.depth)}
        if depth is None:
            row.update(nsteps=M.per_depth(stats.nsteps, test.depth), rel_residual=M.per_depth(stats.rel_residual, test.depth),
                       converged=float(stats.converged.mean()))
        rec["compute"].append(row)
    sub = np.random.default_rng(0).permutation(len(test))[: cfg.aa_examples]
    kw = {"depth": depth} if depth is not None else {"maxiter": cfg.aa_maxiter}
    aa, same = M.aa_score(model, test.tokens[sub], seed=1, batch_size=cfg.eval_batch_size, **kw)
    logits, _ = M.evaluate(model, test.tokens[sub], batch_size=cfg.eval_batch_size, **kw)
    ok = logits.argmax(-1) == test.labels[sub]
    ood = ~in_dist[sub]
    rec["aa"] = {"mean": float(aa.mean()), "per_depth": M.per_depth(aa, test.depth[sub]),
                 "same_prediction": float(same.mean()),
                 "ood_accuracy_high_aa": float(ok[ood & (aa >= np.median(aa[ood]))].mean()) if ood.any() else None,
                 "ood_accuracy_low_aa": float(ok[ood & (aa < np.median(aa[ood]))].mean()) if ood.any() else None,
                 "auc_aa_predicts_correct_ood": M.auc(aa[ood], ok[ood]) if ood.any() else None}
    if depth is None:
        logits, stats = M.evaluate(model, test.tokens, batch_size=cfg.eval_batch_size)
        ok = logits.argmax(-1) == test.labels
        res = np.asarray(stats.rel_residual)
        rec["residual"] = {"accuracy_converged": float(ok[stats.converged].mean()) if stats.converged.any() else None,
                           "accuracy_not_converged": float(ok[~stats.converged].mean()) if (~stats.converged).any() else None,
                           "converged": float(stats.converged.mean()), "rel_residual_median": float(np.median(res)),
                           "auc_low_residual_correct": M.auc(-res, ok)}
        rec["trajectories"] = M.trajectory_kinds(model, test.tokens[sub[: cfg.traj_examples]], steps=cfg.traj_steps,
                                                 tol=cfg.deq_tol)
    return rec


def run_seed(cfg, seed: int, sets: dict[str, A.Dataset], *, progress: bool = False, log=print) -> list[dict]:
    """Trains and measures every model of :func:`model_names` for one seed.

    Args:
      cfg: the study's ``Config``.
      seed: model initialization and batch-order seed.
      sets: the output of :func:`data`.
      progress: show progress bars.
      log: where the one-line summaries go.

    Returns:
      One record per model: ``model``, ``seed``, ``params``, ``train_seconds``, ``per_depth``
      accuracy at the trained budget/depth, ``forward_iterations`` (mean solver steps, layers or
      time steps), ``in_distribution_accuracy``, and for the weight-tied models the
      measurements of :func:`_tied_record`.
    """
    train, test = sets["train"], sets["test"]
    in_dist = test.depth <= cfg.train_max_depth
    out = []
    for kind in model_names(cfg):
        model = build_model(kind, cfg, seed)
        seconds = _train(model, kind, cfg, train, seed, progress)
        tied = isinstance(model, SequenceClassifier)
        if tied:
            depth = _depth_of(kind)
            logits, stats = M.evaluate(model, test.tokens, depth=depth, batch_size=cfg.eval_batch_size)
            iters = float(np.mean(stats.nsteps)) if depth is None else float(depth)
        else:
            logits, _ = T.predict(model, test.tokens, batch_size=cfg.eval_batch_size)
            iters = float(cfg.untied_layers if kind == "transformer" else np.mean((test.tokens != A.PAD).sum(1)))
        ok = logits.argmax(-1) == test.labels
        rec = {"model": kind, "seed": seed, "params": T.count_params(model), "train_seconds": seconds,
               "per_depth": M.per_depth(ok, test.depth), "in_distribution_accuracy": float(ok[in_dist].mean()),
               "ood_accuracy": float(ok[~in_dist].mean()) if (~in_dist).any() else None,
               "forward_iterations": iters}
        if tied:
            rec.update(_tied_record(model, kind, cfg, test, in_dist))
        out.append(rec)
        log(f"[seed {seed}] {kind:14s} in-dist {rec['in_distribution_accuracy']:.3f} per depth "
            + " ".join(f"{a:.2f}" for a in rec["per_depth"].values()) + f"  iters {iters:.1f}  ({seconds:.0f} s)")
    return out
