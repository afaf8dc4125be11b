"""jdeq's forward solvers: damped fixed-point iteration, Anderson acceleration, Broyden.

Each is a small immutable, hashable config object. The numerics live in ``init``/``update`` on
``(batch, dim)`` matrices, every quantity per example (row), and run inside the shared loop of
:mod:`jdeq._loop`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jdeq._protocols import Solver, check_maxiter, leaf_field  # noqa: F401 (re-exported)

__all__ = ["Anderson", "Broyden", "FixedPointIteration", "Solver", "check_maxiter", "leaf_field"]

_HI = jax.lax.Precision.HIGHEST  # small solver contractions: never TF32/bf16 passes

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


def explicit_sharding(x) -> jax.sharding.NamedSharding | None:
    """``x``'s sharding when it lives on a mesh with Explicit axes; else None (JAX decides the
    layouts, and an ``out_sharding`` would be wrong outside such a mesh)."""
    sharding = jax.typeof(x).sharding  # (every aval has one; outside a mesh its mesh is empty)
    mesh = sharding.mesh
    if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return None
    return sharding


def row_sharding(x: jax.Array) -> jax.sharding.NamedSharding | None:
    """Layout of a per-row result of ``x`` (rows gathered by an index ``x``, or a contraction
    over the feature axis of an ``(n, d)`` ``x``): the batch axis as ``x``'s, every other axis
    replicated (a spec shorter than the rank leaves the rest unsplit). Under Explicit mesh axes
    such a result is otherwise ambiguous (a replicated table gathered by sharded indices; a
    feature axis split along a model axis); in every other setting this is None (JAX decides)."""
    sharding = explicit_sharding(x)
    if sharding is None:
        return None
    spec = sharding.spec
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[0] if len(spec) else None))


def zeros_history(z: jax.Array, m: int) -> jax.Array:
    """``(n, m, d)`` zeros laid out like ``z`` (``(n, d)``) on both its axes: a broadcast of
    ``zeros_like(z)``, so that rows of ``z`` written into the history match its sharding (batch
    axis and, with weights split along a model axis, the feature axis)."""
    return jnp.broadcast_to(jnp.zeros_like(z)[:, None, :], (z.shape[0], m, z.shape[1]))


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
      xs, gs: ``(n, m, d)`` past points and residuals; gram: ``(n, m, m)`` their residual Gram.
        (``jdeq.Anderson`` stores ``f(z_i)`` as the point, ``jdeq.HyperAnderson`` ``z_i``.)
      k: evaluations so far (>= 1); z, g: ``(n, d)`` current point and residual ``f(z) - z``.

    Returns:
      ``(xs, gs, gram, valid)`` with ``valid`` the ``(m,)`` mask of filled slots.
    """
    m = xs.shape[1]
    slot = (k - 1) % m
    xs = jax.lax.dynamic_update_index_in_dim(xs, z, slot, axis=1)
    gs = jax.lax.dynamic_update_index_in_dim(gs, g, slot, axis=1)
    row = jnp.einsum("nmd,nd->nm", gs, g, precision=_HI, out_sharding=row_sharding(g))
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


def _row_dot(hist, x):
    """``<hist_i, x>`` per example: ``(n, m, d), (n, d) -> (n, m)``."""
    return jnp.einsum("nmd,nd->nm", hist, x, precision=_HI, out_sharding=row_sharding(x))


def _row_mix(coef, hist):
    """``sum_i coef_i hist_i`` per example: ``(n, m), (n, m, d) -> (n, d)``."""
    return jnp.einsum("nm,nmd->nd", coef, hist, precision=_HI)


def anderson_inverse_estimate(fs, gs, gram, b, *, ridge: float, transpose: bool):
    """``(I - J)^{-1} b`` (or ``(I - J)^{-T} b``) from an Anderson history, per example.

    With ``g = f(z) - z`` and the secant pairs ``dX_i = x_i - x_r``, ``dG_i = g_i - g_r``
    relative to the stored iterate ``r`` of smallest residual, the multisecant estimate of the
    inverse Jacobian of ``g`` closest to ``-I`` that maps every ``dG_i`` to ``dX_i`` is
    ``B = -I + (dX + dG) H^{-1} dG^T``, ``H = dG^T dG`` (read off the stored Gram matrix); this
    is the inverse Jacobian that Anderson's type-II mixing steps with. ``(I - J)^{-1} ~ -B``
    gives ``b - (dX + dG) H^{-1} dG^T b`` and, transposed, ``b - dG H^{-1} (dX + dG)^T b``.
    Outside the span of the ``dG_i`` this is ``J = 0``: the estimate is only as good as the
    history covers ``b``'s direction (hence ``jdeq.Implicit``'s residual check and fallback).

    Args:
      fs, gs, gram: Anderson's state (ring buffers ``(n, m, d)`` of ``f(x_i) = x_i + g_i`` and of
        ``g_i``, and their Gram ``(n, m, m)``); empty slots (zero residual) are ignored.
      b: ``(n, d)`` right-hand side.
      ridge: Tikhonov term of ``H``, relative to its diagonal.
      transpose: estimate ``(I - J)^{-T} b``.

    Returns:
      ``(n, d)``.
    """
    m = gram.shape[-1]
    diag = jnp.diagonal(gram, axis1=1, axis2=2)
    valid = diag > 0
    ref = jnp.argmin(jnp.where(valid, diag, jnp.inf), axis=1)
    onehot = jax.nn.one_hot(ref, m, dtype=gram.dtype)  # (n, m)
    use = (valid & (onehot == 0)).astype(gram.dtype)
    # H_ij = <g_i - g_r, g_j - g_r> from the Gram matrix
    g_ir = jnp.einsum("nij,nj->ni", gram, onehot, precision=_HI)
    g_rr = jnp.sum(g_ir * onehot, axis=1)
    h = gram - g_ir[:, :, None] - g_ir[:, None, :] + g_rr[:, None, None]
    h = h * use[:, :, None] * use[:, None, :]
    hd = jnp.diagonal(h, axis1=1, axis2=2)
    eye = jnp.eye(m, dtype=gram.dtype)
    h = h + eye * ((ridge * hd + jnp.sqrt(jnp.finfo(gram.dtype).tiny))[:, :, None] * use[:, None, :]
                   + (1.0 - use)[:, None, :])
    left, right = (gs, fs) if transpose else (fs, gs)  # b - left H^{-1} right^T b (fs = xs + gs)
    c = _row_dot(right, b)
    c = (c - jnp.sum(c * onehot, axis=1, keepdims=True)) * use
    w = _spd_solve(h, c)
    # sum_i w_i (left_i - left_r)
    lw = _row_mix(w, left) - _row_mix(onehot * jnp.sum(w, axis=1, keepdims=True), left)
    return b - lw


@dataclasses.dataclass(frozen=True, kw_only=True)
class Anderson(Solver):
    """Anderson acceleration (type II), per example, with an incrementally updated Gram matrix.

    Each iteration stores ``(z_k, g_k = f(z_k) - z_k)`` in a ring buffer of ``memory`` slots,
    updates one row/column of the residual Gram matrix (O(memory * dim) per example, never the
    whole history), solves the small bordered least-squares system and mixes
    ``z_{k+1} = sum_i a_i (z_i + damping * g_i)``. Mixing starts at the second iteration. The
    history keeps ``f(z_i) = z_i + g_i`` rather than ``z_i``, so that the undamped mix is one
    contraction ``sum_i a_i f(z_i)`` (with ``damping`` below 1, one more over the ``g_i``).

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
        """``(fs, gs, gram)``: ring buffers of ``f(z_i)`` and ``g_i``, and the ``g_i`` Gram."""
        m = self.memory
        return zeros_history(z, m), zeros_history(z, m), zeros_rows(z, (m, m))

    def inverse_estimate(self, state, b, *, transpose: bool):
        """SHINE's analogue for Anderson: the multisecant ("type-II") inverse-Jacobian estimate
        of the stored history, ``(I - J)^{-1} b`` (``transpose``: ``(I - J)^{-T} b``); see
        :func:`anderson_inverse_estimate`."""
        return anderson_inverse_estimate(*state, b, ridge=self.ridge, transpose=transpose)

    def update(self, state, k, z, fz):
        fs, gs, gram, valid = anderson_record(*state, k, fz, fz - z)
        return self._mix(fs, gs, gram, valid), (fs, gs, gram)

    def _mix(self, fs, gs, gram, valid):
        """``z_{k+1} = sum_i a_i (z_i + damping g_i)`` from the recorded history."""
        alpha = anderson_weights(gram, valid, self.ridge)
        z_next = _row_mix(alpha, fs)
        if self.damping != 1:  # z_i + b g_i = f(z_i) - (1 - b) g_i
            z_next = z_next - (1 - self.damping) * _row_mix(alpha, gs)
        return z_next


@dataclasses.dataclass(frozen=True, kw_only=True)
class Broyden(Solver):
    """Limited-memory ("good") Broyden root finding on ``g(z) = f(z) - z``, per example.

    Keeps a low-rank inverse-Jacobian estimate ``B = -I + sum_i u_i v_i^T`` (the ``memory``
    latest rank-one terms in a ring buffer, plus the newest one before it is stored), steps
    ``z <- z - B g(z)`` (the first step is a plain fixed-point step) and applies the
    Sherman-Morrison update ``B += (dz - B dg) dz^T B / (dz^T B dg)`` after each step. An
    update whose denominator ``|dz^T B dg|`` is not above ``sqrt`` of the dtype's smallest
    normal number (``2**-63`` in float32) is skipped for that example: ``B`` stays as it is,
    rather than dividing by a (nearly) degenerate secant pair.

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
        hist = zeros_history(z, self.memory)
        zero = jnp.zeros_like(z)
        return hist, hist, z, zero, zero, zero, zero

    def inverse_estimate(self, state, b, *, transpose: bool):
        """SHINE (Ramzi et al. 2022): with the final estimate ``B = -I + sum_i u_i v_i^T`` of
        the inverse Jacobian of ``g = f(z) - z``, ``(I - J)^{-1} = -(J - I)^{-1} ~ -B`` gives
        ``b - sum_i u_i <v_i, b>`` and, transposed (the adjoint), ``b - sum_i v_i <u_i, b>``.
        Rank-one terms not yet written (zeros) add nothing."""
        us, vs, _, _, u_new, v_new, _ = state
        left, right = (vs, us) if transpose else (us, vs)
        l_new, r_new = (v_new, u_new) if transpose else (u_new, v_new)
        return b - _row_mix(_row_dot(right, b), left) - l_new * jnp.sum(r_new * b, axis=1, keepdims=True)

    def update(self, state, k, z, fz):
        us, vs, z_prev, g_prev, u_new, v_new, dropped = state
        m = self.memory
        # The rank-one term found last iteration enters the ring buffer first, so that every
        # read below follows the in-place write (reading the old buffer after it would make XLA
        # copy the whole history each iteration).
        us = jax.lax.dynamic_update_index_in_dim(us, u_new, (k - 3) % m, axis=1)
        vs = jax.lax.dynamic_update_index_in_dim(vs, v_new, (k - 3) % m, axis=1)
        g = fz - z

        def apply(left, right, x):  # (-I + sum_i left_i right_i^T) x, and the coefficients
            coef = jnp.einsum("nmd,nd->nm", right, x, precision=_HI, out_sharding=row_sharding(x))
            return jnp.einsum("nm,nmd->nd", coef, left, precision=_HI) - x, coef

        # The last step was dz = -B' g_prev with B' = B + (the term this write dropped), B the
        # buffer now; ``dropped`` is that term applied to g_prev (zero until the buffer wraps).
        # So B dg = B g - B g_prev = B g + dz + dropped, and the update's dz - B dg is
        # -(B g + dropped): two products with the history per step (B g and dz^T B), not three.
        dz, dg = z - z_prev, g - g_prev
        bg, coef = apply(us, vs, g)
        vt, _ = apply(vs, us, dz)  # dz^T B, as a column
        denom = jnp.sum(vt * dg, axis=1)
        ok = (k > 1) & (jnp.abs(denom) > jnp.sqrt(jnp.finfo(z.dtype).tiny))
        safe = jnp.where(ok, denom, 1.0)
        u = jnp.where(ok[:, None], -(bg + dropped) / safe[:, None], 0.0)
        v = jnp.where(ok[:, None], vt, 0.0)
        # The term the next write drops, applied to g (slot (k - 2) % m of the buffer now).
        nxt = (k - 2) % m
        dropped = jax.lax.dynamic_index_in_dim(us, nxt, axis=1, keepdims=False) * (
            jax.lax.dynamic_index_in_dim(coef, nxt, axis=1, keepdims=True)
        )
        # B_new g with B_new = B + u v^T (the buffered terms plus the new one).
        bg = bg + u * jnp.sum(v * g, axis=1, keepdims=True)
        return z - bg, (us, vs, z, g, u, v, dropped)
