"""jdeq's forward solvers: damped fixed-point iteration, Anderson acceleration, Broyden.

Each is a small immutable, hashable config object. The numerics live in ``init``/``update`` on
``(batch, dim)`` matrices, every quantity per example (row), and run inside the shared loop of
:mod:`jdeq._loop`.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from jdeq._loop import run_loop, solve_rows

__all__ = ["Anderson", "Broyden", "FixedPointIteration", "Solver", "check_maxiter", "leaf_field"]

_HI = jax.lax.Precision.HIGHEST  # small solver contractions: never TF32/bf16 passes
_STOP_MODES = ("abs", "rel")


def _is_concrete_number(x) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def check_maxiter(maxiter, *, name: str = "maxiter") -> None:
    """Raises unless ``maxiter`` is an integer >= 1: a Python int (or whole float), or an integer
    scalar array; a traced value is checked for its dtype and shape only (its value is unknown)."""
    if isinstance(maxiter, bool) or (isinstance(maxiter, float) and not maxiter.is_integer()):
        raise TypeError(f"`{name}` must be an integer, got {maxiter!r}.")
    if not _is_concrete_number(maxiter):
        dtype = getattr(maxiter, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or jnp.ndim(maxiter) != 0:
            what = f"dtype {dtype} and shape {jnp.shape(maxiter)}" if dtype is not None else repr(maxiter)
            raise TypeError(f"`{name}` must be an integer (a Python int or an int scalar array), got {what}.")
        try:
            maxiter = int(maxiter)
        except jax.errors.ConcretizationTypeError:
            return  # traced: the run-time budget of a compiled function
    if maxiter < 1:
        raise ValueError(f"`{name}` must be >= 1, got {maxiter}.")


# Checks of the options that only some solvers have: name -> (predicate, what is expected).
_OPTION_CHECKS = {
    "damping": (lambda v: _is_concrete_number(v) and 0 < v <= 1, "in (0, 1]"),
    "memory": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1, "an int >= 1"),
    "ridge": (lambda v: _is_concrete_number(v) and v >= 0, "a number >= 0"),
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
        jax.tree_util.register_pytree_with_keys(
            cls, cls._tree_flatten_with_keys, cls._tree_unflatten, cls._tree_flatten
        )

    def _split_fields(self):
        fields = dataclasses.fields(self) if dataclasses.is_dataclass(self) else ()
        leaves = tuple(f.name for f in fields if f.metadata.get("leaf", False))
        static = tuple(f.name for f in fields if not f.metadata.get("leaf", False))
        return leaves, static

    def _tree_flatten_with_keys(self):
        leaves, static = self._split_fields()
        children = [(jax.tree_util.GetAttrKey(n), getattr(self, n)) for n in leaves]
        return children, (leaves, tuple((n, getattr(self, n)) for n in static))

    def _tree_flatten(self):
        leaves, static = self._split_fields()
        return [getattr(self, n) for n in leaves], (leaves, tuple((n, getattr(self, n)) for n in static))

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

    def __post_init__(self):
        if not _is_concrete_number(self.tol) or not self.tol > 0:
            raise ValueError(f"`tol` must be a number > 0, got {self.tol!r}.")
        if not isinstance(self.maxiter, numbers.Integral) or isinstance(self.maxiter, bool):
            raise TypeError(f"`maxiter` must be an int, got {self.maxiter!r}.")
        check_maxiter(self.maxiter)
        if self.stop_mode not in _STOP_MODES:
            raise ValueError(f"`stop_mode` must be one of {_STOP_MODES}, got {self.stop_mode!r}.")
        if not isinstance(self.trace, bool):
            raise TypeError(f"`trace` must be a bool, got {self.trace!r}.")
        for field in dataclasses.fields(self):  # options that only some solvers have
            if field.name in _OPTION_CHECKS:
                ok, expected = _OPTION_CHECKS[field.name]
                value = getattr(self, field.name)
                if not ok(value):
                    raise ValueError(f"`{field.name}` must be {expected}, got {value!r}.")

    def init(self, z):
        """The solver's state for the ``(batch, dim)`` starting point ``z``."""
        raise NotImplementedError(f"{type(self).__name__} must implement init(z) -> state.")

    def update(self, state, k, z, fz):
        """One step: ``(z_next, state)`` from the current iterate ``z`` and ``fz = f(z)``."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement update(state, k, z, fz) -> (z_next, state)."
        )

    static_budget = False  # True: the loop needs a static budget (maxiter baked into options)

    def backward(self, **overrides):
        """This solver with ``overrides`` (``tol``, ``stop_mode``, ``maxiter``) for the backward
        (adjoint) solve of ``jdeq.Implicit``; the residual trace is switched off."""
        return dataclasses.replace(self, **{"trace": False, **overrides})

    def solve(self, F, z0: jax.Array, maxiter=None, *, unrolled: bool = False, snapshots=None):
        """Solves ``z = F(z)`` row by row in the shared loop (see :func:`jdeq._loop.run_loop`).

        Args:
          F: the map on ``(batch, dim)`` matrices (rows independent).
          z0: ``(batch, dim)`` start.
          maxiter: run-time budget (None: ``self.maxiter``).
          unrolled: differentiate through the iterations (a ``lax.scan``; static ``maxiter``).
          snapshots: optional budgets at which to record the best iterate.

        Returns:
          ``(z, stats)`` (``+ snaps`` with ``snapshots``).
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
            return run_loop(self, F, z0, maxiter, trace_len=trace_len, unrolled=True, snapshots=snapshots)
        return solve_rows(self, F, z0, maxiter, trace_len=trace_len, snapshots=snapshots)


_Solver = Solver  # internal alias


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedPointIteration(Solver):
    """Damped fixed-point (Picard) iteration ``z <- (1 - b) z + b f(z)``, per example.

    Args:
      tol: stop an example once its residual (see ``stop_mode``) is below ``tol``.
      maxiter: budget of evaluations of ``f`` (the first one, at ``z0``, counts).
      damping: ``b`` in (0, 1]; 1 is plain iteration.
      stop_mode: ``"rel"`` (default, scale-free) tests ``||f(z)-z|| / ||f(z)||``;
        ``"abs"`` tests ``||f(z)-z||``.
      trace: record every iteration's residual in ``SolverStats.trace``.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> sol = jdeq.fixed_point(lambda z, a: 0.5 * jnp.cos(z) + a, jnp.zeros((2, 3)),
      ...                        jnp.ones((2, 3)), solver=jdeq.FixedPointIteration(tol=1e-6))
    """

    damping: float = 1.0

    def init(self, z):
        return ()

    def update(self, state, k, z, fz):
        return z + self.damping * (fz - z), state


def zeros_rows(z: jax.Array, shape: tuple[int, ...], dtype=None) -> jax.Array:
    """``(n, *shape)`` zeros laid out like the rows of ``z`` (``(n, d)``): a broadcast of a
    column of ``z``'s zeros, so a solver state keeps the batch sharding of ``z``. (Under
    Explicit mesh axes a fresh ``jnp.zeros`` is replicated, and writing sharded rows into it is
    a sharding type error.)"""
    # (a reduction, not a slice z[:, :1]: slicing a feature axis that is itself sharded, e.g.
    # along a model axis, is not allowed; XLA drops the unused sum)
    col = jnp.zeros_like(jnp.sum(z, axis=1, keepdims=True), dtype=dtype)
    return jnp.broadcast_to(col.reshape((z.shape[0],) + (1,) * len(shape)), (z.shape[0],) + tuple(shape))


def _spd_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """Solves batched symmetric positive-definite ``a x = b`` ((n, m, m), (n, m)).

    Gauss-Jordan elimination without pivoting (stable for SPD), unrolled over the static ``m``:
    a handful of fused elementwise ops instead of a LAPACK call per tiny system.
    """
    m = a.shape[-1]
    for i in range(m):
        piv = a[:, i, i]
        row = a[:, i, :] / piv[:, None]
        bi = b[:, i] / piv
        col = a[:, :, i]
        a = (a - col[:, :, None] * row[:, None, :]).at[:, i, :].set(row)
        b = (b - col * bi[:, None]).at[:, i].set(bi)
    return b


def anderson_weights(gram: jax.Array, valid: jax.Array, ridge: float) -> jax.Array:
    """Per-example Anderson mixing weights ``argmin ||sum_i a_i g_i||, sum_i a_i = 1``.

    Args:
      gram: ``(batch, m, m)`` Gram matrix ``<g_i, g_j>`` of the stored residuals.
      valid: ``(m,)`` bool, which history slots hold residuals.
      ridge: Tikhonov term relative to each slot's own ``||g_i||^2`` (scale-free, so it never
        outweighs small residuals, unlike a fixed absolute ridge).

    Returns:
      ``(batch, m)`` weights, zero on invalid slots, summing to 1.
    """
    m = gram.shape[-1]
    vf = valid.astype(gram.dtype)
    mask = vf[:, None] * vf[None, :]
    h = gram * mask
    diag = jnp.diagonal(h, axis1=1, axis2=2)
    # Ridge relative to each slot's own ||g_i||^2 (scale-free: it never swamps the newest, small
    # residual, unlike one absolute or largest-entry ridge), plus a floor so exact zeros stay
    # solvable.
    lam = ridge * diag + jnp.sqrt(jnp.finfo(gram.dtype).tiny)
    eye = jnp.eye(m, dtype=gram.dtype)
    h = h + eye * (lam[:, :, None] * vf + (1.0 - vf))  # invalid slots: identity rows
    x = _spd_solve(h, jnp.broadcast_to(vf, diag.shape))
    return x / jnp.sum(x, axis=1, keepdims=True)


def anderson_record(xs, gs, gram, k, z, g):
    """Stores ``(z, g)`` in slot ``(k - 1) % m`` of the ring buffers; updates one Gram row/column.

    Args:
      xs, gs: ``(n, m, d)`` past iterates and residuals; gram: ``(n, m, m)`` their residual Gram.
      k: evaluations so far (>= 1); z, g: ``(n, d)`` current iterate and residual ``f(z) - z``.

    Returns:
      ``(xs, gs, gram, valid)`` with ``valid`` the ``(m,)`` mask of filled slots.
    """
    m = xs.shape[1]
    slot = (k - 1) % m
    xs = jax.lax.dynamic_update_index_in_dim(xs, z, slot, axis=1)
    gs = jax.lax.dynamic_update_index_in_dim(gs, g, slot, axis=1)
    row = jnp.einsum("nmd,nd->nm", gs, g, precision=_HI)
    gram = jax.lax.dynamic_update_index_in_dim(gram, row, slot, axis=1)
    gram = jax.lax.dynamic_update_index_in_dim(gram, row, slot, axis=2)
    return xs, gs, gram, jnp.arange(m) < jnp.minimum(k, m)


def anderson_mix(alpha, xs, gs, damping):
    """``sum_i alpha_i (x_i + damping * g_i)`` per example (``damping`` scalar or ``(n,)``).

    Two reductions rather than one over ``xs + damping * gs``: that temporary would fuse with the
    ring-buffer update and force XLA to copy the whole history every iteration.
    """
    mix = lambda hist: jnp.einsum("nm,nmd->nd", alpha, hist, precision=_HI)
    return mix(xs) + jnp.reshape(damping, (-1, 1)) * mix(gs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Anderson(Solver):
    """Anderson acceleration (type II), per example, with an incrementally updated Gram matrix.

    Each iteration stores ``(z_k, g_k = f(z_k) - z_k)`` in a ring buffer of ``memory`` slots,
    updates one row/column of the residual Gram matrix (O(memory * dim) per example, never the
    whole history), solves the small bordered least-squares system and mixes
    ``z_{k+1} = sum_i a_i (z_i + damping * g_i)``. Mixing starts at the second iteration.

    Args:
      tol, maxiter, stop_mode, trace: as in :class:`FixedPointIteration`.
      memory: number of past iterates mixed (``m``).
      ridge: Tikhonov regularization, relative to each stored squared residual.
      damping: mixing parameter ``beta`` in (0, 1].

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> sol = jdeq.fixed_point(lambda z, a: 0.9 * jnp.tanh(z) + a, jnp.zeros((4, 8)),
      ...                        jnp.ones((4, 8)), solver=jdeq.Anderson(memory=5, tol=1e-5))

    Reference: Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer.
    Anal. 2011; used for DEQs by Bai et al. 2019.
    """

    memory: int = 5
    ridge: float = 1e-5
    damping: float = 1.0

    def init(self, z):
        m = self.memory
        return zeros_rows(z, (m, z.shape[1])), zeros_rows(z, (m, z.shape[1])), zeros_rows(z, (m, m))

    def update(self, state, k, z, fz):
        xs, gs, gram, valid = anderson_record(*state, k, z, fz - z)
        alpha = anderson_weights(gram, valid, self.ridge)
        return anderson_mix(alpha, xs, gs, self.damping), (xs, gs, gram)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Broyden(Solver):
    """Limited-memory ("good") Broyden root finding on ``g(z) = f(z) - z``, per example.

    Keeps a low-rank inverse-Jacobian estimate ``B = -I + sum_i u_i v_i^T`` (the ``memory``
    latest rank-one terms in a ring buffer, plus the newest one before it is stored), steps
    ``z <- z - B g(z)`` (the first step is a plain fixed-point step) and applies the
    Sherman-Morrison update ``B += (dz - B dg) dz^T B / (dz^T B dg)`` after each step.

    Args:
      tol, maxiter, stop_mode, trace: as in :class:`FixedPointIteration`.
      memory: number of rank-one updates kept.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> sol = jdeq.fixed_point(lambda z, a: 0.9 * jnp.tanh(z) + a, jnp.zeros((4, 8)),
      ...                        jnp.ones((4, 8)), solver=jdeq.Broyden(memory=20))

    Reference: Broyden, Math. Comp. 1965; as used for DEQs by Bai et al. 2019.
    """

    memory: int = 20

    def init(self, z):
        hist = zeros_rows(z, (self.memory, z.shape[1]))
        zero = jnp.zeros_like(z)
        return hist, hist, z, zero, zero, zero

    def update(self, state, k, z, fz):
        us, vs, z_prev, g_prev, u_new, v_new = state
        m = self.memory
        # The rank-one term found last iteration enters the ring buffer first, so that every
        # read below follows the in-place write (reading the old buffer after it would make XLA
        # copy the whole history each iteration).
        us = jax.lax.dynamic_update_index_in_dim(us, u_new, (k - 3) % m, axis=1)
        vs = jax.lax.dynamic_update_index_in_dim(vs, v_new, (k - 3) % m, axis=1)
        g = fz - z

        def apply(left, right, x):  # (-I + sum_i left_i right_i^T) x
            coef = jnp.einsum("nmd,nd->nm", right, x, precision=_HI)
            return jnp.einsum("nm,nmd->nd", coef, left, precision=_HI) - x

        dz, dg = z - z_prev, g - g_prev
        vt = apply(vs, us, dz)  # dz^T B, as a column
        bdg = apply(us, vs, dg)
        denom = jnp.sum(vt * dg, axis=1)
        ok = (k > 1) & (jnp.abs(denom) > jnp.sqrt(jnp.finfo(z.dtype).tiny))
        safe = jnp.where(ok, denom, 1.0)
        u = jnp.where(ok[:, None], (dz - bdg) / safe[:, None], 0.0)
        v = jnp.where(ok[:, None], vt, 0.0)
        # B_new g with B_new = B + u v^T (the buffered terms plus the new one).
        bg = apply(us, vs, g) + u * jnp.sum(v * g, axis=1, keepdims=True)
        return z - bg, (us, vs, z, g, u, v)



