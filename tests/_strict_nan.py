"""NumPy's array comparisons, made unable to pass on NaN alone (installed by conftest.py).

``np.testing.assert_allclose`` and ``assert_array_equal`` count NaN as equal to NaN, so a test
comparing two computations that both went NaN passes whatever the code computes: one such test
held nothing for a release (``test_reversible``, a reverse sweep that overflowed on both sides).
With this guard, a comparison where both sides are NaN at a common position fails, unless it
says so: ``assert_allclose(..., equal_nan=True)``, for a test where NaN is the expected value.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.testing as npt


def _common_nans(actual, desired) -> int:
    """How many positions are NaN on both sides (0 for non-float or non-broadcastable input,
    which the comparison itself then judges)."""
    try:
        a, d = np.asarray(actual), np.asarray(desired)
        if a.dtype.kind not in "fc" or d.dtype.kind not in "fc":
            return 0
        return int(np.count_nonzero(np.isnan(a) & np.isnan(d)))
    except (TypeError, ValueError):
        return 0


def strict(compare, *, opt_in: bool):
    """``compare`` that raises AssertionError when both sides are NaN at a common position
    (``opt_in``: unless the call passes ``equal_nan=True``)."""

    @functools.wraps(compare)
    def wrapped(actual, desired, *args, **kwargs):
        if not (opt_in and kwargs.get("equal_nan") is True):
            n = _common_nans(actual, desired)
            if n:
                raise AssertionError(
                    f"{compare.__name__}: both sides are NaN at {n} common position(s); such a "
                    "comparison passes whatever the code computes. Compare finite values, or pass "
                    "equal_nan=True to assert_allclose where NaN is the expected result.")
        return compare(actual, desired, *args, **kwargs)

    wrapped.unguarded = compare
    return wrapped


def install() -> None:
    """Replaces the comparisons in ``numpy.testing`` (idempotent)."""
    if not hasattr(npt.assert_allclose, "unguarded"):
        npt.assert_allclose = strict(npt.assert_allclose, opt_in=True)
    if not hasattr(npt.assert_array_equal, "unguarded"):
        npt.assert_array_equal = strict(npt.assert_array_equal, opt_in=False)
