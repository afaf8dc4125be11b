"""Monotone operator equilibrium networks (monDEQ, Winston & Kolter 2020), Flax NNX.

A monDEQ cell is ``f(z, x) = relu(W z + U x + b)`` with the parametrization

    W = (1 - m) I - A^T A + B - B^T,

so that ``I - W = m I + A^T A - (B - B^T)`` has symmetric part ``m I + A^T A >= m I`` for
*every* ``A, B``: the operator is ``m``-strongly monotone, and the fixed point exists, is unique
and is found from any start by operator splitting (:func:`jdeq.monotone_fixed_point`).

- :class:`MonotoneDenseCell`: ``A, B`` dense ``(n, n)`` matrices.
- :class:`MonotoneConvCell`: ``A, B`` stride-1 "SAME" convolutions on ``(batch, *spatial, C)``
  maps, with the exact adjoints ``A^T, B^T`` (flipped, channel-transposed kernels), so the strong
  monotonicity holds for the convolution operator itself (zero padding included).
- :class:`MonDEQ`: the layer that solves a monotone cell by splitting, through jdeq (any jdeq
  solver iterates the splitting operator, any jdeq gradient mode applies); called like
  ``jdeq.nnx.DEQ``: ``z, stats = layer(x, z0=None, *, maxiter=None)``.
- :class:`MonDEQClassifier`: ``MonDEQ`` + (optional average pooling) + linear head.

The cells are also ordinary jdeq cells (``cell(z, x)``, ``init_z(x)``), so ``jdeq.nnx.DEQ(cell,
solver=jdeq.Anderson())`` solves the same equilibrium by plain root finding.

Reference: Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jdeq import _validate as V
from jdeq._cells import initial_state
from jdeq._gradients import Implicit
from jdeq._regularizers import jacobian_penalty
from jdeq.nnx import record_equilibrium
from jdeq.models._conv import conv_general_dilated, conv_same, flip_transpose
from jdeq._solvers import FixedPointIteration
from jdeq._splitting import (
    ForwardBackward,
    MonotoneProblem,
    PeacemanRachford,
    monotone_fixed_point,
)

__all__ = ["MonDEQ", "MonDEQClassifier", "MonotoneConvCell", "MonotoneDenseCell"]

_HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- dense


def _dense_linear(z, op):
    return jnp.matmul(z, op["W"].T, precision=_HI)


def _dense_lipschitz(op):
    n = op["W"].shape[0]
    return jnp.linalg.norm(jnp.eye(n, dtype=op["W"].dtype) - op["W"], 2)


def _dense_setup(alpha, op):
    W = op["W"]
    n = W.shape[0]
    return jnp.linalg.inv((1.0 + alpha) * jnp.eye(n, dtype=W.dtype) - alpha * W)


def _dense_apply(v, inv):
    return jnp.matmul(v, inv.T, precision=_HI)


class MonotoneDenseCell(nnx.Module):
    """Dense monDEQ cell ``f(z, x) = relu(W z + U x + b)``, ``W = (1-m) I - A^T A + B - B^T``.

    Args:
      in_features: size of one input example (inputs are flattened to ``(batch, in_features)``).
      features: size of the state ``z`` (``n``).
      m: strong monotonicity of ``I - W`` (guaranteed for all parameter values).
      w_scale: initial entries of ``A`` and ``B`` have standard deviation ``w_scale / sqrt(n)``.
      dtype: parameter dtype.
      rngs: ``nnx.Rngs``.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> cell = jdeq.models.MonotoneDenseCell(8, 16, rngs=nnx.Rngs(0))
      >>> z, stats = jdeq.models.MonDEQ(cell)(jnp.ones((4, 8)))
      >>> z.shape
      (4, 16)
    """

    def __init__(self, in_features: int, features: int, *, m: float = 1.0, w_scale: float = 0.5,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.features = V.positive_int(features, "features")
        V.positive_int(in_features, "in_features")
        self.m = V.positive_number(m, "m")  # strong monotonicity
        self.dtype = dtype
        std = w_scale / math.sqrt(features)
        self.A = nnx.Param(std * jax.random.normal(rngs.params(), (features, features), dtype))
        self.B = nnx.Param(std * jax.random.normal(rngs.params(), (features, features), dtype))
        self.U = nnx.Linear(in_features, features, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def weight(self):
        """``W = (1 - m) I - A^T A + B - B^T`` as an ``(n, n)`` matrix."""
        A, B = self.A[...], self.B[...]
        eye = jnp.eye(self.features, dtype=A.dtype)
        return (1.0 - self.m) * eye - jnp.matmul(A.T, A, precision=_HI) + B - B.T

    def operator(self):
        """The parameters of the linear part as a pytree (computed once per solve)."""
        return {"W": self.weight()}

    def injection(self, x):
        """``U x + b`` (``x`` is flattened to ``(batch, in_features)`` first)."""
        return self.U(x.reshape(x.shape[0], -1))

    def problem(self, bias) -> MonotoneProblem:
        """The :class:`jdeq.MonotoneProblem` of this cell (exact ``||I - W||_2``, and a dense
        resolvent for Peaceman-Rachford).

        Both are computed once per solve, outside the splitting loop: one SVD for ``L`` and one
        LU inverse of ``(1 + alpha) I - alpha W`` (the loop then only multiplies by it). On CPU
        these LAPACK calls run through scipy's OpenBLAS, whose threads spin while waiting: on a
        busy machine limit them (``OPENBLAS_NUM_THREADS=1`` or ``threadpoolctl``), which took a
        training step from 56 ms (median, load ~10 on 2 cores) back to 1.3 ms."""
        del bias
        return MonotoneProblem(
            linear=_dense_linear, monotonicity=self.m, lipschitz=_dense_lipschitz,
            resolvent=(_dense_setup, _dense_apply),
        )

    def __call__(self, z, x):
        return jax.nn.relu(_dense_linear(z, self.operator()) + self.injection(x))

    def init_z(self, x):
        """Zeros of the state shape ``(batch, features)``."""
        return jnp.zeros((x.shape[0], self.features), self.dtype)


# ----------------------------------------------------------------------------- conv


def _conv(z, kernel):
    return conv_same(z, kernel, precision=_HI)


def _conv_adjoint(v, kernel):
    """``K^T v``: the exact adjoint of the zero-padded 'SAME' convolution (odd window), as a
    convolution with the flipped, channel-transposed kernel. (``jax.linear_transpose`` gives the
    same map but as a convolution with a swapped kernel spec, which XLA:CPU runs much slower
    inside the solver's loop; see :func:`jdeq.models.conv_general_dilated`.)"""
    return conv_same(v, flip_transpose(kernel), precision=_HI)


def _conv_linear(m, z, op):
    A, B = op["A"], op["B"]
    return (1.0 - m) * z - _conv_adjoint(_conv(z, A), A) + _conv(z, B) - _conv_adjoint(z, B)


def _symbol(kernel, grid):
    """Per-frequency ``(C_in, C_out)`` symbols of the circular convolution with centred taps."""
    nd = kernel.ndim - 2
    k = jnp.fft.fftn(kernel, s=grid, axes=tuple(range(nd)))
    for ax in range(nd):  # centre the taps (offset (k-1)/2) so that adjoints match exactly
        n, c = grid[ax], (kernel.shape[ax] - 1) / 2
        shape = [1] * (nd + 2)
        shape[ax] = n
        k = k * jnp.exp(2j * jnp.pi * jnp.arange(n) * c / n).reshape(shape)
    return k


def _conv_lipschitz(m, spatial, op):
    """Upper bound of ``||I - W||_2`` for the zero-padded convolutions on ``spatial`` maps.

    A zero-padded 'SAME' convolution is the restriction ``P^T C P`` of a circular convolution
    ``C`` on a grid of ``S + k - 1`` per axis, whose norm is the largest singular value of its
    Fourier symbol over that grid (exact). Then
    ``||I - W|| <= m + ||A_c||^2 + ||B_c - B_c^H||`` (``B - B^T = P^T (B_c - B_c^H) P``).
    """
    A, B = op["A"], op["B"]
    grid = tuple(s + k - 1 for s, k in zip(spatial, A.shape[:-2]))
    sa = _symbol(A, grid)
    sb = _symbol(B, grid)
    na = jnp.max(jnp.linalg.norm(sa, 2, axis=(-2, -1)))
    skew = sb - jnp.conj(jnp.swapaxes(sb, -1, -2))
    nb = jnp.max(jnp.linalg.norm(skew, 2, axis=(-2, -1)))
    return (m + na**2 + nb).astype(A.dtype)


class MonotoneConvCell(nnx.Module):
    """Convolutional monDEQ cell on ``(batch, *spatial, channels)`` maps.

    ``f(z, x) = relu(W z + U * x + b)`` with ``W z = (1-m) z - A^T(A z) + B z - B^T z``, where
    ``A, B`` are stride-1 zero-padded ("SAME") convolutions and ``A^T, B^T`` their exact adjoints
    (flipped, channel-transposed kernels); ``U`` is a convolution of the input. ``I - W`` is ``m``-strongly
    monotone as an operator on the maps, for every kernel.

    Args:
      in_channels: channels of the input ``x``.
      channels: channels of the state.
      kernel_size: odd kernel size (per spatial axis) of ``A`` and ``B``.
      spatial_dims: 1 (signals ``(batch, length, C)``) or 2 (images ``(batch, H, W, C)``).
      m: strong monotonicity.
      w_scale: ``A, B`` entries start with std ``w_scale / sqrt(k^d * channels)``.
      dtype: parameter dtype.
      rngs: ``nnx.Rngs``.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> cell = jdeq.models.MonotoneConvCell(1, 4, rngs=nnx.Rngs(0))
      >>> z, stats = jdeq.models.MonDEQ(cell)(jnp.ones((2, 6, 6, 1)))
      >>> z.shape
      (2, 6, 6, 4)
    """

    def __init__(self, in_channels: int, channels: int, *, kernel_size: int = 3, spatial_dims: int = 2,
                 m: float = 1.0, w_scale: float = 0.5, dtype=jnp.float32, rngs: nnx.Rngs):
        V.positive_int(in_channels, "in_channels")
        self.channels = V.positive_int(channels, "channels")
        V.odd_int(kernel_size, "kernel_size")
        self.spatial_dims = V.one_of(spatial_dims, "spatial_dims", (1, 2, 3))
        self.m = V.positive_number(m, "m")  # strong monotonicity
        self.dtype = dtype
        shape = (kernel_size,) * spatial_dims + (channels, channels)
        std = w_scale / math.sqrt(kernel_size**spatial_dims * channels)
        self.A = nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype))
        self.B = nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype))
        self.U = nnx.Conv(in_channels, channels, (kernel_size,) * spatial_dims, padding="SAME",
                          conv_general_dilated=conv_general_dilated, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def operator(self):
        """The kernels of ``A`` and ``B`` (the linear part's parameters)."""
        return {"A": self.A[...], "B": self.B[...]}

    def injection(self, x):
        """``U * x + b`` (a convolution of the input)."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"`x` must have shape (batch, *spatial[{self.spatial_dims}], channels), got {x.shape}."
            )
        return self.U(x)

    def problem(self, bias) -> MonotoneProblem:
        """The :class:`jdeq.MonotoneProblem` on maps of ``bias``'s spatial shape (no resolvent:
        Peaceman-Rachford would need a convolution solve; use forward-backward)."""
        spatial = tuple(bias.shape[1:-1])
        return MonotoneProblem(
            linear=functools.partial(_conv_linear, self.m),
            monotonicity=self.m,
            lipschitz=functools.partial(_conv_lipschitz, self.m, spatial),
        )

    def __call__(self, z, x):
        return jax.nn.relu(_conv_linear(self.m, z, self.operator()) + self.injection(x))

    def init_z(self, x):
        """Zeros of the state shape ``(batch, *spatial, channels)``."""
        return jnp.zeros(x.shape[:-1] + (self.channels,), self.dtype)


# ----------------------------------------------------------------------------- layer


class MonDEQ(nnx.Module):
    """Solves a monotone cell's equilibrium by operator splitting, through jdeq.

    Args:
      cell: :class:`MonotoneDenseCell` or :class:`MonotoneConvCell` (any module with
        ``operator()``, ``injection(x)``, ``problem(bias)`` and ``init_z(x)``).
      splitting: ``jdeq.ForwardBackward()`` or ``jdeq.PeacemanRachford()``; ``None`` (default):
        Peaceman-Rachford when the cell offers a resolvent (dense), else forward-backward.
        Default steps are the guaranteed ones (from the cell's Lipschitz bound).
      solver: the jdeq solver iterating the splitting operator (default plain iteration,
        ``FixedPointIteration(tol=1e-4, maxiter=100)``: guaranteed convergence; ``Anderson``
        accelerates it).
      gradient: a jdeq gradient mode (default ``jdeq.Implicit()``).
      throw: raise when a solve does not converge.

    Call: ``z_star, stats = layer(x, z0=None, *, maxiter=None)``.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> cell = jdeq.models.MonotoneDenseCell(3, 8, rngs=nnx.Rngs(0))
      >>> z, stats = jdeq.models.MonDEQ(cell, splitting=jdeq.ForwardBackward())(jnp.ones((2, 3)))
    """

    def __init__(self, cell: nnx.Module, *, splitting=None, solver=FixedPointIteration(tol=1e-4, maxiter=100),
                 gradient=Implicit(), throw: bool = False):
        V.instance(splitting, "splitting", (ForwardBackward, PeacemanRachford),
                   "jdeq.ForwardBackward or jdeq.PeacemanRachford", none=True)
        self.cell = cell
        self.splitting = splitting
        self.solver = solver
        self.gradient = gradient
        self.throw = throw
        self.record_equilibria = False

    def jacobian_penalty(
        self, x, z_star, key, *, gamma: float, prob: float = 1.0, num_samples: int = 1, noise: str = "normal"
    ) -> jax.Array:
        """``gamma * mean_b ||d cell(z, x)/dz||_F^2 / dim`` at ``stop_gradient(z_star)`` for this
        layer's cell (``jdeq.jacobian_penalty``; Bai et al. 2021), as ``jdeq.nnx.DEQ`` has.

        Args:
          x, z_star: an input and its equilibrium; key: PRNG key;
          gamma, prob, num_samples, noise: as in ``jdeq.jacobian_penalty``.

        Returns:
          A scalar to add to the loss.
        """
        graphdef, state = nnx.split(self.cell)
        f = lambda z, args: nnx.merge(graphdef, args[0])(z, args[1])  # noqa: E731
        return jacobian_penalty(
            f, jax.lax.stop_gradient(z_star), (state, x), key,
            gamma=gamma, prob=prob, num_samples=num_samples, noise=noise,
        )

    def __call__(self, x, z0=None, *, maxiter=None):
        bias = self.cell.injection(x)
        problem = self.cell.problem(bias)
        splitting = self.splitting
        if splitting is None:
            splitting = PeacemanRachford() if problem.resolvent is not None else ForwardBackward()
        z0 = initial_state(self.cell, x, z0)
        sol = monotone_fixed_point(
            problem, bias, z0, self.cell.operator(), splitting=splitting, solver=self.solver,
            gradient=self.gradient, maxiter=maxiter, throw=self.throw,
        )
        if self.record_equilibria:
            record_equilibrium(self, x, sol.value)
        return sol.value, sol.stats


class MonDEQClassifier(nnx.Module):
    """A monotone DEQ classifier: ``head(flatten(avg_pool(z*)))`` with ``z* = MonDEQ(cell)(x)``.

    Args:
      cell: a monotone cell.
      num_classes: number of classes.
      input_shape: shape of one input example (without the batch axis), to size the head.
      pool: average-pooling window (per spatial axis, "SAME" padding) applied to a map state
        before flattening (1: none; ignored for dense states).
      splitting, solver, gradient: as in :class:`MonDEQ`.
      rngs: ``nnx.Rngs``.

    Call: ``logits, stats = model(x, *, maxiter=None)``.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> cell = jdeq.models.MonotoneDenseCell(64, 32, rngs=nnx.Rngs(0))
      >>> model = jdeq.models.MonDEQClassifier(cell, 10, input_shape=(64,), rngs=nnx.Rngs(1))
      >>> logits, stats = model(jnp.ones((2, 64)))
      >>> logits.shape
      (2, 10)
    """

    def __init__(self, cell: nnx.Module, num_classes: int, *, input_shape, pool: int = 1, splitting=None,
                 solver=FixedPointIteration(tol=1e-4, maxiter=100), gradient=Implicit(), rngs: nnx.Rngs):
        V.positive_int(num_classes, "num_classes")
        self.pool = V.positive_int(pool, "pool")
        self.core = MonDEQ(cell, splitting=splitting, solver=solver, gradient=gradient)
        x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
        features = jax.eval_shape(lambda x: self._features(cell.init_z(x)), x).shape[-1]
        self.head = nnx.Linear(features, num_classes, rngs=rngs)

    def _features(self, z):
        if z.ndim > 2 and self.pool > 1:
            window = (self.pool,) * (z.ndim - 2)
            z = nnx.avg_pool(z, window, strides=window, padding="SAME")
        return z.reshape(z.shape[0], -1)

    def __call__(self, x, *, maxiter=None):
        z, stats = self.core(x, maxiter=maxiter)
        return self.head(self._features(z)), stats
