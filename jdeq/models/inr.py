"""Implicit neural representations (INRs): a network from coordinates to values, fit to one
signal (an image: ``(row, col) -> RGB``).

- :class:`DEQINR`: a DEQ-INR (Huang, Bai & Kolter 2021, "(Implicit)^2: Implicit Layers for
  Implicit Representations"): Gaussian Fourier features of the coordinates (Tancik et al.
  2020), injected once into a sine cell ``z' = sin(W z + x)`` (:class:`SineCell`) solved to its
  fixed point, and a linear readout. With ``num_examples`` it holds a
  ``jdeq.nnx.FixedPointCache`` and a call with the pixels' indices warm-starts each pixel's
  solve from its fixed point at the previous visit (amortized solves).
- Baselines at a chosen parameter count: :class:`SIREN` (Sitzmann et al. 2020: sine
  activations with ``omega_0 = 30`` and its initialization) and :class:`FourierMLP` (a ReLU MLP
  on the same Fourier features).

Every model is called as ``model(coords, index=None) -> (rgb, stats)`` (``stats`` is None for
the explicit baselines), so a benchmark swaps them without other changes.

Example:
  >>> import jax.numpy as jnp, jdeq
  >>> from flax import nnx
  >>> model = jdeq.models.DEQINR(32, num_frequencies=16, num_examples=100, rngs=nnx.Rngs(0))
  >>> rgb, stats = model(jnp.zeros((4, 2)), index=jnp.arange(4))
  >>> rgb.shape, stats.nsteps.shape
  ((4, 3), (4,))
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jdeq._gradients import Implicit
from jdeq._solvers import Anderson
from jdeq import _validate as V
from jdeq.nnx import DEQ, FixedPointCache

__all__ = ["DEQINR", "FixedFeatures", "FourierFeatures", "FourierMLP", "SIREN", "SineCell"]


def _check_int(name: str, value, low: int = 1) -> None:
    V.integer(value, name, low)


class FixedFeatures(nnx.Variable):
    """The frozen frequencies of :class:`FourierFeatures` (not an ``nnx.Param``: not trained,
    not counted by ``jdeq.train.count_params``)."""


class FourierFeatures(nnx.Module):
    """Gaussian Fourier features ``[sin(2 pi B c), cos(2 pi B c)]`` of coordinates ``c``
    (Tancik et al. 2020), ``B`` drawn once from ``N(0, scale^2)`` and frozen.

    Args:
      in_features: coordinate dimension (2 for an image).
      num_frequencies: rows of ``B``; the output has ``2 * num_frequencies`` features.
      scale: standard deviation of ``B`` (higher: finer detail, noisier fits).
      rngs: ``nnx.Rngs`` (draws ``B``).
    """

    def __init__(self, in_features: int, num_frequencies: int, *, scale: float = 10.0, rngs: nnx.Rngs):
        _check_int("in_features", in_features)
        _check_int("num_frequencies", num_frequencies)
        self.in_features = in_features
        self.b = FixedFeatures(scale * jax.random.normal(rngs.params(), (in_features, num_frequencies)))

    @property
    def out_features(self) -> int:
        return 2 * self.b.shape[1]

    def __call__(self, coords):
        if jnp.ndim(coords) != 2 or jnp.shape(coords)[1] != self.in_features:
            raise ValueError(f"`coords` must be (batch, {self.in_features}), got shape {jnp.shape(coords)}.")
        proj = 2 * jnp.pi * coords @ self.b[...]
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class SineCell(nnx.Module):
    """The DEQ-INR cell ``f(z, x) = sin(W z + x)``: ``x`` is the input injection (made once per
    solve outside the loop), so an iteration costs one ``features x features`` matmul. ``sin``
    is 1-Lipschitz, so the cell is contractive while ``||W|| < 1``; ``W`` starts with entries of
    standard deviation ``w_scale / sqrt(features)``.

    Args:
      features: size of the state.
      w_scale: initial scale of ``W`` (about its spectral radius).
      rngs: ``nnx.Rngs``.
    """

    def __init__(self, features: int, *, w_scale: float = 0.5, rngs: nnx.Rngs):
        _check_int("features", features)
        self.features = features
        init = nnx.initializers.variance_scaling(w_scale**2, "fan_in", "normal")
        self.w = nnx.Linear(features, features, use_bias=False, kernel_init=init, rngs=rngs)

    def __call__(self, z, x):
        return jnp.sin(self.w(z) + x)

    def init_z(self, x):
        """Zeros of the state shape ``(batch, features)``."""
        return jnp.zeros((x.shape[0], self.features), x.dtype)


class DEQINR(nnx.Module):
    """A DEQ implicit representation: coordinates -> Fourier features -> injection ``x = U g + b``
    -> ``z* = sin(W z* + x)`` -> linear readout.

    Args:
      features: size of the equilibrium state.
      in_features: coordinate dimension; out_features: output channels (3 for RGB).
      num_frequencies, scale: the :class:`FourierFeatures`.
      num_examples: the number of coordinates of the signal; when given, the model holds a
        ``jdeq.nnx.FixedPointCache`` over them and a call with ``index=`` warm-starts from it.
      solver, gradient: of the ``jdeq.nnx.DEQ`` (default Anderson, tol 1e-4, maxiter 30; implicit).
      w_scale: initial scale of the cell's ``W``.
      rngs: ``nnx.Rngs``.

    Call: ``rgb, stats = model(coords, index=None, **deq_kwargs)`` (``deq_kwargs``: per-call
    options of ``jdeq.nnx.DEQ``, e.g. ``maxiter=``).
    """

    def __init__(
        self,
        features: int,
        *,
        in_features: int = 2,
        out_features: int = 3,
        num_frequencies: int = 64,
        scale: float = 10.0,
        num_examples: int | None = None,
        solver=Anderson(tol=1e-4, maxiter=30),
        gradient=Implicit(),
        w_scale: float = 0.5,
        rngs: nnx.Rngs,
    ):
        _check_int("out_features", out_features)
        self.features = FourierFeatures(in_features, num_frequencies, scale=scale, rngs=rngs)
        self.inject = nnx.Linear(self.features.out_features, features, rngs=rngs)
        cache = FixedPointCache(num_examples, (features,)) if num_examples is not None else None
        self.deq = DEQ(SineCell(features, w_scale=w_scale, rngs=rngs), solver=solver, gradient=gradient, cache=cache)
        self.readout = nnx.Linear(features, out_features, rngs=rngs)

    def __call__(self, coords, index=None, **deq_kwargs):
        x = self.inject(self.features(coords))
        z, stats = self.deq(x, index=index, **deq_kwargs)
        return self.readout(z), stats


class SIREN(nnx.Module):
    """SIREN (Sitzmann et al. 2020): ``depth`` sine layers ``sin(omega_0 (W h + b))`` and a linear
    output; first layer ``W ~ U(-1/in, 1/in)``, the others ``U(-sqrt(6/in)/omega_0, +...)``.

    Args:
      features: hidden width; depth: number of sine layers (>= 1).
      in_features, out_features: coordinate and output dimensions.
      omega_0: the frequency factor (30 in the paper).
      rngs: ``nnx.Rngs``.

    Call: ``rgb, None = model(coords, index=None)`` (``index`` is ignored).
    """

    def __init__(self, features: int, *, depth: int = 3, in_features: int = 2, out_features: int = 3,
                 omega_0: float = 30.0, rngs: nnx.Rngs):
        _check_int("features", features)
        _check_int("depth", depth)
        self.omega_0 = omega_0
        sizes = [in_features] + [features] * depth
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            bound = 1.0 / a if i == 0 else math.sqrt(6.0 / a) / omega_0
            layers.append(nnx.Linear(a, b, kernel_init=nnx.initializers.uniform(2 * bound), rngs=rngs))
            layers[-1].kernel[...] = layers[-1].kernel[...] - bound  # uniform(s) draws [0, s): center it
        self.layers = nnx.List(layers)
        self.out = nnx.Linear(features, out_features, rngs=rngs)

    def __call__(self, coords, index=None):
        h = coords
        for layer in self.layers:
            h = jnp.sin(self.omega_0 * layer(h))
        return self.out(h), None


class FourierMLP(nnx.Module):
    """A ReLU MLP on Gaussian Fourier features (Tancik et al. 2020), the explicit counterpart of
    :class:`DEQINR` (same features, ``depth`` ReLU layers instead of the equilibrium).

    Call: ``rgb, None = model(coords, index=None)`` (``index`` is ignored).
    """

    def __init__(self, features: int, *, depth: int = 2, in_features: int = 2, out_features: int = 3,
                 num_frequencies: int = 64, scale: float = 10.0, rngs: nnx.Rngs):
        _check_int("features", features)
        _check_int("depth", depth)
        self.features = FourierFeatures(in_features, num_frequencies, scale=scale, rngs=rngs)
        sizes = [self.features.out_features] + [features] * depth
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nnx.Linear(features, out_features, rngs=rngs)

    def __call__(self, coords, index=None):
        h = self.features(coords)
        for layer in self.layers:
            h = jax.nn.relu(layer(h))
        return self.out(h), None
