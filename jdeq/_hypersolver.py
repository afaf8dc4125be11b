"""A learned Anderson solver (the solver half of Bai et al. 2022's "neural deep equilibrium solver").

:class:`HyperAnderson` is Anderson acceleration whose mixing weights and step size are corrected
by a tiny MLP, per example and per iteration, then run in jdeq's shared per-example loop like any
other solver. The network sees only dimension-free summaries of the history that Anderson itself
uses (the residual Gram matrix as cosines and log-norms, Anderson's own weights, which slots are
filled), so one mixer serves any state size. Its last layer starts at zero: an untrained mixer
*is* plain Anderson, and training can only move away from it where that lowers the loss.

Safeguards (the "falls back to plain Anderson" part):

* per example, as soon as a learned step fails to reduce the residual, that example continues
  with plain Anderson weights for the rest of the solve;
* learned mixing is used for the first ``learned_steps`` iterations only (all by default);
* :func:`jdeq.models.HyperSolver.calibrate` measures whether the learned initializer and mixer
  save evaluations at all on held-out data, and switches off each part that does not.

:func:`hyper_loss` is the training objective on a frozen DEQ: the mean log relative residual over
an unrolled trajectory of ``steps`` iterations (every iteration counts, so the whole path gets
faster, not only its end), computed by the same shared loop run as a differentiable scan.

Reference: Bai, Koltun & Kolter, "Neural Deep Equilibrium Solvers", ICLR 2022.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jdeq import _validate as V
from jdeq._loop import REL_EPS
from jdeq._solvers import Solver, anderson_mix, anderson_record, anderson_weights, leaf_field, zeros_history, zeros_rows

__all__ = ["HyperAnderson", "hyper_loss", "init_mixer", "mixer_features"]

_BETA_MAX = 2.0  # learned step size beta lies in (0, 2 * damping)
_DIVERGED = 10.0  # hyper_loss's log-residual charged for each iteration after a divergence


def mixer_features(gram: jax.Array, valid: jax.Array, alpha: jax.Array, order: jax.Array):
    """Dimension-free features of an Anderson history, newest slot first: ``(batch, m*m + 3m)``.

    With the slots reordered newest first (``i = 0`` the newest), ``G`` the Gram matrix of the
    residuals and ``d_i = G_ii + eps**4`` (``eps`` of ``gram``'s dtype: a floor that keeps a zero
    residual finite), the features are, in this order: the cosines ``G_ij / sqrt(d_i d_j)``
    (``m*m``), the log norm ratios ``log(d_i / d_0) / 2`` clipped to ``[-20, 20]`` (``m``),
    Anderson's weights ``alpha_i`` (``m``) and the filled mask (``m``); an empty slot's entries
    are 0. Its products run at ``Precision.HIGHEST`` (the reordering stays exact on GPU and TPU).

    Args:
      gram: ``(batch, m, m)`` residual Gram matrix (ring-buffer order).
      valid: ``(m,)`` filled slots.
      alpha: ``(batch, m)`` Anderson's least-squares weights.
      order: ``(m,)`` slot indices from newest to oldest.
    """
    # Reordering by a one-hot matrix rather than a gather: exact, and it keeps the batch
    # sharding of its operands under Explicit mesh axes (a gather's transpose is a scatter into
    # an unsharded buffer).
    perm = jax.nn.one_hot(order, gram.shape[-1], dtype=gram.dtype)  # perm[i, j] = [order_i == j]
    g = jnp.einsum("ij,njk,lk->nil", perm, gram, perm, precision=jax.lax.Precision.HIGHEST)
    v = valid[order].astype(gram.dtype)
    # empty slots get a unit diagonal before any division or log (no inf/NaN in gradients)
    eps = jnp.finfo(gram.dtype).eps
    diag = jnp.where(v > 0, jnp.diagonal(g, axis1=1, axis2=2), 1.0) + eps**4
    scale = jnp.sqrt(diag)
    cos = g / (scale[:, :, None] * scale[:, None, :]) * (v[:, None] * v[None, :])
    lognorm = 0.5 * (jnp.log(diag) - jnp.log(diag[:, :1])) * v
    a = jnp.einsum("nj,ij->ni", alpha, perm, precision=jax.lax.Precision.HIGHEST) * v
    n, m = alpha.shape
    return jnp.concatenate(
        # (the filled-slot mask as zeros_like(a) + v: laid out like the batch, so the
        # concatenation keeps the batch sharding under Explicit mesh axes)
        [cos.reshape(n, m * m), jnp.clip(lognorm, -20.0, 20.0), a, jnp.zeros_like(a) + v], axis=1
    )


def init_mixer(key, memory: int = 5, hidden: int = 32, dtype=jnp.float32) -> dict:
    """Parameters of the mixer MLP ``features -> hidden -> (m weight corrections, 1 step logit)``.

    The hidden layer's weights are i.i.d. ``N(0, 1/n_in)`` (LeCun normal: unit-variance
    pre-activations for unit-variance features), its bias zero; the output layer is zero, so
    the untrained mixer reproduces plain Anderson exactly.

    Args:
      key: PRNG key.
      memory: Anderson memory ``m`` the mixer serves.
      hidden: hidden width.
      dtype: parameter dtype.

    Returns:
      A dict pytree ``{"w1", "b1", "w2", "b2"}``.

    Example:
      >>> import jax, jdeq
      >>> params = jdeq.init_mixer(jax.random.key(0), memory=5)
      >>> params["w1"].shape
      (40, 32)
    """
    V.key(key)
    V.positive_int(memory, "memory")
    V.positive_int(hidden, "hidden")
    n_in = memory * memory + 3 * memory
    w1 = jax.random.normal(key, (n_in, hidden), dtype) / math.sqrt(n_in)
    return {
        "w1": w1,
        "b1": jnp.zeros((hidden,), dtype),
        "w2": jnp.zeros((hidden, memory + 1), dtype),
        "b2": jnp.zeros((memory + 1,), dtype),
    }


def _is_mixer(params, memory: int) -> bool:
    """Whether ``params`` is a mixer of :func:`init_mixer`'s layout for this ``memory``: the dict
    ``{"w1", "b1", "w2", "b2"}`` with shapes ``(m*m + 3m, h)``, ``(h,)``, ``(h, m + 1)``, ``(m + 1,)``."""
    if not isinstance(params, dict) or set(params) != {"w1", "b1", "w2", "b2"}:
        return False
    w1 = jnp.shape(params["w1"])
    if len(w1) != 2:
        return False
    n_in, hidden = memory * memory + 3 * memory, w1[1]
    want = {"w1": (n_in, hidden), "b1": (hidden,), "w2": (hidden, memory + 1), "b2": (memory + 1,)}
    return all(jnp.shape(params[k]) == shape for k, shape in want.items())


def _mixer_apply(params, feats):
    h = jnp.tanh(feats @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class HyperAnderson(Solver):
    """Anderson acceleration with learned corrections of its mixing weights and step size.

    At iteration ``k`` the tiny MLP ``mixer`` (parameters ``params``, see :func:`init_mixer`)
    maps the history's features to ``delta`` (``m`` numbers in (-1, 1), projected to sum 0 over
    the filled slots) and a step logit ``s``; the update is
    ``z_{k+1} = sum_i (alpha_i + delta_i) (z_i + beta g_i)`` with Anderson's own weights
    ``alpha`` and ``beta = 2 * damping * sigmoid(s)`` (``= damping`` at ``s = 0``). With
    ``params=None`` it is plain Anderson. Per example, once a learned step does not lower the
    residual, plain Anderson takes over for the rest of the solve.

    The parameters are arrays, so the object compares and hashes by identity. As the forward
    solver of a trained model, pair it with an explicit backward solver, e.g.
    ``gradient=jdeq.Implicit(solver=jdeq.Anderson())`` (the mixer was trained on the forward
    problem, not on the adjoint one).

    Args:
      tol, maxiter, stop_mode, trace, memory, ridge, damping: as in :class:`jdeq.Anderson`.
      params: mixer parameters (from :func:`init_mixer`, trained with :func:`hyper_loss`), or
        None. A model's loss gives them a zero gradient under ``Implicit``, ``Phantom`` and
        ``JacobianFree`` (the forward path is not differentiated), and a path gradient only
        under ``jdeq.Unrolled()``.
      learned_steps: use learned mixing for the first ``learned_steps`` iterations only
        (None: all).
      safeguard: switch an example to plain Anderson after a learned step that did not reduce
        its residual.

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> solver = jdeq.HyperAnderson(params=jdeq.init_mixer(jax.random.key(0)), tol=1e-5)
      >>> sol = jdeq.fixed_point(lambda z, a: 0.9 * jnp.tanh(z) + a, jnp.zeros((4, 8)),
      ...                        jnp.ones((4, 8)), solver=solver)

    Reference: Bai, Koltun & Kolter, "Neural Deep Equilibrium Solvers", ICLR 2022.
    """

    memory: int = 5
    ridge: float = 1e-5
    damping: float = 1.0
    params: Any = leaf_field(default=None)
    learned_steps: int | None = None
    safeguard: bool = True

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __post_init__(self):
        super().__post_init__()  # tol, maxiter, stop_mode, memory, ridge, damping
        V.nonnegative_int(self.learned_steps, "learned_steps", none=True)
        V.boolean(self.safeguard, "safeguard")
        if self.params is not None and not _is_mixer(self.params, self.memory):
            raise ValueError(
                f"`params` must come from jdeq.init_mixer(key, memory={self.memory}) "
                "(mixer input/output sizes must match `memory`)."
            )

    def init(self, z):
        m = self.memory
        col = zeros_rows(z, ())  # (n,), laid out like the batch
        return (
            zeros_history(z, m),
            zeros_history(z, m),
            zeros_rows(z, (m, m)),
            col + jnp.inf,  # residual before the last step
            col == 0,  # learned mixing still on for this example
            col != 0,  # the last step was a learned one
        )

    def update(self, state, k, z, fz):
        xs, gs, gram, prev_res, learn, last_learned = state
        m = self.memory
        g = fz - z
        res = jnp.linalg.norm(g, axis=1)
        if self.safeguard:
            learn = learn & ~(last_learned & (res >= prev_res))
        slot = (k - 1) % m
        xs, gs, gram, valid = anderson_record(xs, gs, gram, k, z, g)
        alpha = anderson_weights(gram, valid, self.ridge)
        beta = jnp.full_like(res, self.damping)
        use = jnp.zeros_like(learn)
        if self.params is not None:
            order = (slot - jnp.arange(m)) % m  # newest first
            out = _mixer_apply(self.params, mixer_features(gram, valid, alpha, order))
            vf = valid.astype(z.dtype)
            delta_age = jnp.tanh(out[:, :m]) * vf[order]  # bounded corrections
            delta_age = delta_age - vf[order] * jnp.sum(delta_age, 1, keepdims=True) / jnp.sum(vf)
            perm = jax.nn.one_hot(order, m, dtype=alpha.dtype)  # newest-first -> ring slots
            delta = jnp.einsum("ni,ij->nj", delta_age, perm, precision=jax.lax.Precision.HIGHEST)
            use = learn
            if self.learned_steps is not None:
                use = use & (k <= self.learned_steps)
            alpha = jnp.where(use[:, None], alpha + delta, alpha)
            beta_learned = _BETA_MAX * self.damping * jax.nn.sigmoid(out[:, m])
            beta = jnp.where(use, beta_learned, beta)
        z_next = anderson_mix(alpha, xs, gs, beta)
        return z_next, (xs, gs, gram, res, learn, use)


def hyper_loss(f, z0, args, solver: HyperAnderson, *, steps: int) -> jax.Array:
    """Training loss of a hypersolver on a frozen DEQ: mean log relative residual along the path.

    Runs ``solver`` for ``steps`` evaluations as a differentiable scan (jdeq's shared loop with
    ``unrolled=True`` and a residual trace), ignoring ``solver.tol`` (no example stops early),
    and returns the mean over examples and iterations of ``log(rel_residual_k + 1e-8)``, with
    ``rel_residual_k = ||f(z_k) - z_k|| / (||f(z0)|| + 1e-8)`` (each example relative to the size
    of its first evaluation).
    Gradients flow to ``solver.params`` and to ``z0`` (a learned initializer); ``args`` (the
    frozen DEQ) is taken as a constant.

    Args:
      f: the cell ``f(z, args)`` on ``(batch, dim)`` states.
      z0: ``(batch, dim)`` starting states (e.g. a learned initializer's output).
      args: the cell's arguments (stop-gradient inside).
      solver: a :class:`HyperAnderson`.
      steps: evaluations of ``f`` in the unrolled path (static, ``>= 2``).

    Returns:
      A scalar loss.

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> f = lambda z, a: 0.9 * jnp.tanh(z) + a
      >>> loss = lambda p: jdeq.hyper_loss(f, jnp.zeros((4, 8)), jnp.ones((4, 8)),
      ...                                  jdeq.HyperAnderson(params=p), steps=8)
      >>> g = jax.grad(loss)(jdeq.init_mixer(jax.random.key(0)))
    """
    V.instance(solver, "solver", HyperAnderson, "a jdeq.HyperAnderson")
    V.integer(steps, "steps", 2)
    if jnp.ndim(z0) != 2:
        raise ValueError(f"`z0` must be a (batch, dim) array, got shape {jnp.shape(z0)}.")
    args = jax.lax.stop_gradient(args)
    train = dataclasses.replace(solver, tol=1e-30, stop_mode="abs", trace=True)
    _, stats = train.solve(lambda z: f(z, args), z0, int(steps), unrolled=True)
    # (batch, steps) abs residuals, relative to the size of f(z0) (a constant per example)
    scale = jax.lax.stop_gradient(jnp.linalg.norm(f(z0, args), axis=1, keepdims=True)) + REL_EPS
    ok = jnp.isfinite(stats.trace)  # NaN once an example left the scan (frozen by the loop)
    log_res = jnp.log(jnp.where(ok, stats.trace, 1.0) / scale + 1e-8)
    # It leaves by going non-finite (charged _DIVERGED per iteration) or, below tol=1e-30, by
    # reaching an exact fixed point (e.g. f(z0) = z0): its residual stays 0, log(0 + 1e-8).
    after = jnp.where(stats.nonfinite[:, None], _DIVERGED, jnp.log(1e-8))
    return jnp.mean(jnp.where(ok, log_res, after))
