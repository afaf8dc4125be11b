"""``HyperSolver``: a learned initializer and learned Anderson mixing for a frozen nnx DEQ.

Bai, Koltun & Kolter (ICLR 2022) attach a tiny "neural solver" to a trained DEQ: an initializer
that guesses ``z0`` from the input, and a network that picks Anderson's mixing weights. Both are
trained on the frozen DEQ (its weights never change) to reach the fixed point in fewer
evaluations of the cell. This module holds the nnx side: the initializer MLP, the mixer's
parameters (the solver itself is the pure :class:`jdeq.HyperAnderson`), training
(:meth:`HyperSolver.fit`), a measured fallback (:meth:`HyperSolver.calibrate`) and inference
(:meth:`HyperSolver.solve`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jdeq import _validate as V
from jdeq._fixed_point import fixed_point
from jdeq._gradients import Implicit
from jdeq._hypersolver import HyperAnderson, hyper_loss, init_mixer
from jdeq._solvers import Anderson

__all__ = ["HyperSolver"]


class MixerParam(nnx.Param):
    """Parameters of the learned Anderson mixer (a plain nnx Param subtype, for filtering)."""


def _cell_fn(deq):
    """``(f, cell_state)`` with ``f(z, (cell_state, x)) == deq.cell(z, x)``."""
    graphdef, state = nnx.split(deq.cell)
    return (lambda z, args: nnx.merge(graphdef, args[0])(z, args[1])), state


class HyperSolver(nnx.Module):
    """Learned ``z0`` and learned Anderson mixing for a trained (frozen) ``jdeq.nnx.DEQ``.

    * ``init_z(x)``: a two-layer MLP ``x -> z0`` (last layer zero-initialized: it starts at the
      DEQ's usual ``z0 = 0``), trained to regress ``z*`` and to lower the residuals along the path.
    * the mixer: parameters of :class:`jdeq.HyperAnderson` (starts as plain Anderson).
    * fallback: :meth:`calibrate` keeps each learned part only if it lowers the mean number of
      evaluations to reach ``tol`` on held-out inputs; on top of that, the solver falls back to
      plain Anderson per example after a learned step that did not lower the residual.

    The DEQ's state must be a ``(batch, features)`` array (e.g. :class:`jdeq.models.MLPCell`),
    its input ``x`` a ``(batch, in_features)`` array.

    Args:
      in_features: size of ``x``'s last axis.
      features: size of the DEQ state.
      hidden: initializer hidden width.
      memory: Anderson memory of the learned solver.
      mixer_hidden: mixer hidden width.
      rngs: ``nnx.Rngs``.

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(3, 16, w_scale=0.9, rngs=nnx.Rngs(0)))
      >>> hyper = jdeq.models.HyperSolver(3, 16, rngs=nnx.Rngs(1))
      >>> x = jax.random.normal(jax.random.key(0), (64, 3))
      >>> losses = hyper.fit(deq, x, steps=20, batch_size=32)
      >>> z, stats = hyper.solve(deq, x[:8], tol=1e-4)

    Reference: Bai, Koltun & Kolter, "Neural Deep Equilibrium Solvers", ICLR 2022.
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        hidden: int = 64,
        memory: int = 5,
        mixer_hidden: int = 32,
        rngs: nnx.Rngs,
    ):
        for name, v in (("in_features", in_features), ("features", features), ("hidden", hidden),
                        ("memory", memory), ("mixer_hidden", mixer_hidden)):
            V.positive_int(v, name)
        self.features = features
        self.memory = memory
        self.hidden = nnx.Linear(in_features, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, features, kernel_init=nnx.initializers.zeros, rngs=rngs)
        self.mixer = nnx.data(
            jax.tree_util.tree_map(MixerParam, init_mixer(rngs.params(), memory, mixer_hidden))
        )
        self.use_init = True
        self.use_mixer = True

    def init_z(self, x):
        """The learned starting state ``(batch, features)`` (zeros if switched off)."""
        if not self.use_init:
            return jnp.zeros((x.shape[0], self.features), x.dtype)
        return self.out(jnp.tanh(self.hidden(x)))

    def mixer_params(self):
        return jax.tree_util.tree_map(lambda p: p[...], self.mixer, is_leaf=lambda v: isinstance(v, nnx.Variable))

    def solver(self, *, tol: float = 1e-4, maxiter: int = 50, **options) -> HyperAnderson:
        """The learned solver (plain Anderson if the mixer was switched off by calibration)."""
        params = self.mixer_params() if self.use_mixer else None
        return HyperAnderson(params=params, tol=tol, maxiter=maxiter, memory=self.memory, **options)

    def solve(self, deq, x, *, tol: float = 1e-4, maxiter: int = 50, gradient=None):
        """Solves ``deq``'s fixed point for input ``x`` with the learned initializer and solver.

        Args:
          deq: the ``jdeq.nnx.DEQ`` the hypersolver was trained on.
          x: ``(batch, in_features)`` input.
          tol, maxiter: stopping rule (``deq.solver``'s ``stop_mode``).
          gradient: gradient mode (default ``jdeq.Implicit(solver=jdeq.Anderson(...))``, so the
            backward pass never uses the mixer, which was trained on the forward problem).

        Returns:
          ``(z_star, stats)`` as ``deq(x)`` returns.
        """
        if gradient is None:
            gradient = Implicit(solver=Anderson(tol=tol, maxiter=maxiter))
        stop_mode = getattr(deq.solver, "stop_mode", "rel")
        # the DEQ layer itself, with this call's solver and start (no second solve path)
        return deq(
            x,
            jax.lax.stop_gradient(self.init_z(x)),
            solver=self.solver(tol=tol, maxiter=maxiter, stop_mode=stop_mode),
            gradient=gradient,
        )

    def fit(
        self,
        deq,
        x,
        *,
        steps: int = 200,
        batch_size: int = 64,
        unroll: int = 12,
        learning_rate: float = 3e-3,
        init_weight: float = 1.0,
        key=None,
    ) -> list[float]:
        """Trains the initializer and the mixer on the frozen ``deq`` (its weights never change).

        Loss per batch: ``jdeq.hyper_loss`` (mean log relative residual along an unrolled path of
        ``unroll`` evaluations, from the learned ``z0``) plus ``init_weight`` times the
        initializer's relative regression error ``||z0 - z*||^2 / ||z*||^2``, with ``z*`` from a
        tight plain-Anderson solve of the frozen DEQ.

        Args:
          deq: a trained ``jdeq.nnx.DEQ``.
          x: ``(n, in_features)`` training inputs (the DEQ's injections).
          steps: optimizer steps (Adam).
          batch_size: examples per step (sampled with replacement).
          unroll: length of the differentiated solver path.
          learning_rate: Adam's learning rate.
          init_weight: weight of the regression term.
          key: PRNG key for batch sampling (default ``jax.random.key(0)``).

        Returns:
          The loss of every step (a list of floats).
        """
        f, cell_state = _cell_fn(deq)
        n = x.shape[0]
        key = jax.random.key(0) if key is None else key
        opt = nnx.Optimizer(self, optax.adam(learning_rate), wrt=nnx.Param)
        memory = self.memory

        @nnx.jit
        def step(hyper, opt, cell_state, xb):
            args = jax.lax.stop_gradient((cell_state, xb))  # the DEQ is frozen
            z_star = fixed_point(f, jnp.zeros((xb.shape[0], hyper.features), xb.dtype), args,
                                 solver=Anderson(tol=1e-6, maxiter=100)).value
            z_star = jax.lax.stop_gradient(z_star)

            def loss_fn(hyper):
                z0 = hyper.out(jnp.tanh(hyper.hidden(xb)))
                solver = HyperAnderson(params=hyper.mixer_params(), memory=memory)
                path = hyper_loss(f, z0, args, solver, steps=unroll)
                reg = jnp.mean(jnp.sum((z0 - z_star) ** 2, 1) / (jnp.sum(z_star**2, 1) + 1e-8))
                return path + init_weight * reg

            loss, grads = nnx.value_and_grad(loss_fn)(hyper)
            opt.update(hyper, grads)
            return loss

        losses = []
        for i in range(int(steps)):
            idx = jax.random.randint(jax.random.fold_in(key, i), (min(batch_size, n),), 0, n)
            losses.append(float(step(self, opt, cell_state, x[idx])))
        return losses

    def calibrate(
        self,
        deq,
        x,
        *,
        tol: float = 1e-4,
        maxiter: int = 50,
        criterion: str = "nfe",
        repeats: int = 5,
    ) -> dict[str, float]:
        """Keeps each learned part only where it pays off on ``x`` (held-out inputs).

        Measures the four combinations (initializer on/off, mixer on/off) and keeps the cheapest
        (ties go to the simpler one, plain Anderson first). Sets ``use_init`` and ``use_mixer``.

        Args:
          deq: the frozen DEQ.
          x: held-out inputs (one batch).
          tol, maxiter: the stopping rule to calibrate for.
          criterion: ``"nfe"`` (default): mean evaluations of the cell per example, exact and
            machine-independent; ``"time"``: median wall time of a jitted solve of ``x`` over
            ``repeats`` interleaved runs, which also charges the mixer's own cost per iteration
            (large relative to a tiny cell, negligible for a big one).
          repeats: timing repeats for ``criterion="time"``.

        Returns:
          ``{"anderson": v, "init": v, "mixer": v, "init+mixer": v}`` (NFE or seconds).
        """
        V.one_of(criterion, "criterion", ("nfe", "time"))
        V.positive_int(repeats, "repeats")
        combos = {"anderson": (False, False), "init": (True, False), "mixer": (False, True),
                  "init+mixer": (True, True)}
        if criterion == "time":
            results = self._time_combos(deq, x, combos, tol, maxiter, repeats)
        else:
            results = self._nfe_combos(deq, x, combos, tol, maxiter)
        best = min(combos, key=lambda k: (results[k], list(combos).index(k)))
        self.use_init, self.use_mixer = combos[best]
        return results

    def _time_combos(self, deq, x, combos, tol, maxiter, repeats):
        runs = {}
        for name, (ui, um) in combos.items():
            self.use_init, self.use_mixer = ui, um
            graphdef, state = nnx.split((self, deq))

            def run(state, x, graphdef=graphdef):
                hyper, deq = nnx.merge(graphdef, state)
                return hyper.solve(deq, x, tol=tol, maxiter=maxiter)[1].nsteps

            run = jax.jit(run)
            jax.block_until_ready(run(state, x))  # compile
            runs[name] = (run, state)
        times = {name: [] for name in combos}
        for _ in range(int(repeats)):
            for name, (run, state) in runs.items():
                t = time.perf_counter()
                jax.block_until_ready(run(state, x))
                times[name].append(time.perf_counter() - t)
        return {name: float(sorted(ts)[len(ts) // 2]) for name, ts in times.items()}

    def _nfe_combos(self, deq, x, combos, tol, maxiter):
        f, cell_state = _cell_fn(deq)
        graphdef, hyper_state = nnx.split(self)
        memory, stop_mode = self.memory, getattr(deq.solver, "stop_mode", "rel")

        @jax.jit
        def mean_nfe(cell_state, hyper_state, x, init_on, mixer_on):
            # one program for all four combinations: "off" is a zero z0 / a zero mixer output
            # layer, which is exactly plain Anderson (see jdeq.HyperAnderson)
            hyper = nnx.merge(graphdef, hyper_state)
            z0 = jnp.where(init_on, hyper.out(jnp.tanh(hyper.hidden(x))), 0.0)
            params = hyper.mixer_params()
            params = {**params, "w2": params["w2"] * mixer_on, "b2": params["b2"] * mixer_on}
            solver = HyperAnderson(params=params, tol=tol, maxiter=maxiter, memory=memory,
                                   stop_mode=stop_mode)
            stats = fixed_point(f, z0, (cell_state, x), solver=solver).stats
            return jnp.mean(stats.nsteps.astype(jnp.float32))

        return {
            name: float(mean_nfe(cell_state, hyper_state, x, jnp.asarray(ui), jnp.asarray(float(um))))
            for name, (ui, um) in combos.items()
        }
