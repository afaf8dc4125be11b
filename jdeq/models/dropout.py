"""Variational dropout for DEQ cells: one mask per forward solve, reused at every iteration.

A fresh dropout mask at every solver iteration would change the map ``f`` from one iteration to
the next, so the iteration would have no fixed point to converge to. Variational dropout draws
one mask per forward pass, outside the solver loop, and the cell multiplies by that same mask at
every iteration: the solve finds the fixed point of one (randomly thinned) cell.

* nnx: :class:`VariationalDropout` stores its mask in a variable of the cell; :func:`reset_dropout`
  draws new masks for every such layer of a model, once per forward, before the solve (the
  nnx DEQ passes the cell's variables, mask included, into the solver as explicit arguments).
* linen, or any pure function: :func:`dropout_mask` draws a mask from a key, to be passed to the
  cell through its input (``x = (x, mask)``).

Reference: Gal & Ghahramani, "A Theoretically Grounded Application of Dropout in Recurrent
Neural Networks", NeurIPS 2016; used in DEQs by Bai et al. 2019.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jdeq import _validate as V

__all__ = ["DropoutMask", "VariationalDropout", "dropout_mask", "reset_dropout"]


def dropout_mask(key, shape: Sequence[int], rate: float, dtype=jnp.float32) -> jax.Array:
    """An inverted-dropout mask: entries ``0`` with probability ``rate``, else ``1 / (1 - rate)``.

    Draw it once per forward pass, outside the solve, and multiply the cell's activation by it at
    every iteration. Give size-1 axes to share the mask along them (e.g. ``(batch, 1, 1, C)`` to
    drop whole channels of an image state).

    Args:
      key: a PRNG key.
      shape: the mask's shape, usually ``(batch, ...)`` (broadcastable to the activation).
      rate: drop probability in [0, 1).
      dtype: the mask's dtype.

    Returns:
      The mask, of ``shape`` and ``dtype`` (all ones when ``rate == 0``).

    Example:
      >>> import jax, jdeq
      >>> m = jdeq.models.dropout_mask(jax.random.key(0), (4, 8), 0.5)
      >>> sorted(set(m.ravel().tolist()))
      [0.0, 2.0]
    """
    V.rate(rate, "rate")
    shape = tuple(int(s) for s in shape)
    if rate == 0:
        return jnp.ones(shape, dtype)
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return keep.astype(dtype) / jnp.asarray(1.0 - rate, dtype)


class DropoutMask(nnx.Variable):
    """The nnx variable type holding a :class:`VariationalDropout` mask (not a parameter)."""


class VariationalDropout(nnx.Module):
    """Dropout whose mask is drawn once per forward and reused at every solver iteration (nnx).

    The layer multiplies its input by a stored mask of shape ``(batch, *shape)``. Call
    :func:`reset_dropout` on the model (or :meth:`reset` on the layer) once per forward pass,
    before the DEQ solve, to draw a new mask; between resets every call (every iteration of the
    solver) uses the same one. Until the first reset the mask is all ones. ``model.eval()``
    (``deterministic=True``) turns the layer into the identity.

    Args:
      shape: the per-example shape of the mask (the activation's shape without the batch axis;
        1 on axes that share one mask entry, e.g. ``(1, 1, C)`` for channel dropout).
      rate: drop probability in [0, 1).
      deterministic: if True, the layer is the identity and :meth:`reset` draws nothing.
      dtype: the mask's dtype.
      rngs: ``nnx.Rngs`` with a ``dropout`` stream (falls back to the default stream).

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> drop = jdeq.models.VariationalDropout((8,), 0.5, rngs=nnx.Rngs(dropout=0))
      >>> drop.reset(4)
      >>> bool((drop(jnp.ones((4, 8))) == drop(jnp.ones((4, 8)))).all())  # same mask
      True

    Reference: Gal & Ghahramani, NeurIPS 2016.
    """

    def __init__(
        self,
        shape: Sequence[int],
        rate: float,
        *,
        deterministic: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        V.rate(rate, "rate")
        try:
            dims = tuple(shape)
        except TypeError:
            dims = None
        if dims is None or isinstance(shape, (str, bytes)) or not all(V.is_int(s) and s >= 1 for s in dims):
            raise V.BadType(f"`shape` must be a sequence of ints >= 1, got {shape!r}.",
                            name="shape", expected="a sequence of ints >= 1", value=shape)
        shape = tuple(int(s) for s in dims)
        self.shape = shape
        self.rate = float(rate)
        self.deterministic = deterministic
        self.dtype = dtype
        self.rngs = rngs
        self.mask = DropoutMask(jnp.ones((1,) + shape, dtype))

    def reset(self, batch: int) -> None:
        """Draws a new mask of shape ``(batch, *shape)`` (nothing when deterministic)."""
        if self.deterministic or self.rate == 0:
            return
        key = self.rngs.dropout() if "dropout" in self.rngs else self.rngs()
        self.mask.set_value(dropout_mask(key, (batch,) + self.shape, self.rate, self.dtype))

    def __call__(self, x):
        if self.deterministic or self.rate == 0:
            return x
        mask = self.mask[...]
        if x.ndim != mask.ndim or (mask.shape[0] not in (1, x.shape[0])):
            raise ValueError(
                f"VariationalDropout: the stored mask has shape {mask.shape}, which does not fit "
                f"the input {x.shape}; call jdeq.models.reset_dropout(model, batch) (or "
                ".reset(batch)) with this batch size before the forward solve."
            )
        return x * mask.astype(x.dtype)


def reset_dropout(module: nnx.Module, batch: int) -> None:
    """Draws a new mask for every :class:`VariationalDropout` inside ``module`` (in place).

    Call it once per forward pass, before the DEQ solve (inside a jitted step is fine: the
    masks are variables of the model). Layers in eval mode (``deterministic=True``) are skipped.

    Args:
      module: any nnx module (a cell, a DEQ, a whole model).
      batch: the batch size of the coming forward pass.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> drop = jdeq.models.VariationalDropout((8,), 0.5, rngs=nnx.Rngs(dropout=0))
      >>> jdeq.models.reset_dropout(drop, 4)
      >>> drop.mask.shape
      (4, 8)
    """
    V.instance(module, "module", nnx.Module, "an nnx.Module")
    V.positive_int(batch, "batch")
    for _, m in nnx.iter_modules(module):
        if isinstance(m, VariationalDropout):
            m.reset(int(batch))
