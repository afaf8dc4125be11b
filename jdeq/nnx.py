"""Flax NNX adapters: ``jdeq.nnx.DEQ`` and ``jdeq.nnx.Unrolled``.

They only turn the cell (an ``nnx.Module`` called as ``cell(z, x)``) into a pure function
``f(z, (state, x))`` whose parameters travel as explicit arguments, then call the core.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdeq import _validate as V
from jdeq._cells import guard_nonfinite_inputs, initial_state, mask_bad_examples
from jdeq._fixed_point import check_depth, check_options, fixed_point, unroll
from jdeq._gradients import Implicit
from jdeq._hypersolver import hyper_loss
from jdeq._regularizers import jacobian_penalty
from jdeq._solvers import Anderson, check_maxiter
from jdeq._stats import Solution
from jdeq._warm_start import check_index, lookup, store

__all__ = ["DEQ", "CachedFixedPoint", "FixedPointCache", "SolverParam", "Unrolled"]


class SolverParam(nnx.Param):
    """The arrays of a solver or gradient config held by a :class:`DEQ` (e.g. the mixer of
    ``jdeq.HyperAnderson``): ordinary trainable parameters, of their own type for filtering
    (``nnx.Optimizer(deq, tx, wrt=jdeq.nnx.SolverParam)``). Trained by :meth:`DEQ.solver_loss`
    (``jdeq.hyper_loss``) or through ``gradient=jdeq.Unrolled()``; the layer's ``Implicit``,
    ``Phantom`` and ``JacobianFree`` gradients give them zero."""


def _check_cell(cell) -> None:
    if not isinstance(cell, nnx.Module):
        raise TypeError(f"`cell` must be an nnx.Module called as cell(z, x), got {cell!r}.")


def _pure(cell: nnx.Module):
    """``(f, state)`` with ``f(z, (state, x)) == cell(z, x)``; the state is an explicit argument."""
    graphdef, state = nnx.split(cell)

    def f(z, args):
        state, x = args
        return nnx.merge(graphdef, state)(z, x)

    return f, state


def _split_config(config):
    """A solver/gradient config as ``(nnx.List of SolverParam, treedef)``: its arrays become
    module state (trained, checkpointed, sharded like any parameter), the rest stays static."""
    leaves, treedef = jax.tree_util.tree_flatten(config)
    return nnx.List([SolverParam(leaf) for leaf in leaves]), treedef


def _merge_config(params, treedef):
    return jax.tree_util.tree_unflatten(treedef, [p[...] for p in params])


def record_equilibrium(layer: nnx.Module, x, z_star) -> None:
    """Appends ``(x, z*)`` to ``layer.equilibria``, an ``nnx.Intermediate`` holding a tuple (what
    ``Module.sow`` stores; written directly, since ``sow`` outside ``nnx.capture`` is deprecated
    in recent Flax)."""
    previous = getattr(layer, "equilibria", None)
    records = tuple(previous.get_value()) if previous is not None else ()
    layer.equilibria = nnx.Intermediate(records + ((x, z_star),))


class CachedFixedPoint(nnx.Variable):
    """The state of a :class:`FixedPointCache` (stored fixed points and their ``filled`` mask):
    not an ``nnx.Param``, so never trained; its own type, so a training step can return it
    updated (``jdeq.train.make_train_step`` does) and a checkpoint can hold it (``fit`` does)."""


class FixedPointCache(nnx.Module):
    """A per-example store of fixed points, to warm-start each example's solve from its ``z*``
    at an earlier step (amortized solves, Huang, Bai & Kolter 2021, "(Implicit)^2").

    Give it to a :class:`DEQ` (``DEQ(cell, cache=FixedPointCache(n, shape))``) and call the DEQ
    with the batch's example indices (``deq(x, index=idx)``): each example starts from its
    cached ``z*`` if it has one (else from ``z0``/``cell.init_z(x)``), and its new ``z*`` is
    written back. Use it when inputs recur with a known index: implicit representations (the
    same coordinates every epoch) or epoch-based training (``fit``: put the example indices in
    the data as ``data["index"] = np.arange(n)`` and pass ``batch["index"]`` to the model in the
    loss function).

    What it changes: only where the forward solve starts. When the fixed point is unique (a
    contractive cell) the solve converges to the same ``z*`` up to the solver's ``tol`` in
    fewer evaluations; the gradient of ``Implicit``/``Phantom``/``JacobianFree`` is taken at
    that ``z*`` and does not depend on the start (no gradient flows through the cached value).
    ``Unrolled`` differentiates the iterations actually taken, which are fewer. A cell with
    several fixed points may land on another one than a cold start would.

    The cache is ``CachedFixedPoint`` state: it is updated by the call (so under ``jax.jit``,
    return it from the jitted function, as ``jdeq.train.make_train_step`` does), replicated on
    every device by ``fit(..., mesh=...)`` (gathers and scatters by index work on a sharded
    batch) and saved with ``fit``'s checkpoints (resume equals an uninterrupted run, cache
    included). Memory: ``num_examples`` times one example's state, on every device.

    Args:
      num_examples: the number of distinct examples (indices run over ``[0, num_examples)``).
      shape: one example's state: a tuple of ints (one array of that shape), or an array /
        ``jax.ShapeDtypeStruct`` / pytree of them (their shapes without the batch axis).
      dtype: dtype of the stored states for a tuple ``shape`` (default float32; a pytree
        ``shape`` keeps its leaves' dtypes).

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> cell = jdeq.models.MLPCell(3, 16, rngs=nnx.Rngs(0))
      >>> deq = jdeq.nnx.DEQ(cell, cache=jdeq.nnx.FixedPointCache(100, (16,)))
      >>> x, idx = jnp.ones((4, 3)), jnp.array([0, 1, 2, 3])
      >>> z, cold = deq(x, index=idx)           # empty cache: starts from cell.init_z(x)
      >>> z, warm = deq(x, index=idx)           # starts from the stored z*
      >>> bool((warm.nsteps < cold.nsteps).all())
      True
    """

    def __init__(self, num_examples: int, shape, *, dtype=None):
        V.positive_int(num_examples, "num_examples")
        if isinstance(shape, tuple) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            if any(d < 0 for d in shape):
                raise ValueError(f"`shape` must be a tuple of ints >= 0, got {shape!r}.")
            template = jax.ShapeDtypeStruct(shape, jnp.dtype(jnp.float32 if dtype is None else dtype))
        else:
            template = shape
        leaves, treedef = jax.tree_util.tree_flatten(template)
        if not leaves or not all(hasattr(leaf, "shape") and hasattr(leaf, "dtype") for leaf in leaves):
            raise TypeError(
                "`shape` must be a tuple of ints or an array/jax.ShapeDtypeStruct (or a pytree of them) "
                f"giving one example's state, got {shape!r}."
            )
        self.num_examples = num_examples
        self._treedef = treedef
        self.values = nnx.List([CachedFixedPoint(jnp.zeros((num_examples, *leaf.shape), leaf.dtype))
                                for leaf in leaves])
        self.filled = CachedFixedPoint(jnp.zeros((num_examples,), bool))

    def _tree(self):
        return jax.tree_util.tree_unflatten(self._treedef, [v.get_value() for v in self.values])

    def check(self, z0, index, *, name: str = "cache") -> None:
        """Raises a clear error unless ``index`` is ``(batch,)`` ints in range and one example
        of ``z0`` (leaves ``(batch, ...)``) has the stored states' structure and shapes."""
        want = [leaf.shape[1:] for leaf in jax.tree_util.tree_leaves(self._tree())]
        got_tree = jax.tree_util.tree_structure(z0)
        got = [jnp.shape(leaf)[1:] for leaf in jax.tree_util.tree_leaves(z0)]
        if got_tree != self._treedef or got != want:
            raise ValueError(
                f"`{name}` stores states of shape {want[0] if len(want) == 1 else want} per example, but the "
                f"solve's state has {got[0] if len(got) == 1 else got} per example: build the "
                "FixedPointCache with the shape of one example's z (without the batch axis)."
            )
        batch = jnp.shape(jax.tree_util.tree_leaves(z0)[0])[0]
        check_index(index, self.num_examples, batch)

    def lookup(self, index, default):
        """Each example's stored ``z*`` where it has one, else its row of ``default`` (no
        gradient through the result); see ``jdeq._warm_start.lookup``."""
        self.check(default, index)
        return lookup(self._tree(), self.filled.get_value(), index, default)

    def update(self, index, z, ok=None) -> None:
        """Writes the batch's fixed points ``z`` at ``index`` (rows with ``ok`` False are left
        as they were; the indices of one batch must be distinct)."""
        self.check(z, index)
        values, filled = store(self._tree(), self.filled.get_value(), index, z, ok)
        for variable, value in zip(self.values, jax.tree_util.tree_leaves(values)):
            variable.set_value(value)
        self.filled.set_value(filled)

    def fraction_filled(self):
        """The fraction of examples that have a stored fixed point (a scalar array)."""
        return jnp.mean(self.filled.get_value().astype(jnp.float32))


def _batch_of(z0, batched: bool) -> int | None:
    return jax.tree_util.tree_leaves(z0)[0].shape[0] if batched else None


def _unroll_layer(f, z0, args, depth: int, batched: bool):
    """``jdeq.unroll`` of the layer's pure cell; one example (``batched=False``) runs as a batch
    of one, its value and stats squeezed back."""
    if batched:
        return unroll(f, z0, args, depth=depth)
    add, drop = (lambda t: jax.tree.map(lambda v: v[None], t)), (lambda t: jax.tree.map(lambda v: v[0], t))
    sol = unroll(lambda z, a: add(f(drop(z), a)), add(z0), args, depth=depth)
    return Solution(value=drop(sol.value), stats=drop(sol.stats))


class DEQ(nnx.Module):
    """A deep equilibrium layer: returns ``z* = cell(z*, x)`` and the solver's stats.

    The cell is stateless inside the solve: normalization must not keep running statistics
    (use ``nnx.LayerNorm``/``nnx.GroupNorm``) and dropout masks must be drawn once outside the
    loop and passed in through ``x``.

    Args:
      cell: an ``nnx.Module`` called as ``cell(z, x)``; with ``init_z(x)`` when ``z0`` is None.
      solver: a :class:`jdeq.Solver` (default ``jdeq.Anderson()``). Its arrays (e.g. a learned
        ``jdeq.HyperAnderson``'s mixer) become :class:`SolverParam` state of this layer.
      gradient: a :class:`jdeq.Gradient` (default ``jdeq.Implicit()``); arrays as for ``solver``.
      throw: raise at run time when a solve does not converge (see ``jdeq.fixed_point``).
      batched: ``x`` and the state carry a leading batch axis (default). ``False``: one example
        per call, for per-example code under ``nnx.vmap``/``jax.vmap`` (see ``jdeq.fixed_point``).
      eval_maxiter: budget used in evaluation mode (after ``model.eval()``, which sets
        ``deterministic=True``) when the call gives no ``maxiter``; None: the solver's.
      cache: a :class:`FixedPointCache` to warm-start each example from its fixed point at an
        earlier call (used by calls that pass ``index=``; see :class:`FixedPointCache` for what
        it changes: the starting point of the forward solve only). None: no cache.

    Call: ``z_star, stats = deq(x, z0=None, *, maxiter=None, solver=None, gradient=None,
    throw=None, batched=None, index=None)``; every keyword overrides the layer's setting for
    this call only (``maxiter`` may be a traced int: new budgets do not recompile). ``index``
    (``(batch,)`` ints, the examples' indices in ``[0, cache.num_examples)``, distinct within a
    batch) starts each example from its cached ``z*`` where it has one (else from ``z0``) and
    stores the new ``z*`` (finite examples only); it needs ``cache`` and ``batched=True``.

    Non-finite inputs: an example whose ``x`` holds NaN/inf is solved on a zeroed input and
    reported as non-finite (``stats.nonfinite``, value ``z0``, zero gradient), so it cannot turn
    the shared weights' gradient into NaN.

    Attributes:
      unrolled_depth: None (default), or an int ``L``: the layer then runs as the weight-tied net
        of depth ``L``, the cell applied exactly ``L`` times from ``z0`` and backpropagated
        through (``jdeq.unroll``, as :class:`Unrolled`), in place of the solve; the call's
        ``solver``, ``gradient`` and ``maxiter`` do not apply then. This is the unrolled
        pre-training of Bai et al. 2020 (MDEQ); ``jdeq.train.fit(...,
        pretrain=jdeq.train.Pretrain(steps=N, depth=L))`` sets it for the first ``N`` steps.
      record_equilibria: when True (e.g. ``model.set_attributes(record_equilibria=True)``), each
        call sows ``(x, z*)`` into ``nnx.Intermediate`` ``"equilibria"``;
        ``jdeq.train.fit(..., jac_reg=...)`` uses it with :meth:`jacobian_penalty`.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> cell = jdeq.models.MLPCell(3, 16, rngs=nnx.Rngs(0))
      >>> deq = jdeq.nnx.DEQ(cell, solver=jdeq.Anderson(tol=1e-5))
      >>> z, stats = deq(jnp.ones((4, 3)))
      >>> z8, _ = deq(jnp.ones((4, 3)), maxiter=8, solver=jdeq.FixedPointIteration())
    """

    def __init__(
        self,
        cell: nnx.Module,
        *,
        solver=Anderson(),
        gradient=Implicit(),
        throw: bool = False,
        batched: bool = True,
        eval_maxiter: int | None = None,
        cache: FixedPointCache | None = None,
    ):
        _check_cell(cell)
        if cache is not None and not isinstance(cache, FixedPointCache):
            raise TypeError(f"`cache` must be None or a jdeq.nnx.FixedPointCache, got {type(cache).__name__}.")
        check_options(solver, gradient, throw, batched)
        if eval_maxiter is not None:
            check_maxiter(eval_maxiter, name="eval_maxiter")
        self.cell = cell
        self.solver_params, self._solver_def = _split_config(solver)
        self.gradient_params, self._gradient_def = _split_config(gradient)
        self.throw = throw
        self.batched = batched
        self.eval_maxiter = eval_maxiter
        self.deterministic = False
        self.record_equilibria = False
        self.unrolled_depth = None
        if cache is not None:  # (no attribute at all without one: the graph stays as it was)
            self.cache = cache

    @property
    def solver(self):
        """The forward solver (rebuilt from the layer's :class:`SolverParam` state)."""
        return _merge_config(self.solver_params, self._solver_def)

    @property
    def gradient(self):
        """The gradient mode (rebuilt from the layer's state)."""
        return _merge_config(self.gradient_params, self._gradient_def)

    def __call__(
        self, x, z0=None, *, maxiter=None, solver=None, gradient=None, throw=None, batched=None, index=None
    ) -> tuple[Any, Any]:
        solver = self.solver if solver is None else solver
        gradient = self.gradient if gradient is None else gradient
        throw = self.throw if throw is None else throw
        batched = self.batched if batched is None else batched
        check_options(solver, gradient, throw, batched)
        if maxiter is None and self.deterministic and self.eval_maxiter is not None:
            maxiter = self.eval_maxiter
        cache = getattr(self, "cache", None)
        if index is not None:
            if cache is None:
                raise ValueError("`index` warm-starts from a cache: build the DEQ with "
                                 "`cache=jdeq.nnx.FixedPointCache(num_examples, shape)`.")
            if not batched:
                raise ValueError("`index` needs `batched=True` (a batch of examples per call): under vmap of "
                                 "per-example code, call `cache.lookup`/`cache.update` outside the vmap.")
        z0 = initial_state(self.cell, x, z0)
        if index is not None:
            z0 = cache.lookup(index, z0)
        f, state = _pure(self.cell)
        x_safe, bad = guard_nonfinite_inputs(x, _batch_of(z0, batched))
        depth = self.unrolled_depth
        if depth is not None:
            V.positive_int(depth, "unrolled_depth")
            sol = _unroll_layer(f, z0, (state, x_safe), depth, batched)
        else:
            sol = fixed_point(
                f, z0, (state, x_safe), solver=solver, gradient=gradient, maxiter=maxiter,
                throw=throw, batched=batched,
            )
        sol = mask_bad_examples(sol, z0, bad)
        if index is not None:
            cache.update(index, sol.value, ~sol.stats.nonfinite)
        if self.record_equilibria:
            record_equilibrium(self, x_safe, sol.value)
        return sol.value, sol.stats

    def jacobian_penalty(
        self, x, z_star, key, *, gamma: float, prob: float = 1.0, num_samples: int = 1, noise: str = "normal"
    ) -> jax.Array:
        """``gamma * mean_b ||d cell(z, x)/dz||_F^2 / dim`` at ``z_star`` (Bai et al. 2021).

        Calls ``jdeq.jacobian_penalty`` on this cell's pure function; ``z_star`` is taken
        through ``stop_gradient`` (the gradient reaches the cell's parameters and ``x``, not the
        solver).

        Args:
          x: the cell's input (as passed to the DEQ).
          z_star: the equilibrium returned by the DEQ for ``x``.
          key: PRNG key (coin flip and Hutchinson probes).
          gamma, prob, num_samples, noise: as in ``jdeq.jacobian_penalty``.

        Returns:
          A scalar to add to the loss.

        Example:
          >>> import jax, jax.numpy as jnp, jdeq
          >>> from flax import nnx
          >>> deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(3, 16, rngs=nnx.Rngs(0)))
          >>> x = jnp.ones((4, 3))
          >>> z, _ = deq(x)
          >>> reg = deq.jacobian_penalty(x, z, jax.random.key(0), gamma=0.1)
        """
        f, state = _pure(self.cell)
        return jacobian_penalty(
            f, jax.lax.stop_gradient(z_star), (state, x), key,
            gamma=gamma, prob=prob, num_samples=num_samples, noise=noise,
        )

    def solver_loss(self, x, *, steps: int, z0=None) -> jax.Array:
        """The training loss of a learned solver held by this layer (``jdeq.hyper_loss``: mean
        log relative residual along ``steps`` differentiable iterations), with the cell frozen.
        Differentiate it with respect to :class:`SolverParam` to train the solver in place.

        Args:
          x: ``(batch, ...)`` inputs; z0: starting states (default ``cell.init_z(x)``).
          steps: iterations of the unrolled path (static, ``>= 2``).

        Returns:
          A scalar.

        Example:
          >>> import jax, jax.numpy as jnp, jdeq
          >>> from flax import nnx
          >>> solver = jdeq.HyperAnderson(params=jdeq.init_mixer(jax.random.key(0)))
          >>> deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(3, 16, rngs=nnx.Rngs(0)), solver=solver)
          >>> grads = nnx.grad(lambda d: d.solver_loss(jnp.ones((4, 3)), steps=6),
          ...                  argnums=nnx.DiffState(0, jdeq.nnx.SolverParam))(deq)
        """
        z0 = initial_state(self.cell, x, z0)
        f, state = _pure(self.cell)
        return hyper_loss(f, z0, (state, x), self.solver, steps=steps)


class Unrolled(nnx.Module):
    """The explicit weight-tied baseline: ``depth`` applications of the same cell.

    Same call signature and stats type as :class:`DEQ` (see ``jdeq.unroll`` for the stats), so
    a benchmark swaps one for the other and changes nothing else.

    Args:
      cell: an ``nnx.Module`` called as ``cell(z, x)``.
      depth: number of layers (static).
      remat: recompute each layer in the backward pass instead of storing its activations.

    Call: ``z, stats = net(x, z0=None, *, depth=None, remat=None)``; the keywords override the
    layer's settings for this call (static: a new depth compiles anew).

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> net = jdeq.nnx.Unrolled(jdeq.models.MLPCell(3, 16, rngs=nnx.Rngs(0)), depth=8)
      >>> z, stats = net(jnp.ones((4, 3)))
      >>> z12, _ = net(jnp.ones((4, 3)), depth=12)
    """

    def __init__(self, cell: nnx.Module, *, depth: int, remat: bool = False):
        _check_cell(cell)
        check_depth(depth)
        self.cell = cell
        self.depth = depth
        self.remat = remat

    def __call__(self, x, z0=None, *, depth=None, remat=None) -> tuple[Any, Any]:
        depth = self.depth if depth is None else depth
        remat = self.remat if remat is None else remat
        check_depth(depth)
        z0 = initial_state(self.cell, x, z0)
        f, state = _pure(self.cell)
        sol = unroll(f, z0, (state, x), depth=depth, remat=remat)
        return sol.value, sol.stats
