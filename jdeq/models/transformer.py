"""Sequence models for the depth study (Flax NNX): a transformer-block DEQ cell and baselines.

- :class:`TransformerBlock`: a standard pre-norm block, ``h + attn(LN h)`` then ``h + mlp(LN h)``.
- :class:`TransformerCell`: the DEQ cell ``f(z, x) = LN(block(z + x))``, input injection of the
  token embeddings ``x``; LayerNorm only (stateless), so it can be iterated.
- :class:`TiedTransformerClassifier`: embedding -> ``jdeq.nnx.DEQ(cell)`` (``depth=None``) or
  ``jdeq.nnx.Unrolled(cell, depth=L)`` -> masked mean pooling -> linear head; returns
  ``(logits, stats)``.
- :class:`TransformerClassifier`: the untied standard transformer (``num_layers`` blocks).
- :class:`LSTMClassifier`: an LSTM (``nnx.RNN(nnx.OptimizedLSTMCell)``) reading left to right.

Every classifier takes int tokens ``(batch, length)`` with ``pad_id`` padding.

References: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019 (the DEQ transformer);
Xiong et al., "On Layer Normalization in the Transformer Architecture", ICML 2020 (pre-norm).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jdeq import _validate as V
from jdeq._gradients import Implicit
from jdeq._solvers import Anderson
from jdeq.nnx import DEQ, Unrolled

__all__ = [
    "LSTMClassifier",
    "TiedTransformerClassifier",
    "TransformerBlock",
    "TransformerCell",
    "TransformerClassifier",
]


def _check_features(features: int, num_heads: int) -> None:
    V.positive_int(features, "features")
    if not V.is_int(num_heads) or num_heads < 1 or features % num_heads:
        raise ValueError(f"`num_heads` must divide `features`={features}, got {num_heads!r}.")


def _key_mask(valid):
    """``(batch, 1, 1, length)`` boolean attention mask: every query sees the valid keys."""
    return (valid > 0.5)[:, None, None, :]


class TransformerBlock(nnx.Module):
    """A pre-norm transformer block: ``h += attn(LN(h))``, then ``h += mlp(LN(h))``.

    Args:
      features: model width ``D``.
      num_heads: attention heads (must divide ``features``).
      mlp_ratio: hidden width of the MLP, as a multiple of ``features``.
      dtype: parameter and computation dtype.
      rngs: ``nnx.Rngs`` for initialization.

    Call: ``block(h, valid)`` with ``h`` ``(batch, length, D)`` and ``valid`` ``(batch, length)``
    (1.0 for real tokens, 0.0 for padding; keys at padding are masked out).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> block = TransformerBlock(16, 2, rngs=nnx.Rngs(0))
      >>> block(jnp.ones((2, 5, 16)), jnp.ones((2, 5))).shape
      (2, 5, 16)
    """

    def __init__(self, features: int, num_heads: int, *, mlp_ratio: int = 2, dtype=jnp.float32, rngs: nnx.Rngs):
        _check_features(features, num_heads)
        self.ln_attn = nnx.LayerNorm(features, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads, features, dtype=dtype, param_dtype=dtype, decode=False, keep_rngs=False, rngs=rngs
        )
        self.ln_mlp = nnx.LayerNorm(features, dtype=dtype, param_dtype=dtype, rngs=rngs)
        hidden = mlp_ratio * features
        self.mlp_in = nnx.Linear(features, hidden, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.mlp_out = nnx.Linear(hidden, features, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, h, valid):
        a = self.ln_attn(h)
        h = h + self.attn(a, mask=_key_mask(valid), deterministic=True)
        return h + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln_mlp(h))))


class TransformerCell(nnx.Module):
    """DEQ cell for sequences: ``f(z, x) = LN(block(z + emb, valid))``.

    ``x = (emb, valid)``: the token embeddings ``(batch, length, D)`` injected at every
    iteration, and the padding mask ``(batch, length)`` as floats (1 = token, 0 = padding; a
    float so that it can travel through the solver's differentiable arguments). The final
    LayerNorm keeps the state bounded, which helps the iteration settle. No state changes during a
    call (LayerNorm only, no dropout), as a DEQ cell must.

    Args:
      features, num_heads, mlp_ratio, dtype, rngs: as in :class:`TransformerBlock`.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> cell = TransformerCell(16, 2, rngs=nnx.Rngs(0))
      >>> x = (jnp.ones((2, 5, 16)), jnp.ones((2, 5)))
      >>> z, stats = jdeq.nnx.DEQ(cell)(x)
    """

    def __init__(self, features: int, num_heads: int, *, mlp_ratio: int = 2, dtype=jnp.float32, rngs: nnx.Rngs):
        self.features = features
        self.dtype = dtype
        self.block = TransformerBlock(features, num_heads, mlp_ratio=mlp_ratio, dtype=dtype, rngs=rngs)
        self.ln_out = nnx.LayerNorm(features, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, z, x):
        emb, valid = x
        return self.ln_out(self.block(z + emb, valid))

    def init_z(self, x):
        """Zeros of the embeddings' shape ``(batch, length, D)``."""
        return jnp.zeros_like(x[0], dtype=self.dtype)


class _Embed(nnx.Module):
    """Token + learned position embeddings, and the float padding mask."""

    def __init__(self, vocab_size: int, length: int, features: int, pad_id: int, dtype, rngs: nnx.Rngs):
        self.pad_id = pad_id
        self.length = length
        # Unit-scale embeddings: the injection then outweighs the state inside the cell's
        # LayerNorms, which keeps the iteration contractive at initialization.
        init = nnx.initializers.normal(1.0)
        self.tok = nnx.Embed(vocab_size, features, embedding_init=init, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (length, features), dtype))

    def __call__(self, tokens):
        if tokens.ndim != 2 or tokens.shape[1] > self.length:
            raise ValueError(
                f"`tokens` must have shape (batch, length <= {self.length}), got {tokens.shape}."
            )
        valid = (tokens != self.pad_id).astype(self.pos.dtype)
        return self.tok(tokens) + self.pos[: tokens.shape[1]], valid


def _pool(h, valid):
    """Mean of ``h`` over the valid positions: ``(batch, D)``."""
    w = valid[..., None]
    return (h * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


class TiedTransformerClassifier(nnx.Module):
    """Embedding -> weight-tied transformer cell (DEQ or unrolled) -> mean pool -> linear head.

    Args:
      vocab_size: number of token ids.
      num_classes: number of output classes.
      length: maximum sequence length (size of the position table).
      features: model width.
      num_heads: attention heads.
      mlp_ratio: MLP width multiple.
      depth: ``None`` for a DEQ (``jdeq.nnx.DEQ``), or the number of layers ``L`` of the
        explicit weight-tied baseline ``jdeq.nnx.Unrolled(cell, depth=L)`` (same parameters).
      solver, gradient: the DEQ's solver and gradient (ignored when ``depth`` is set).
      pad_id: the padding token (masked out of attention and pooling).
      dtype: parameter dtype.
      rngs: ``nnx.Rngs``.

    Call: ``logits, stats = model(tokens, maxiter=None)``; ``maxiter`` (DEQ only) overrides the
    solver's budget at run time without recompiling; ``stats`` is a ``jdeq.SolverStats``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = TiedTransformerClassifier(16, 10, length=8, features=16, num_heads=2,
      ...                                   rngs=nnx.Rngs(0))
      >>> logits, stats = model(jnp.ones((3, 8), jnp.int32), maxiter=5)
      >>> logits.shape
      (3, 10)
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        length: int,
        features: int = 64,
        num_heads: int = 4,
        mlp_ratio: int = 2,
        depth: int | None = None,
        solver=Anderson(tol=1e-3, maxiter=30),
        gradient=Implicit(),
        pad_id: int = 0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_features(features, num_heads)
        self.embed = _Embed(vocab_size, length, features, pad_id, dtype, rngs)
        cell = TransformerCell(features, num_heads, mlp_ratio=mlp_ratio, dtype=dtype, rngs=rngs)
        self.depth = depth
        if depth is None:
            self.core = DEQ(cell, solver=solver, gradient=gradient)
        else:
            self.core = Unrolled(cell, depth=depth)
        self.head = nnx.Linear(features, num_classes, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, tokens, *, maxiter=None):
        emb, valid = self.embed(tokens)
        if self.depth is None:
            z, stats = self.core((emb, valid), maxiter=maxiter)
        else:
            if maxiter is not None:
                raise ValueError("`maxiter` applies to the DEQ only; this model has a fixed `depth`.")
            z, stats = self.core((emb, valid))
        return self.head(_pool(z, valid)), stats


class TransformerClassifier(nnx.Module):
    """The untied standard transformer: ``num_layers`` separate pre-norm blocks.

    Args:
      vocab_size, num_classes, length, features, num_heads, mlp_ratio, pad_id, dtype, rngs: as
        in :class:`TiedTransformerClassifier`.
      num_layers: number of blocks (each with its own parameters).

    Call: ``logits = model(tokens)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = TransformerClassifier(16, 10, length=8, features=16, num_heads=2,
      ...                               num_layers=2, rngs=nnx.Rngs(0))
      >>> model(jnp.ones((3, 8), jnp.int32)).shape
      (3, 10)
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        length: int,
        features: int = 64,
        num_heads: int = 4,
        num_layers: int = 4,
        mlp_ratio: int = 2,
        pad_id: int = 0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_features(features, num_heads)
        V.positive_int(num_layers, "num_layers")
        self.embed = _Embed(vocab_size, length, features, pad_id, dtype, rngs)
        self.blocks = nnx.List(
            [TransformerBlock(features, num_heads, mlp_ratio=mlp_ratio, dtype=dtype, rngs=rngs) for _ in range(num_layers)]
        )
        self.ln_out = nnx.LayerNorm(features, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(features, num_classes, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, tokens):
        h, valid = self.embed(tokens)
        for block in self.blocks:
            h = block(h, valid)
        return self.head(_pool(self.ln_out(h), valid))


class LSTMClassifier(nnx.Module):
    """An LSTM reading the tokens left to right; its final state (at the last real token) feeds
    a linear head.

    Args:
      vocab_size, num_classes, pad_id, dtype, rngs: as in :class:`TiedTransformerClassifier`.
      features: embedding width.
      hidden: LSTM state width.

    Call: ``logits = model(tokens)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = LSTMClassifier(16, 10, features=8, hidden=16, rngs=nnx.Rngs(0))
      >>> model(jnp.ones((3, 8), jnp.int32)).shape
      (3, 10)

    Reference: Hochreiter & Schmidhuber, "Long Short-Term Memory", Neural Computation 1997.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        features: int = 64,
        hidden: int = 128,
        pad_id: int = 0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        V.positive_int(hidden, "hidden")
        self.pad_id = pad_id
        self.hidden = hidden
        self.dtype = dtype
        self.embed = nnx.Embed(vocab_size, features, dtype=dtype, param_dtype=dtype, rngs=rngs)
        cell = nnx.OptimizedLSTMCell(features, hidden, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.rnn = nnx.RNN(cell, return_carry=True)
        self.head = nnx.Linear(hidden, num_classes, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, tokens):
        lengths = (tokens != self.pad_id).sum(axis=1)
        zeros = jnp.zeros((tokens.shape[0], self.hidden), self.dtype)
        (_, h), _ = self.rnn(self.embed(tokens), initial_carry=(zeros, zeros), seq_lengths=lengths)
        return self.head(h)
