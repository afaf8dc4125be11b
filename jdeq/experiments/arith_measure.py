"""Measurements of the arithmetic depth study on trained models (no training here).

- :func:`evaluate`: per-example correctness and solver stats, at a run-time budget (DEQ) or
  depth (the same cell unrolled).
- :func:`aa_score`: the path-independence score of Anil et al. 2022.
- :func:`trajectory_kinds`: converged / limit cycle / slow or irregular, from plain iterations.
- :func:`per_depth`, :func:`mean_std`, :func:`auc`: small statistics.

Reference: Anil et al., "Path Independent Equilibrium Models Can Better Exploit Test-Time
Computation", NeurIPS 2022 (the AA score: re-solve an input starting from another input's fixed
point and compare, by cosine similarity, with its own fixed point).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["aa_score", "auc", "evaluate", "mean_std", "per_depth", "trajectory_kinds"]


@functools.partial(jax.jit, static_argnames=("graphdef", "depth", "state_out"))
def _apply(graphdef, state, tokens, maxiter, z0, *, depth, state_out):
    model = nnx.merge(graphdef, state)
    out = model(tokens, maxiter=maxiter, depth=depth, z0=z0, return_state=True)
    return out if state_out else out[:2]


def evaluate(model, tokens, *, maxiter=None, depth: int | None = None, z0=None, batch_size: int = 1000,
             return_state: bool = False):
    """Runs a :class:`~jdeq.experiments.arith_models.SequenceClassifier` over ``tokens`` in batches.

    Args:
      model: the classifier.
      tokens: int ``(n, length)``.
      maxiter: the DEQ's run-time budget (None: the solver's own).
      depth: run the cell unrolled ``depth`` times instead of the DEQ (static).
      z0: optional ``(n, length, D)`` starting states.
      batch_size: examples per call (one compiled shape; the last batch is padded).
      return_state: also return the final states.

    Returns:
      ``(logits, stats)`` or ``(logits, stats, z)`` as numpy arrays (``stats`` a
      ``jdeq.SolverStats`` of per-example arrays).
    """
    graphdef, state = nnx.split(model)
    n = len(tokens)
    size = min(batch_size, n)
    mi = None if maxiter is None else jnp.asarray(maxiter, jnp.int32)
    outs = []
    for start in range(0, n, size):
        idx = np.minimum(np.arange(start, start + size), n - 1)
        zb = None if z0 is None else jnp.asarray(np.asarray(z0)[idx])
        out = _apply(graphdef, state, jnp.asarray(tokens[idx]), mi, zb, depth=depth, state_out=return_state)
        outs.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[: min(size, n - start)], out))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, 0), *outs)


def _cosine(a, b, valid):
    """Cosine similarity per example over the valid positions of ``(n, length, D)`` states."""
    w = valid[..., None]
    a, b = (a * w).reshape(len(a), -1), (b * w).reshape(len(b), -1)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def aa_score(model, tokens, *, maxiter=None, depth: int | None = None, seed: int = 0, batch_size: int = 1000):
    """Per-example AA score (Anil et al. 2022): path independence of the model's equilibrium.

    Each input ``i`` is solved twice: from the default start (zeros), giving ``z_i``, and from
    ``z_j``, the state reached for another input ``j`` (a random permutation); the score is the
    cosine similarity of the two final states over ``i``'s tokens. 1 means the state reached does
    not depend on where the solve started.

    Args:
      model: a :class:`~jdeq.experiments.arith_models.SequenceClassifier`.
      tokens: int ``(n, length)``.
      maxiter: the DEQ's budget for both solves (None: the solver's own).
      depth: score the unrolled net of this depth instead (``depth`` steps from each start).
      seed: seed of the permutation pairing inputs.
      batch_size: examples per call.

    Returns:
      ``(scores, same_answer)``: float ``(n,)`` cosine similarities, and bool ``(n,)``, whether
      the two solves give the same predicted class.
    """
    logits, _, z = evaluate(model, tokens, maxiter=maxiter, depth=depth, batch_size=batch_size, return_state=True)
    perm = np.random.default_rng(seed).permutation(len(tokens))
    logits2, _, z2 = evaluate(model, tokens, maxiter=maxiter, depth=depth, z0=z[perm], batch_size=batch_size,
                              return_state=True)
    valid = (np.asarray(tokens) != model.pad_id).astype(np.float32)
    return _cosine(z, z2, valid), logits.argmax(-1) == logits2.argmax(-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"))
def _iterate(graphdef, state, tokens, *, steps):
    model = nnx.merge(graphdef, state)
    x = model.inject(tokens)
    cell = model.deq.cell

    def body(z, _):
        z = cell(z, x)
        return z, z

    _, zs = jax.lax.scan(body, cell.init_z(x), None, length=steps)
    return zs  # (steps, n, length, D)


def trajectory_kinds(model, tokens, *, steps: int = 64, tol: float = 1e-3, max_period: int = 8) -> dict:
    """Classifies plain-iteration trajectories ``z_{t+1} = f(z_t, x)`` after ``steps`` steps.

    Per example, with ``r_p = ||z_T - z_{T-p}|| / ||z_T||``: *converged* if ``r_1 < tol``;
    *limit cycle* if not, but ``r_p < tol`` for some period ``2 <= p <= max_period``; *slow* if
    neither, but the step ``r_1`` shrank more than 2x over the second half of the run; otherwise
    *irregular* (neither settling nor periodic).

    Args:
      model: a :class:`~jdeq.experiments.arith_models.SequenceClassifier`.
      tokens: int ``(n, length)`` (a few hundred examples).
      steps: iterations ``T``.
      tol: relative tolerance.
      max_period: longest cycle looked for.

    Returns:
      ``{"converged", "limit_cycle", "slow", "irregular"}``: fractions of the examples, plus
      ``"periods"``: ``{period: count}`` of the cycles found.
    """
    max_period = min(max_period, steps // 2)
    graphdef, state = nnx.split(model)
    zs = np.asarray(_iterate(graphdef, state, jnp.asarray(tokens), steps=steps))
    flat = zs.reshape(steps, zs.shape[1], -1)
    norm = np.maximum(np.linalg.norm(flat[-1], axis=1), 1e-12)
    r = {p: np.linalg.norm(flat[-1] - flat[-1 - p], axis=1) / norm for p in range(1, max_period + 1)}
    half = steps // 2
    early = np.linalg.norm(flat[half] - flat[half - 1], axis=1) / np.maximum(np.linalg.norm(flat[half], axis=1), 1e-12)
    conv = r[1] < tol
    period = np.zeros(len(norm), int)
    for p in range(max_period, 1, -1):  # smallest period wins
        period[r[p] < tol] = p
    cyc = ~conv & (period > 0)
    slow = ~conv & ~cyc & (r[1] < 0.5 * early)
    n = len(norm)
    return {"converged": float(conv.mean()), "limit_cycle": float(cyc.mean()), "slow": float(slow.mean()),
            "irregular": float((~conv & ~cyc & ~slow).mean()),
            "periods": {str(p): int((period[cyc] == p).sum()) for p in range(2, max_period + 1) if (period[cyc] == p).any()},
            "n": n, "steps": steps}


def per_depth(values: np.ndarray, depth: np.ndarray) -> dict[str, float]:
    """``{str(depth): mean of values at that depth}``."""
    return {str(int(d)): float(np.mean(values[depth == d])) for d in np.unique(depth)}


def mean_std(values: Sequence[float]) -> list[float]:
    """``[mean, std]`` (sample std, 0 for one value) of a list of numbers."""
    a = np.asarray(values, float)
    return [float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0]


def auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Probability that a positive example scores higher than a negative one (ties count half)."""
    pos, neg = np.asarray(score)[positive], np.asarray(score)[~positive]
    if not len(pos) or not len(neg):
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="stable")
    ranks = np.empty(len(order)); ranks[order] = np.arange(1, len(order) + 1)
    allv = np.concatenate([pos, neg])
    for v in np.unique(allv):  # average ranks of ties
        m = allv == v
        ranks[m] = ranks[m].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
