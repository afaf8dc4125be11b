"""jdeq.data.arithmetic: labels equal Python's eval mod 10, depths, determinism, splits."""

import numpy as np
import pytest

from jdeq.data import arithmetic as A


def _max_depth(text):
    depth = best = 0
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        assert depth >= 0
        best = max(best, depth)
    assert depth == 0
    return best


@pytest.fixture(scope="module")
def data():
    return A.generate(3000, length=32, seed=0)


def test_labels_match_python_eval(data):
    assert all(eval(t) % 10 == y for t, y in zip(data.text, data.labels))  # noqa: S307


def test_shapes_depths_and_tokens(data):
    assert data.tokens.shape == (3000, 32) and data.tokens.dtype == np.int32
    assert data.labels.shape == data.depth.shape == (3000,)
    assert [_max_depth(t) for t in data.text] == data.depth.tolist()
    assert set(data.depth.tolist()) == set(range(A.default_max_depth(32) + 1))
    assert all(len(t) == 31 for t in data.text)
    assert (data.tokens[:, 31] == A.PAD).all() and (data.tokens[:, :31] != A.PAD).all()
    assert all(A.decode(row) == t for row, t in zip(data.tokens[:50], data.text[:50]))
    assert len(set(data.text)) == len(data)


def test_odd_length_has_no_padding_and_deep_requests_fit():
    d = A.generate(10, length=15, min_depth=7, max_depth=7, seed=3)  # all 10 there are
    assert (d.depth == 7).all() and (d.tokens != A.PAD).all()
    assert all(t == "(" * 7 + t[7] + ")" * 7 for t in d.text)  # the only depth-7 shape of 15 tokens
    assert all(eval(t) % 10 == y for t, y in zip(d.text, d.labels))  # noqa: S307


def test_depth_distribution_is_controlled():
    d = A.generate(4000, length=24, min_depth=2, max_depth=4, seed=1, depth_weights=[1, 0, 3])
    counts = np.bincount(d.depth, minlength=5)
    assert counts[0] == counts[1] == counts[3] == 0
    assert 0.7 < counts[4] / len(d) < 0.8


def test_deterministic_by_seed():
    a, b = A.generate(300, length=20, seed=7), A.generate(300, length=20, seed=7)
    c = A.generate(300, length=20, seed=8)
    assert a.text == b.text and (a.tokens == b.tokens).all() and (a.labels == b.labels).all()
    assert a.text != c.text


def test_splits_are_disjoint(data):
    train, test = A.train_test_split(data, 500, seed=0)
    assert len(train) == 2500 and len(test) == 500
    assert not set(train.text) & set(test.text)
    train, tests = A.depth_split(data, train_max_depth=3)
    assert train.depth.max() == 3 and sorted(tests) == list(range(4, A.default_max_depth(32) + 1))
    for d, part in tests.items():
        assert (part.depth == d).all() and not set(part.text) & set(train.text)
    assert len(train) + sum(map(len, tests.values())) == len(data)
    assert sorted(A.by_depth(data)) == sorted(set(data.depth.tolist()))


def test_tiny_space_raises_clearly():
    with pytest.raises(ValueError, match="distinct expressions"):
        A.generate(50, length=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=-1), "`n`"),
        (dict(n=5, length=0), "`length`"),
        (dict(n=5, length=9, max_depth=5), "`max_depth`"),
        (dict(n=5, min_depth=3, max_depth=2), "`max_depth`"),
        (dict(n=5, max_depth=2, depth_weights=[1, 1]), "`depth_weights`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        A.generate(**kwargs)
