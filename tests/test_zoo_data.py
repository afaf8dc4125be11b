"""jdeq.data.digits and jdeq.data.mnist1d: deterministic, split-disjoint, no download."""

import random

import numpy as np
import pytest

from jdeq.data import digits, mnist1d


def test_digits_deterministic_disjoint_stratified():
    a, b, c = digits.load(seed=0), digits.load(seed=0), digits.load(seed=1)
    np.testing.assert_array_equal(a.train["inputs"], b.train["inputs"])
    np.testing.assert_array_equal(a.test_index, b.test_index)
    assert not np.array_equal(a.test_index, c.test_index)
    assert set(a.train_index).isdisjoint(a.test_index)
    assert len(a.train_index) + len(a.test_index) == 1797
    assert a.train["inputs"].shape == (1437, 8, 8, 1) and a.test["inputs"].shape == (360, 8, 8, 1)
    assert a.train["inputs"].dtype == np.float32 and a.train["labels"].dtype == np.int32
    assert 0.0 <= a.train["inputs"].min() and a.train["inputs"].max() <= 1.0
    counts = np.bincount(a.test["labels"], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified: ~36 per class
    assert digits.load(flat=True).train["inputs"].shape == (1437, 64)


def test_digits_errors():
    with pytest.raises(ValueError, match="`test_fraction`"):
        digits.load(test_fraction=1.5)
    with pytest.raises(ValueError, match="`seed`"):
        digits.load(seed=-1)


def test_mnist1d_offline_deterministic_disjoint():
    np.random.seed(123)
    random.seed(123)
    before = (np.random.get_state()[1].copy(), random.getstate())
    a = mnist1d.load(num_samples=300, seed=7)
    after = (np.random.get_state()[1], random.getstate())
    np.testing.assert_array_equal(before[0], after[0])  # global RNG state untouched
    assert before[1] == after[1]
    b = mnist1d.load(num_samples=300, seed=7)
    c = mnist1d.load(num_samples=300, seed=8)
    np.testing.assert_array_equal(a.train["inputs"], b.train["inputs"])
    assert not np.array_equal(a.train["inputs"], c.train["inputs"])
    assert a.train["inputs"].shape == (240, 40, 1) and a.test["inputs"].shape == (60, 40, 1)
    assert set(a.train_index).isdisjoint(a.test_index)
    train_rows = {r.tobytes() for r in a.train["inputs"]}
    assert not any(r.tobytes() in train_rows for r in a.test["inputs"])
    assert set(np.unique(a.train["labels"])) <= set(range(10))
    assert mnist1d.load(num_samples=300, seed=7, flat=True).train["inputs"].shape == (240, 40)


def test_mnist1d_default_is_the_published_size():
    d = mnist1d.load()
    assert d.train["inputs"].shape == (4000, 40, 1) and d.test["inputs"].shape == (1000, 40, 1)
    assert abs(float(d.train["inputs"].std()) - 1.0) < 0.05  # standardized by the generator


def test_mnist1d_errors():
    with pytest.raises(ValueError, match="`num_samples`"):
        mnist1d.load(num_samples=5)
    with pytest.raises(ValueError, match="`train_split`"):
        mnist1d.load(train_split=0.0)
