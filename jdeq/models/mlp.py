"""The MLP cell ``z' = act(W z + U x + b)`` with input injection (Flax NNX)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jdeq import _validate as V

__all__ = ["MLPCell"]


def check_dense_cell(in_features, features, activation, dtype) -> None:
    """Constructor checks shared by the nnx and Linen MLP cells (``in_features=None``: inferred)."""
    if in_features is not None:  # None: inferred from the first input (the Linen cell)
        V.positive_int(in_features, "in_features")
    V.positive_int(features, "features")
    V.callable_(activation, "activation", usage="activation(x) (e.g. jnp.tanh)")
    V.floating_dtype(dtype, "dtype")


def check_dense_input(name: str, x, features) -> None:
    """Trace-time check that ``x`` is a real ``(batch, features)`` array (``features=None``: any)."""
    shape = jnp.shape(x)
    want = features if features is not None else "features"
    if len(shape) != 2:
        raise ValueError(f"`{name}` must be (batch, {want}), got shape {shape}.")
    if features is not None and shape[-1] != features:
        raise ValueError(f"`{name}` must have {features} features (last axis), got shape {shape}.")
    if jnp.iscomplexobj(x):
        raise TypeError(f"`{name}` must be real, got dtype {jnp.result_type(x)}.")


class MLPCell(nnx.Module):
    """A dense DEQ cell with input injection: ``f(z, x) = act(W z + U x + b)``.

    ``W`` starts with entries of standard deviation ``w_scale / sqrt(features)``, so its spectral
    radius is about ``w_scale`` and, with a 1-Lipschitz ``act``, the cell starts contractive.

    Args:
      in_features: size of the input injection ``x``'s last axis.
      features: size of the state ``z``.
      w_scale: initial scale of ``W`` (about its spectral radius).
      activation: elementwise nonlinearity (default ``jnp.tanh``).
      dtype: parameter and state dtype.
      rngs: ``nnx.Rngs`` for initialization.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> cell = jdeq.models.MLPCell(3, 16, rngs=nnx.Rngs(0))
      >>> z, stats = jdeq.nnx.DEQ(cell)(jnp.ones((4, 3)))
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        w_scale: float = 0.5,
        activation: Callable[[jax.Array], jax.Array] = jnp.tanh,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_dense_cell(in_features, features, activation, dtype)
        self.in_features = in_features
        self.features = features
        self.activation = activation
        self.dtype = dtype
        init = nnx.initializers.variance_scaling(w_scale**2, "fan_in", "normal")
        self.w = nnx.Linear(features, features, use_bias=False, kernel_init=init, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.u = nnx.Linear(in_features, features, param_dtype=dtype, dtype=dtype, rngs=rngs)

    def __call__(self, z, x):
        check_dense_input("x", x, self.in_features)
        check_dense_input("z", z, self.features)
        return self.activation(self.w(z) + self.u(x))

    def init_z(self, x):
        """Zeros of the state shape ``(batch, features)``."""
        check_dense_input("x", x, self.in_features)
        return jnp.zeros((x.shape[0], self.features), self.dtype)
