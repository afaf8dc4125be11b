"""Multiscale deep equilibrium models (MDEQ, Bai, Koltun & Kolter 2020), Flax NNX.

The state holds several resolutions at once, a tuple of maps ``(z_0, z_1, ...)`` of shapes
``(batch, *spatial_i, C_i)`` with ``spatial_i = ceil(spatial / 2^i)``; all scales are solved
jointly as one equilibrium (a pytree state of :func:`jdeq.fixed_point`). One application of
the cell:

1. a residual block per scale, ``block="contractive"`` (default) or ``"paper"``:

   - ``"paper"``, the paper's block: ``b_i = GN3(relu(z_i + GN2(conv2(relu(GN1(conv1(z_i)))) + x_i)))``
     with the injection ``x`` at the finest scale only (zeros elsewhere);
   - ``"contractive"``: ``b_i = relu(x_i + conv2(relu(GN1(conv1(z_i)))))``: the skip path
     carries the injection instead of ``z_i``, every scale gets an injection (the classifier
     makes them once, outside the solve, by strided convolutions of the stem's output), and the
     state enters only through ``conv2``, whose scale (``w_scale``) sets the cell's contraction.
     Measured on MNIST-1D (widths 8/16/16, injections at every scale for both): after 150
     training steps the paper's block solved 0.3% of the test examples to tolerance 1e-3 within
     20 Anderson steps (its identity path keeps the cell's Jacobian near 1), the contractive
     block 95%;

2. multiscale fusion, as in the paper: ``s_j = sum_i T_ij(b_i)`` with ``T_jj`` the identity,
   finer-to-coarser ``T_ij`` (``i < j``) a chain of ``j - i`` stride-2 3x3 convolutions
   (GroupNorm, ReLU between), and coarser-to-finer (``i > j``) a 1x1 convolution + GroupNorm,
   then nearest upsampling to the finer grid;
3. post-fusion, as in the paper: ``z_j' = GN(conv1x1(relu(s_j)))``.

Still unlike the paper: no weight normalization or variational dropout inside the cell (both
exist in :mod:`jdeq.models` and can wrap it), no per-scale downsampling stem before the
equilibrium (the stem keeps full resolution), and a small head (1x1 conv, pool, linear) in
place of the paper's HRNet-style classification head.

Every convolution uses :func:`jdeq.models.conv_general_dilated`, whose transpose runs much
faster than ``jax.lax``'s inside XLA:CPU loops (the implicit backward solve; measured in
``benchmarks/README.md``, section "speed").

Normalization is GroupNorm only (stateless), as a DEQ cell needs. Convolutions work on
signals (``spatial_dims=1``, ``(batch, length, C)``) and images (``spatial_dims=2``).

- :class:`MDEQCell`: the cell, ``cell(z, x)`` with ``z`` and ``x`` tuples of maps.
- :class:`MDEQClassifier`: stem (conv + GN + ReLU, the injection), the equilibrium
  (``jdeq.nnx.DEQ``, or the weight-tied ``jdeq.nnx.Unrolled`` with ``depth=L``), and a head
  (per scale a 1x1 conv to twice the width + ReLU, global average pool; concatenated; linear).
  Returns ``(logits, stats)``.

Reference: Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models", NeurIPS 2020.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jdeq import _validate as V
from jdeq._gradients import Implicit
from jdeq.models._conv import conv_general_dilated
from jdeq._solvers import Anderson
from jdeq.nnx import DEQ, Unrolled

__all__ = ["MDEQCell", "MDEQClassifier", "scale_shapes"]


_BLOCKS = ("contractive", "paper")


def _check_widths(widths) -> tuple[int, ...]:
    widths = tuple(widths)
    if not 1 <= len(widths) <= 4 or not all(V.is_int(w) and w >= 1 for w in widths):
        raise ValueError(f"`widths` must be 1 to 4 ints >= 1 (one per scale), got {widths!r}.")
    return widths


def _groups(width: int, num_groups: int) -> int:
    g = math.gcd(width, num_groups)
    return max(g, 1)


def scale_shapes(spatial: Sequence[int], num_scales: int) -> list[tuple[int, ...]]:
    """Spatial shapes of the scales: ``ceil(s / 2^i)`` per axis (what stride-2 'SAME' gives)."""
    shapes, cur = [], tuple(spatial)
    for _ in range(num_scales):
        shapes.append(cur)
        cur = tuple(-(-s // 2) for s in cur)
    return shapes


class _Block(nnx.Module):
    """The residual block at one scale. ``residual=True`` (the paper's):
    ``GN3(relu(z + GN2(conv2(relu(GN1(conv1(z)))) + x)))``; ``residual=False`` (contractive):
    ``relu(x + conv2(relu(GN1(conv1(z)))))``, the state entering only through ``conv2``, whose
    scale (``kernel_init``) sets how strongly it feeds back."""

    def __init__(self, width, *, k, nd, groups, kernel_init, residual, dtype, rngs):
        self.residual = residual
        conv = lambda init: nnx.Conv(width, width, (k,) * nd, padding="SAME", use_bias=False,  # noqa: E731
                                     kernel_init=init, conv_general_dilated=conv_general_dilated,
                                     dtype=dtype, param_dtype=dtype, rngs=rngs)
        gn = lambda: nnx.GroupNorm(width, _groups(width, groups), dtype=dtype, param_dtype=dtype,  # noqa: E731
                                   rngs=rngs)
        self.conv1 = conv(nnx.initializers.variance_scaling(1.0, "fan_in", "normal"))
        self.conv2 = conv(kernel_init)
        self.gn1 = gn()
        if residual:
            self.gn2, self.gn3 = gn(), gn()

    def __call__(self, z, x):
        h = self.conv2(jax.nn.relu(self.gn1(self.conv1(z))))
        if not self.residual:
            return jax.nn.relu(h + x)
        return self.gn3(jax.nn.relu(z + self.gn2(h + x)))


class _Down(nnx.Module):
    """Scale ``i`` -> ``j > i``: ``j - i`` stride-2 3x3 convolutions with GroupNorm."""

    def __init__(self, cin, cout, steps, *, nd, groups, kernel_init, dtype, rngs):
        layers = []
        for s in range(steps):
            c_out = cout if s == steps - 1 else cin
            layers.append(nnx.Conv(cin, c_out, (3,) * nd, strides=(2,) * nd, padding="SAME", use_bias=False,
                                   kernel_init=kernel_init, conv_general_dilated=conv_general_dilated,
                                   dtype=dtype, param_dtype=dtype, rngs=rngs))
            layers.append(nnx.GroupNorm(c_out, _groups(c_out, groups), dtype=dtype, param_dtype=dtype, rngs=rngs))
        self.layers = nnx.List(layers)

    def __call__(self, h):
        n = len(self.layers)
        for i in range(0, n, 2):
            h = self.layers[i + 1](self.layers[i](h))
            if i + 2 < n:
                h = jax.nn.relu(h)
        return h


class _Up(nnx.Module):
    """Scale ``i`` -> finer ``j < i``: 1x1 convolution + GroupNorm, then nearest upsampling."""

    def __init__(self, cin, cout, *, nd, groups, kernel_init, dtype, rngs):
        self.conv = nnx.Conv(cin, cout, (1,) * nd, use_bias=False, kernel_init=kernel_init,
                             conv_general_dilated=conv_general_dilated, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.gn = nnx.GroupNorm(cout, _groups(cout, groups), dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, h, shape):
        h = self.gn(self.conv(h))
        return jax.image.resize(h, shape, method="nearest")


class MDEQCell(nnx.Module):
    """The multiscale DEQ cell: per-scale residual blocks + multiscale fusion, GroupNorm only.

    Args:
      widths: channels per scale, finest first (2-3 scales typical; 1 to 4 allowed).
      spatial_dims: 1 (signals) or 2 (images).
      kernel_size: kernel size of the residual blocks' convolutions.
      num_groups: GroupNorm groups (reduced to ``gcd(width, num_groups)`` per layer).
      w_scale: ``conv2`` and the fusion kernels start with variance ``w_scale^2 / fan_in``
        (small: the cell starts closer to a contraction).
      block: ``"contractive"`` (default) or ``"paper"``, the per-scale residual block (see the
        module docstring).
      dtype: parameter dtype.
      rngs: ``nnx.Rngs``.

    Call: ``cell(z, x)``, ``z`` and ``x`` tuples of one map per scale (finest first), the
    injection ``x_i`` of the shape of ``z_i``. ``init_z(x)`` gives the zero state.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> cell = jdeq.models.MDEQCell((4, 8), rngs=nnx.Rngs(0))
      >>> z, stats = jdeq.nnx.DEQ(cell)((jnp.ones((2, 8, 8, 4)), jnp.ones((2, 4, 4, 8))))
      >>> [a.shape for a in z]
      [(2, 8, 8, 4), (2, 4, 4, 8)]
    """

    def __init__(self, widths: Sequence[int] = (16, 32), *, spatial_dims: int = 2, kernel_size: int = 3,
                 num_groups: int = 4, w_scale: float = 0.5, block: str = "contractive", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.widths = _check_widths(widths)
        V.one_of(block, "block", _BLOCKS)
        V.one_of(spatial_dims, "spatial_dims", (1, 2, 3))
        V.odd_int(kernel_size, "kernel_size")
        V.positive_int(num_groups, "num_groups")
        self.spatial_dims = spatial_dims
        self.dtype = dtype
        init = nnx.initializers.variance_scaling(w_scale**2, "fan_in", "normal")
        post_init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
        kw = dict(nd=spatial_dims, groups=num_groups, kernel_init=init, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([_Block(w, k=kernel_size, residual=block == "paper", **kw) for w in self.widths])
        n = len(self.widths)
        fuse = []
        for j in range(n):
            row = []
            for i in range(n):
                if i < j:
                    row.append(_Down(self.widths[i], self.widths[j], j - i, **kw))
                elif i > j:
                    row.append(_Up(self.widths[i], self.widths[j], **kw))
                else:
                    row.append(None)
            fuse.append(nnx.List(row))
        self.fuse = nnx.List(fuse)
        self.post_convs = nnx.List([
            nnx.Conv(w, w, (1,) * spatial_dims, use_bias=False, kernel_init=post_init,
                     conv_general_dilated=conv_general_dilated, dtype=dtype, param_dtype=dtype, rngs=rngs)
            for w in self.widths
        ])
        self.post = nnx.List(
            [nnx.GroupNorm(w, _groups(w, num_groups), dtype=dtype, param_dtype=dtype, rngs=rngs) for w in self.widths]
        )

    def __call__(self, z, x):
        z, x = tuple(z), tuple(x)
        n = len(self.widths)
        if len(z) != n:
            raise ValueError(f"`z` must hold {n} maps (one per scale), got {len(z)}.")
        if len(x) != n:
            raise ValueError(f"`x` must hold {n} injection maps (one per scale), got {len(x)}.")
        b = [blk(zi, xi) for blk, zi, xi in zip(self.blocks, z, x)]
        out = []
        for j in range(n):
            s = b[j]
            for i in range(n):
                if i < j:
                    s = s + self.fuse[j][i](b[i])
                elif i > j:
                    s = s + self.fuse[j][i](b[i], z[j].shape)
            out.append(self.post[j](self.post_convs[j](jax.nn.relu(s))))
        return tuple(out)

    def init_z(self, x):
        """Zeros of the injections' shapes (one map per scale)."""
        return tuple(jnp.zeros(xi.shape, self.dtype) for xi in x)


class MDEQClassifier(nnx.Module):
    """Stem -> injection pyramid -> multiscale equilibrium (DEQ or weight-tied unrolled) ->
    pooled linear head.

    The stem (3x3 conv + GN + ReLU) makes the finest injection; stride-2 convolutions (+ GN +
    ReLU) make one injection per coarser scale, once per call, outside the solve.

    Args:
      in_channels: input channels (inputs ``(batch, *spatial, in_channels)``).
      num_classes: number of classes.
      widths, spatial_dims, kernel_size, num_groups, w_scale, block: as in :class:`MDEQCell`.
      depth: ``None`` for a DEQ (``jdeq.nnx.DEQ``); an int ``L`` for the explicit weight-tied
        baseline ``jdeq.nnx.Unrolled(cell, depth=L)`` with the same parameters.
      solver, gradient: the DEQ's solver (default ``Anderson(tol=1e-3, maxiter=20)``) and gradient.
      dtype: parameter dtype.
      rngs: ``nnx.Rngs``.

    Call: ``logits, stats = model(x, *, maxiter=None)``.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> model = jdeq.models.MDEQClassifier(1, 10, widths=(4, 8), rngs=nnx.Rngs(0))
      >>> logits, stats = model(jnp.ones((2, 8, 8, 1)))
      >>> logits.shape
      (2, 10)
    """

    def __init__(self, in_channels: int, num_classes: int, *, widths: Sequence[int] = (16, 32),
                 spatial_dims: int = 2, kernel_size: int = 3, num_groups: int = 4, w_scale: float = 0.5,
                 block: str = "contractive", depth: int | None = None, solver=Anderson(tol=1e-3, maxiter=20),
                 gradient=Implicit(),
                 dtype=jnp.float32, rngs: nnx.Rngs):
        widths = _check_widths(widths)
        V.positive_int(num_classes, "num_classes")
        self.stem = nnx.Conv(in_channels, widths[0], (3,) * spatial_dims, padding="SAME",
                             dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.stem_gn = nnx.GroupNorm(widths[0], _groups(widths[0], num_groups), dtype=dtype,
                                     param_dtype=dtype, rngs=rngs)
        self.inject = nnx.List([
            nnx.Conv(widths[i], widths[i + 1], (3,) * spatial_dims, strides=(2,) * spatial_dims, padding="SAME",
                     dtype=dtype, param_dtype=dtype, rngs=rngs)
            for i in range(len(widths) - 1)
        ])
        self.inject_gn = nnx.List([
            nnx.GroupNorm(w, _groups(w, num_groups), dtype=dtype, param_dtype=dtype, rngs=rngs) for w in widths[1:]
        ])
        cell = MDEQCell(widths, spatial_dims=spatial_dims, kernel_size=kernel_size, num_groups=num_groups,
                        w_scale=w_scale, block=block, dtype=dtype, rngs=rngs)
        self.depth = depth
        self.inject_all = block == "contractive"
        self.core = DEQ(cell, solver=solver, gradient=gradient) if depth is None else Unrolled(cell, depth=depth)
        # Pooling a GroupNorm'd map directly would average away its content (with one channel per
        # group every channel mean is the GN bias): a 1x1 conv + ReLU per scale comes first.
        self.head_convs = nnx.List([
            nnx.Conv(w, 2 * w, (1,) * spatial_dims, dtype=dtype, param_dtype=dtype, rngs=rngs) for w in widths
        ])
        self.head = nnx.Linear(2 * sum(widths), num_classes, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def features(self, x, *, maxiter=None):
        """The equilibrium state (tuple of maps) and the solver's stats."""
        inj = [jax.nn.relu(self.stem_gn(self.stem(x)))]
        for conv, gn in zip(self.inject, self.inject_gn):  # the injection pyramid, once per call
            inj.append(jax.nn.relu(gn(conv(inj[-1]))))
        if not self.inject_all:  # the paper's: the input enters at the finest scale only
            inj = inj[:1] + [jnp.zeros_like(a) for a in inj[1:]]
        inj = tuple(inj)
        if self.depth is None:
            return self.core(inj, maxiter=maxiter)
        if maxiter is not None:
            raise ValueError("`maxiter` applies to the DEQ only; this model has a fixed `depth`.")
        return self.core(inj)

    def __call__(self, x, *, maxiter=None):
        z, stats = self.features(x, maxiter=maxiter)
        hs = [jax.nn.relu(conv(zi)) for conv, zi in zip(self.head_convs, z)]
        pooled = jnp.concatenate([h.mean(axis=tuple(range(1, h.ndim - 1))) for h in hs], axis=-1)
        return self.head(pooled), stats
