"""The test suite's guard against comparisons that pass on NaN alone (tests/_strict_nan.py)."""

import numpy as np
import pytest


def test_a_comparison_of_two_nans_fails_unless_it_says_so():
    with pytest.raises(AssertionError, match="both sides are NaN at 1 common position"):
        np.testing.assert_allclose([1.0, np.nan], [1.0, np.nan])
    with pytest.raises(AssertionError, match="both sides are NaN at 3 common position"):
        np.testing.assert_array_equal(np.full(3, np.nan, np.float32), np.nan)
    np.testing.assert_allclose([1.0, np.nan], [1.0, np.nan], equal_nan=True)  # NaN expected: said so


def test_other_comparisons_are_numpys_own():
    np.testing.assert_allclose([1.0, 2.0], [1.0, 2.0 + 1e-9])
    np.testing.assert_array_equal(np.arange(3), [0, 1, 2])
    np.testing.assert_array_equal(np.array([True, False]), [True, False])
    with pytest.raises(AssertionError, match="Not equal to tolerance"):  # NaN on one side only
        np.testing.assert_allclose([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(AssertionError, match="Arrays are not equal"):
        np.testing.assert_array_equal([1.0, 2.0], [1.0, 3.0])
