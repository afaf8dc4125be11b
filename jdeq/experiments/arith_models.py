"""Models of the arithmetic depth study: a recurrent convolutional DEQ cell and matched baselines.

- :class:`ConvGRUCell`: the cell ``z' = (1 - u) * z + u * c`` of a gated recurrent unit whose
  inputs are the states of a token's neighbours (a 1-D convolution of ``kernel`` taps over the
  sequence) and the token embeddings (``x``, injected at every iteration: the "recall" of the
  Deep Thinking nets of Schwarzschild et al. 2021 and Bansal et al. 2022). One application moves
  information by ``kernel - 1`` tokens at most, so the depth of the net bounds how far a sign
  travels inside the expression.
- :class:`SequenceClassifier`: embedding -> a weight-tied cell as ``jdeq.nnx.DEQ`` -> mean over
  the tokens -> linear head. The same parameters run as an unrolled net of any depth
  (``model(tokens, depth=L)``: ``jdeq.nnx.Unrolled`` around the same cell, built per call), so
  the DEQ and the explicit weight-tied net share one parameter set and one code path.

The untied transformer and the LSTM baselines are ``jdeq.models.transformer``'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import jdeq
from jdeq import _validate as V
from jdeq.models.transformer import TransformerCell

__all__ = ["ConvGRUCell", "SequenceClassifier"]


class ConvGRUCell(nnx.Module):
    """A convolutional GRU over the token axis with input injection.

    ``f(z, x)`` with ``z`` ``(batch, length, D)`` and ``x = (emb, valid)``: ``n = [z shifted by
    each tap, emb]``, ``u = sigmoid(W_u n)``, ``r = sigmoid(W_r n)``, ``c = tanh(W_c [r * z-taps,
    emb])``, a carried state ``m = sum_k softmax(W_a n)_k * tap_k`` (a learned choice of
    neighbour), and ``f = valid * ((1 - u) * m + u * c)``. Padding positions stay 0. With
    ``kernel=2`` and ``m`` the left neighbour, the fixed point over the sequence is exactly a GRU
    read left to right (the carry is the GRU's memory path; interpolating with ``z`` itself would
    leave a plain tanh recurrence at the fixed point, which did not learn the task).

    Args:
      features: state width ``D``.
      kernel: taps over the sequence: 1 (the left neighbour only: ``f`` at a token reads no
        state of its own, so the fixed point is exactly a GRU read left to right, and plain
        iteration reaches it in as many steps as there are tokens: the Jacobian is strictly
        lower triangular), 2 (causal: the token and its left neighbour) or 3 (both neighbours).
      rngs: ``nnx.Rngs``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> cell = ConvGRUCell(8, rngs=nnx.Rngs(0))
      >>> x = (jnp.ones((2, 5, 8)), jnp.ones((2, 5)))
      >>> cell(cell.init_z(x), x).shape
      (2, 5, 8)
    """

    def __init__(self, features: int, *, kernel: int = 3, rngs: nnx.Rngs):
        V.positive_int(features, "features")
        V.one_of(kernel, "kernel", (1, 2, 3))  # 1, 2: causal
        self.features, self.kernel = features, kernel
        n_in = (kernel + 1) * features
        self.gates = nnx.Linear(n_in, (2 + kernel) * features, rngs=rngs)
        self.cand = nnx.Linear(n_in, features, rngs=rngs)

    def _taps(self, z):
        left = jnp.pad(z, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        taps = [left] if self.kernel == 1 else [left, z]
        if self.kernel == 3:
            taps.append(jnp.pad(z, ((0, 0), (0, 1), (0, 0)))[:, 1:])
        return taps

    def __call__(self, z, x):
        emb, valid = x
        taps = self._taps(z)
        n = jnp.concatenate([*taps, emb], -1)
        g = self.gates(n)
        u, r = jax.nn.sigmoid(g[..., : self.features]), jax.nn.sigmoid(g[..., self.features : 2 * self.features])
        a = jax.nn.softmax(g[..., 2 * self.features :].reshape(*z.shape, self.kernel), -1)
        carry = sum(a[..., k] * t for k, t in enumerate(taps))
        c = jnp.tanh(self.cand(jnp.concatenate([*(r * t for t in taps), emb], -1)))
        return valid[..., None] * ((1 - u) * carry + u * c)

    def init_z(self, x):
        """Zeros of the embeddings' shape."""
        return jnp.zeros_like(x[0])


class SequenceClassifier(nnx.Module):
    """Token embedding -> weight-tied cell (DEQ, or unrolled ``depth`` times) -> mean pool -> head.

    Args:
      vocab_size, num_classes: token ids and classes.
      length: maximum number of tokens (position table).
      features: width.
      cell: ``"convgru"`` (:class:`ConvGRUCell`, ``kernel`` taps) or ``"transformer"``
        (``jdeq.models.TransformerCell`` with ``num_heads`` heads).
      solver, gradient: the DEQ's solver and gradient.
      kernel, num_heads: options of the cell.
      readout: ``"mean"`` (mean of the states over the tokens) or ``"last"`` (the last token's
        state: with a causal cell, the only one that has seen the whole expression).
      rngs: ``nnx.Rngs``.

    Call: ``logits, stats = model(tokens, *, maxiter=None, depth=None, z0=None,
    return_state=False)``: the DEQ with a run-time ``maxiter``, or, with ``depth=L`` (static),
    the same cell unrolled ``L`` times; ``z0`` starts the solve elsewhere (path independence);
    ``return_state=True`` returns ``(logits, stats, z)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> m = SequenceClassifier(16, 10, length=9, features=8, rngs=nnx.Rngs(0))
      >>> logits, stats = m(jnp.ones((3, 9), jnp.int32), maxiter=4)
      >>> logits.shape
      (3, 10)
    """

    def __init__(self, vocab_size: int, num_classes: int, *, length: int, features: int = 32,
                 cell: str = "convgru", solver=jdeq.Anderson(tol=1e-3, maxiter=30), gradient=jdeq.Phantom(steps=5),
                 kernel: int = 3, num_heads: int = 4, readout: str = "mean", pad_id: int = 0, rngs: nnx.Rngs):
        V.one_of(readout, "readout", ("mean", "last"))
        V.one_of(cell, "cell", ("convgru", "transformer"))
        self.pad_id, self.readout_kind = pad_id, readout
        self.tok = nnx.Embed(vocab_size, features, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (length, features)))
        if cell == "convgru":
            c = ConvGRUCell(features, kernel=kernel, rngs=rngs)
        else:
            c = TransformerCell(features, num_heads, rngs=rngs)
        self.deq = jdeq.nnx.DEQ(c, solver=solver, gradient=gradient)
        self.head = nnx.Linear(features, num_classes, rngs=rngs)

    def inject(self, tokens):
        """``(emb, valid)``: the cell's input for ``tokens``."""
        valid = (tokens != self.pad_id).astype(jnp.float32)
        return self.tok(tokens) + self.pos[: tokens.shape[1]], valid

    def readout(self, z, valid):
        """Logits from the states: mean over the valid tokens (or the last token's state), then the head."""
        w = valid[..., None]
        if self.readout_kind == "last":
            last = jnp.maximum(valid.sum(1).astype(jnp.int32) - 1, 0)
            return self.head(jnp.take_along_axis(z, last[:, None, None], axis=1)[:, 0])
        return self.head((z * w).sum(1) / jnp.maximum(w.sum(1), 1.0))

    def __call__(self, tokens, *, maxiter=None, depth: int | None = None, z0=None, return_state: bool = False):
        x = self.inject(tokens)
        if depth is None:
            z, stats = self.deq(x, z0, maxiter=maxiter)
        else:
            z, stats = jdeq.nnx.Unrolled(self.deq.cell, depth=depth)(x, z0)
        logits = self.readout(z, x[1])
        return (logits, stats, z) if return_state else (logits, stats)
