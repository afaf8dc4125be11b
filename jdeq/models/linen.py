"""Linen versions of jdeq's cells (for ``jdeq.linen.DEQ``)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdeq.models.mlp import check_dense_cell, check_dense_input

__all__ = ["MLPCell"]


class MLPCell(nn.Module):
    """Linen twin of :class:`jdeq.models.MLPCell`: ``f(z, x) = act(W z + U x + b)``.

    Attributes:
      features: size of the state ``z``.
      w_scale: initial scale of ``W`` (about its spectral radius).
      activation: elementwise nonlinearity.
      dtype: parameter and state dtype.

    Example:
      >>> import jax, jax.numpy as jnp, jdeq
      >>> deq = jdeq.linen.DEQ(jdeq.models.linen.MLPCell(features=16))
      >>> variables = deq.init(jax.random.PRNGKey(0), jnp.ones((4, 3)))
    """

    features: int
    w_scale: float = 0.5
    activation: Callable[[jax.Array], jax.Array] = jnp.tanh
    dtype: Any = jnp.float32

    def __post_init__(self):
        check_dense_cell(None, self.features, self.activation, self.dtype)
        super().__post_init__()

    @nn.compact
    def __call__(self, z, x):
        kernel = self.variables.get("params", {}).get("u", {}).get("kernel")
        check_dense_input("x", x, None if kernel is None else kernel.shape[0])
        check_dense_input("z", z, self.features)
        init = nn.initializers.variance_scaling(self.w_scale**2, "fan_in", "normal")
        wz = nn.Dense(self.features, use_bias=False, kernel_init=init, dtype=self.dtype, param_dtype=self.dtype, name="w")(z)
        ux = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.dtype, name="u")(x)
        return self.activation(wz + ux)

    def init_z(self, x):
        """Zeros of the state shape ``(batch, features)``."""
        check_dense_input("x", x, None)
        return jnp.zeros((x.shape[0], self.features), self.dtype)
