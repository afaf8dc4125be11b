"""A convolution whose transpose XLA:CPU runs fast inside loops (for DEQ cells).

``jax.lax.conv_general_dilated``'s transpose with respect to its input (what a VJP, and so every
iteration of an implicit backward solve, computes) is a convolution with the kernel's input and
output axes swapped *in the dimension numbers*. Inside a ``while`` loop XLA:CPU runs such a
convolution (kernel spec ``...OI``) many times slower than the same convolution on a kernel that
is physically transposed (a forward convolution with an ``...OI`` spec is just as slow, so the
slowness is the spec, not the transpose; the measurements are in ``benchmarks/README.md``,
section "speed", "Conv x Implicit on CPU"). Outside loops the layout pass hides it.

:func:`conv_general_dilated` has the signature of ``jax.lax.conv_general_dilated`` (pass it to
``flax.nnx.Conv(conv_general_dilated=...)``) and the same values and derivatives; only its JVP
rule differs: the tangent ``conv(dx, k)`` is written as a convolution of ``dx`` with the
physically transposed kernel under swapped dimension numbers, so that the *transpose* (the VJP)
is a convolution with a standard ``...IO`` spec. Forward and reverse mode, and higher orders,
work as for the plain convolution.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from jdeq.models import conv_general_dilated
  >>> conv = nnx.Conv(2, 3, (3, 3), conv_general_dilated=conv_general_dilated, rngs=nnx.Rngs(0))
  >>> conv(jnp.ones((1, 5, 5, 2))).shape
  (1, 5, 5, 3)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_general_dilated", "conv_same", "flip_transpose"]


def _swap_rhs(dn: lax.ConvDimensionNumbers) -> lax.ConvDimensionNumbers:
    out_dim, in_dim, *spatial = dn.rhs_spec
    return lax.ConvDimensionNumbers(dn.lhs_spec, (in_dim, out_dim, *spatial), dn.out_spec)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _conv(lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, dn, precision):
    return lax.conv_general_dilated(lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, dn,
                                    precision=precision)


@_conv.defjvp
def _conv_jvp(strides, padding, lhs_dilation, rhs_dilation, dn, precision, primals, tangents):
    lhs, rhs = primals
    dlhs, drhs = tangents
    out = _conv(lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, dn, precision)
    # conv(dlhs, rhs) on the physically transposed kernel with the in/out axes swapped back in the
    # spec: the same linear map, whose transpose is a conv with a standard (...IO) kernel spec.
    rhs_t = jnp.swapaxes(rhs, dn.rhs_spec[0], dn.rhs_spec[1])
    dout = lax.conv_general_dilated(dlhs, rhs_t, strides, padding, lhs_dilation, rhs_dilation, _swap_rhs(dn),
                                    precision=precision)
    dout = dout + lax.conv_general_dilated(lhs, drhs, strides, padding, lhs_dilation, rhs_dilation, dn,
                                           precision=precision)
    return out, dout


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, out_sharding=None):
    """``jax.lax.conv_general_dilated`` with a JVP whose transpose is fast in XLA:CPU loops.

    Every argument means what it means in ``jax.lax.conv_general_dilated``. Only the defaults
    of ``feature_group_count``, ``batch_group_count``, ``preferred_element_type`` and
    ``out_sharding`` take the fast path; other values call ``jax.lax.conv_general_dilated`` as is.

    Returns:
      The convolution, equal to ``jax.lax.conv_general_dilated``'s.
    """
    nd = lhs.ndim - 2
    if feature_group_count != 1 or batch_group_count != 1 or preferred_element_type is not None or (
            out_sharding is not None):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count, precision=precision,
            preferred_element_type=preferred_element_type)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if not isinstance(padding, str):
        padding = tuple(tuple(p) for p in padding)
    as_tuple = lambda v: tuple(v) if v is not None else (1,) * nd  # noqa: E731
    if isinstance(precision, list):
        precision = tuple(precision)
    return _conv(lhs, rhs, tuple(window_strides), padding, as_tuple(lhs_dilation), as_tuple(rhs_dilation), dn,
                 precision)


def conv_same(z, kernel, precision=None):
    """Stride-1 zero-padded ("SAME") convolution of ``(batch, *spatial, C_in)`` maps with a
    ``(*window, C_in, C_out)`` kernel (fast transpose, see :func:`conv_general_dilated`)."""
    nd = kernel.ndim - 2
    sp = "HWD"[:nd]
    dn = ("N" + sp + "C", sp + "IO", "N" + sp + "C")
    return conv_general_dilated(z, kernel, (1,) * nd, "SAME", dimension_numbers=dn, precision=precision)


def flip_transpose(kernel):
    """The kernel of the adjoint of a stride-1 'SAME' convolution with an odd window: spatially
    flipped, input and output channels swapped (``conv_same(v, flip_transpose(k))`` is
    ``K^T v``)."""
    nd = kernel.ndim - 2
    return jnp.swapaxes(jnp.flip(kernel, axis=tuple(range(nd))), -1, -2)
