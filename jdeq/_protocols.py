"""The open protocols of jdeq: the public base classes ``Solver`` and ``Gradient``.

Both are frozen dataclasses registered as JAX pytrees (``Pytree``): options are static fields,
arrays declared with :func:`leaf_field` are leaves, so a config crosses ``jit``/``vmap``/``grad``
and can carry trainable weights. A user's subclass works everywhere a built-in does.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

from jdeq import _validate as V
from jdeq._flatten import batch_layout
from jdeq._loop import run_loop, solve_rows
from jdeq._stats import Solution

__all__ = ["Gradient", "Pytree", "Solver", "check_maxiter", "leaf_field"]

def check_maxiter(maxiter, *, name: str = "maxiter") -> None:
    """Raises unless ``maxiter`` is an int >= 1 or an integer scalar array; a traced value is
    checked for its dtype and shape only (its value is unknown). The rule is
    :func:`jdeq._validate.budget`."""
    V.budget(maxiter, name)


# Checks of the options that only some solvers have: name -> the rule.
_OPTION_CHECKS = {
    "damping": lambda v: V.number(v, "damping", 0, 1, lo_open=True),
    "memory": lambda v: V.positive_int(v, "memory"),
    "ridge": lambda v: V.nonnegative_number(v, "ridge"),
}


def leaf_field(**kwargs):
    """A solver or gradient option that holds arrays (a pytree leaf, e.g. learned weights), not
    a static setting: ``params: Any = jdeq.leaf_field(default=None)``."""
    metadata = dict(kwargs.pop("metadata", {}), leaf=True)
    return dataclasses.field(metadata=metadata, **kwargs)


class Pytree:
    """Makes every subclass a JAX pytree whose children are its ``leaf_field`` dataclass fields
    and whose static part is all other fields (so a config can cross ``jit``/``vmap``/``grad``
    and carry trainable arrays). Subclasses are frozen dataclasses; unflattening skips
    ``__post_init__`` (children may be tracers or placeholders)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # (JAX derives the plain flatten from this one by dropping the keys)
        jax.tree_util.register_pytree_with_keys(cls, cls._tree_flatten_with_keys, cls._tree_unflatten)

    def _split_fields(self):
        fields = dataclasses.fields(self) if dataclasses.is_dataclass(self) else ()
        leaves = tuple(f.name for f in fields if f.metadata.get("leaf"))
        static = tuple(f.name for f in fields if f.name not in leaves)
        return leaves, static

    def _tree_flatten_with_keys(self):
        leaves, static = self._split_fields()
        children = [(jax.tree_util.GetAttrKey(n), getattr(self, n)) for n in leaves]
        return children, (leaves, tuple((n, getattr(self, n)) for n in static))

    @classmethod
    def _tree_unflatten(cls, aux, children):
        leaves, static = aux
        obj = object.__new__(cls)
        for name, value in list(zip(leaves, children)) + list(static):
            object.__setattr__(obj, name, value)
        return obj


@dataclasses.dataclass(frozen=True, kw_only=True)
class Solver(Pytree):
    """Base class of jdeq's forward solvers: subclass it to plug in your own iteration.

    A solver is a frozen dataclass (a pytree: options are static fields, arrays declared with
    :func:`jdeq.leaf_field` are leaves) with two methods on ``(batch, dim)`` matrices, one row
    per example, run inside jdeq's shared per-example loop (residuals, freezing of converged
    examples, lowest-residual iterate, budgets, ``jax.vmap`` and sharding support):

    * ``init(z) -> state``: any pytree of arrays whose leading axis is the batch;
    * ``update(state, k, z, fz) -> (z_next, state)``: ``k`` is the number of evaluations of
      ``f`` so far (>= 1), ``fz = f(z)``.

    A subclass works everywhere a built-in does: :func:`jdeq.fixed_point`, both Flax layers,
    ``jdeq.Implicit(solver=...)``'s backward solve, ``jdeq.fixed_point_states`` and the
    regularizers. Override :meth:`solve` only to replace the loop itself (as
    ``jdeq.JaxoptSolver`` does).

    Args:
      tol: stop an example once its residual (see ``stop_mode``) is below ``tol``.
      maxiter: budget of evaluations of ``f`` (the first one, at ``z0``, counts).
      stop_mode: ``"rel"`` (default, scale-free) tests ``||f(z)-z|| / ||f(z)||``; ``"abs"``
        tests ``||f(z)-z||``.
      trace: record every iteration's residual in ``SolverStats.trace``.
      stop_fraction: in (0, 1]. 1 (default) is the per-example contract: the batch runs until
        every example has met ``tol`` (or gone non-finite) or the budget is spent. Below 1, the
        whole batch stops as soon as that fraction of its examples has stopped; the others
        are returned as they are, reported ``converged=False`` with their true residuals (a
        cut of the slowest examples' tail, for speed). The fraction counts the rows of one
        solve: the batch, or all mapped examples of per-example code under ``jax.vmap``. An
        ``Implicit`` backward solve run by this solver uses the same rule.

    Example:
      >>> import dataclasses, jax.numpy as jnp, jdeq
      >>> @dataclasses.dataclass(frozen=True, kw_only=True)
      ... class HalfStep(jdeq.Solver):
      ...     def init(self, z):
      ...         return ()
      ...     def update(self, state, k, z, fz):
      ...         return 0.5 * (z + fz), state
      >>> sol = jdeq.fixed_point(lambda z, a: 0.5 * jnp.cos(z) + a, jnp.zeros((2, 3)),
      ...                        jnp.ones((2, 3)), solver=HalfStep(tol=1e-6, maxiter=100))
      >>> bool(sol.stats.converged.all())
      True
    """

    tol: float = 1e-4
    maxiter: int = 50
    stop_mode: str = "rel"
    trace: bool = False
    stop_fraction: float = 1.0

    def __post_init__(self):
        V.positive_number(self.tol, "tol")
        V.positive_int(self.maxiter, "maxiter")
        V.stop_mode(self.stop_mode)
        V.boolean(self.trace, "trace")
        V.number(self.stop_fraction, "stop_fraction", 0, 1, lo_open=True)
        for field in dataclasses.fields(self):  # options that only some solvers have
            if field.name in _OPTION_CHECKS:
                _OPTION_CHECKS[field.name](getattr(self, field.name))

    def init(self, z):
        """The solver's state for the ``(batch, dim)`` starting point ``z``."""
        raise NotImplementedError(f"{type(self).__name__} must implement init(z) -> state.")

    def update(self, state, k, z, fz):
        """One step: ``(z_next, state)`` from the current iterate ``z`` and ``fz = f(z)``."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement update(state, k, z, fz) -> (z_next, state)."
        )

    static_budget = False  # True: the loop needs a static budget (maxiter baked into options)

    def inverse_estimate(self, state, b, *, transpose: bool):
        """SHINE (Ramzi et al. 2022): the forward solve's own estimate of ``(I - J)^{-1} b``
        (``transpose=True``: ``(I - J)^{-T} b``), ``J = df/dz`` at the fixed point, from the
        solver's final ``state`` (the loop's, per example; ``b`` is ``(batch, dim)``).

        A solver that learns no such estimate (the default) raises ``NotImplementedError``;
        :attr:`has_inverse_estimate` says which is the case. ``jdeq.Broyden`` and
        ``jdeq.Anderson`` implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} keeps no inverse-Jacobian estimate.")

    @property
    def has_inverse_estimate(self) -> bool:
        """Whether :meth:`inverse_estimate` is implemented (``jdeq.Implicit(shine=...)``)."""
        return type(self).inverse_estimate is not Solver.inverse_estimate

    def backward(self, **overrides):
        """This solver with ``overrides`` (``tol``, ``stop_mode``, ``maxiter``) for the backward
        (adjoint) solve of ``jdeq.Implicit``; the residual trace is switched off."""
        return dataclasses.replace(self, **{"trace": False, **overrides})

    def solve(
        self, F, z0: jax.Array, maxiter=None, *, unrolled: bool = False, snapshots=None, keep_state=False
    ):
        """Solves ``z = F(z)`` row by row in the shared loop (see :func:`jdeq._loop.run_loop`).

        Args:
          F: the map on ``(batch, dim)`` matrices (rows independent).
          z0: ``(batch, dim)`` start.
          maxiter: run-time budget (None: ``self.maxiter``).
          unrolled: differentiate through the iterations (a ``lax.scan``; static ``maxiter``).
          snapshots: optional budgets at which to record the best iterate.
          keep_state: also return the final solver state (each example's at its own last step).

        Returns:
          ``(z, stats)`` (``+ snaps`` with ``snapshots``, ``+ state`` with ``keep_state``).
        """
        maxiter = self.maxiter if maxiter is None else maxiter
        trace_len = None
        if self.trace:
            if not isinstance(maxiter, numbers.Integral):
                raise ValueError(
                    "`trace=True` needs a static `maxiter` (the trace has one column per "
                    "iteration); pass a Python int, not a traced value."
                )
            trace_len = int(maxiter)
        if unrolled:
            return run_loop(
                self, F, z0, maxiter, trace_len=trace_len, unrolled=True, snapshots=snapshots,
                keep_state=keep_state,
            )
        return solve_rows(
            self, F, z0, maxiter, trace_len=trace_len, snapshots=snapshots, keep_state=keep_state
        )



def hoist_closure(f, z, args):
    """``(fn, params)`` with ``fn(z, params) == f(z, args)`` and ``params = (args, consts)``:
    the floating-point tracers ``f`` closes over (weights it captures under ``jax.grad`` or
    ``jax.jit``) become explicit parameters, so that a gradient mode differentiates them as it
    does ``args``, and the forward loop, run on ``stop_gradient(params)``, is never linearized
    with respect to them (reverse mode cannot differentiate a while loop)."""
    f_conv, consts = jax.closure_convert(f, z, args)
    return (lambda z, p: f_conv(z, p[0], *p[1])), (args, tuple(consts))


def with_hoisted_closure(f, z, args):
    """``(f, args)`` as :func:`hoist_closure` makes them if ``f`` closes over any tracer that
    differentiation may perturb, else unchanged (a user's :meth:`Gradient.attach` sees its own
    ``args``)."""
    fn, params = hoist_closure(f, z, args)
    return (fn, params) if params[1] else (f, args)


@dataclasses.dataclass(frozen=True)
class Gradient(Pytree):
    """Base class of gradient modes: how a DEQ's fixed point is differentiated.

    A mode is a frozen dataclass (a pytree, like :class:`jdeq.Solver`). Most modes define the
    gradient at the fixed point and implement one method, :meth:`attach`; the inherited
    :meth:`solve` runs the forward solver without gradient and calls it. A mode that
    differentiates the iterations themselves (``jdeq.Unrolled``) overrides :meth:`solve`
    instead. A subclass works everywhere a built-in does (:func:`jdeq.fixed_point`, both Flax
    layers, ``jdeq.fixed_point_states`` for ``attach``-based modes).

    Example:
      >>> import dataclasses, jax, jax.numpy as jnp, jdeq
      >>> @dataclasses.dataclass(frozen=True)
      ... class OneStep(jdeq.Gradient):  # JFB written by hand: d f(z*, a) / da
      ...     def attach(self, f, z_star, args, *, solver, maxiter, stats):
      ...         z = jax.lax.stop_gradient(z_star)
      ...         return jax.tree.map(lambda a, b: a + b - jax.lax.stop_gradient(b), z, f(z, args))
      >>> f = lambda z, a: 0.5 * jnp.tanh(z) + a
      >>> g = jax.grad(lambda a: jdeq.fixed_point(f, jnp.zeros((2, 3)), a,
      ...              gradient=OneStep()).value.sum())(jnp.ones((2, 3)))
    """

    def solve(self, f, z0, args, *, solver, maxiter=None) -> Solution:
        """The differentiable solve of ``z = f(z, args)`` (batched pytrees, as in
        :func:`jdeq.fixed_point`).

        Args:
          f, z0, args: as in :func:`jdeq.fixed_point` (``z0``'s leaves have a batch axis).
            ``f`` may close over traced weights (``jax.grad`` of a function that builds
            ``f``): they get the gradient they would get as part of ``args``. :meth:`attach`
            then receives them hoisted (:func:`hoist_closure`): ``f`` as ``fn(z, (args,
            consts))`` and ``args`` as ``(args, consts)``.
          solver: the forward :class:`jdeq.Solver`.
          maxiter: run-time budget override, or None for ``solver.maxiter``.

        Returns:
          A :class:`jdeq.Solution` whose ``value`` carries this mode's gradient to ``args``.
        """
        layout = batch_layout(z0)
        f, args = with_hoisted_closure(f, z0, args)  # closed-over traced weights: arguments
        # The forward path carries no derivative (this mode defines one at the fixed point): a
        # solver's own arrays (a learned solver's weights) get a zero gradient, and the loop is
        # never linearized (reverse mode cannot differentiate a while loop).
        solver = jax.lax.stop_gradient(solver)
        keep = self.uses_forward_state(solver)
        out = solver.solve(
            layout.wrap(f, jax.lax.stop_gradient(args)),
            layout.flatten(jax.lax.stop_gradient(z0)),
            maxiter,
            **({"keep_state": True} if keep else {}),
        )
        zm, stats = out[:2]
        # the forward solver's final state (e.g. Broyden's inverse-Jacobian estimate), only
        # for a mode that asks for it: by default nothing of it leaves the loop
        extra = {"forward_state": jax.lax.stop_gradient(out[2])} if keep else {}
        effective = solver.maxiter if maxiter is None else maxiter
        value = self.attach(
            f, layout.unflatten(zm), args, solver=solver, maxiter=effective, stats=stats, **extra
        )
        return Solution(value=value, stats=stats)

    def uses_forward_state(self, solver) -> bool:
        """Whether :meth:`solve` should pass the forward solver's final state to :meth:`attach`
        (as ``forward_state=``); False by default (``jdeq.Implicit(shine=...)`` says True)."""
        del solver
        return False

    def attach(self, f, z_star, args, *, solver, maxiter, stats):
        """Returns ``z_star`` (a stop-gradient fixed point) carrying this mode's derivative.

        Args:
          f, args: the cell and its arguments; the derivative flows to ``args``.
          z_star: the forward solution (batched pytree).
          solver: the forward solver; maxiter: its effective budget.
          stats: the forward :class:`jdeq.SolverStats` (e.g. ``stats.nonfinite``).
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement attach(...) or override solve(...)."
        )

    @property
    def uses_attach(self) -> bool:
        """Whether this mode defines its gradient at the fixed point (via :meth:`attach`)."""
        return type(self).attach is not Gradient.attach
