"""jdeq.data.arithmetic: same digits and operators at every depth, labels equal Python's eval,
depths exact, distinct examples, determinism, splits."""

import re

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


def _no_redundant_pair(text):
    """Every pair encloses an operator at its own level, and no pair wraps a whole level."""
    stack, levels = [], [[]]  # per open level: the characters seen at that level
    for ch in text:
        if ch == "(":
            stack.append(len(levels[-1]))
            levels.append([])
        elif ch == ")":
            inner = levels.pop()
            if not any(c in "+-" for c in inner):
                return False
            levels[-1].append("g")
        else:
            levels[-1].append(ch)
    return all(any(c in "+-" for c in lv) for lv in levels) and all(
        "".join(lv) != "g" for lv in levels
    )


@pytest.fixture(scope="module")
def data():
    return A.generate(3000, operands=7, max_depth=5, seed=0)


def test_labels_match_python_eval_and_are_in_range(data):
    assert all(eval(t) == y for t, y in zip(data.text, data.labels))  # noqa: S307
    assert set(data.labels.tolist()) == set(range(10)) and data.num_classes == A.NUM_CLASSES


def test_same_digits_and_operators_at_every_depth(data):
    for t, d in zip(data.text, data.depth):
        assert sum(c.isdigit() for c in t) == 7 and sum(c in "+-" for c in t) == 6
        assert "*" not in t and len(t) == 13 + 2 * d  # exactly d pairs of parentheses
    assert [_max_depth(t) for t in data.text] == data.depth.tolist()
    assert all(_no_redundant_pair(t) for t in data.text)
    assert set(data.depth.tolist()) == set(range(6)) and data.operands == 7
    flat = [t for t, d in zip(data.text, data.depth) if d == 0]
    assert all(re.fullmatch(r"\d([+-]\d){6}", t) for t in flat)


def test_tokens_and_padding(data):
    assert data.tokens.shape == (3000, 23) and data.tokens.dtype == np.int32
    lengths = (data.tokens != A.PAD).sum(1)
    assert (lengths == 13 + 2 * data.depth).all()
    assert all(A.decode(row) == t for row, t in zip(data.tokens[:50], data.text[:50]))
    assert len(set(data.text)) == len(data)


def test_other_targets():
    v = A.generate(500, operands=5, max_depth=3, seed=2, target="value")
    assert v.num_classes == 82 and all(eval(t) + 36 == y for t, y in zip(v.text, v.labels))  # noqa: S307
    assert v.labels.min() >= 0 and v.labels.max() < 82
    m = A.generate(500, operands=5, max_depth=3, seed=2, target="mod10")
    assert all(eval(t) % 10 == y for t, y in zip(m.text, m.labels))  # noqa: S307
    with pytest.raises(ValueError, match="target"):
        A.generate(5, target="parity")


def test_length_alone_sets_operands_and_default_depth():
    d = A.generate(40, length=8, seed=1)  # default depth (8 - 3) // 4 = 1, so 3 digits
    assert d.operands == 3 and A.default_max_depth(8) == 1 and d.tokens.shape == (40, 8)
    assert set(d.depth.tolist()) == {0, 1}
    assert A.generate(4).operands == A.DEFAULT_OPERANDS


def test_depth_distribution_is_controlled():
    d = A.generate(4000, operands=7, min_depth=2, max_depth=4, seed=1, depth_weights=[1, 0, 3])
    counts = np.bincount(d.depth, minlength=5)
    assert counts[0] == counts[1] == counts[3] == 0
    assert 0.7 < counts[4] / len(d) < 0.8


def test_deterministic_by_seed():
    a, b = A.generate(300, operands=6, seed=7), A.generate(300, operands=6, seed=7)
    c = A.generate(300, operands=6, seed=8)
    assert a.text == b.text and (a.tokens == b.tokens).all() and (a.labels == b.labels).all()
    assert a.text != c.text


def test_splits_are_disjoint(data):
    train, test = A.train_test_split(data, 500, seed=0)
    assert len(train) == 2500 and len(test) == 500
    assert not set(train.text) & set(test.text) and train.operands == 7
    train, tests = A.depth_split(data, train_max_depth=2)
    assert train.depth.max() == 2 and sorted(tests) == [3, 4, 5]
    for d, part in tests.items():
        assert (part.depth == d).all() and not set(part.text) & set(train.text)
    assert len(train) + sum(map(len, tests.values())) == len(data)
    assert sorted(A.by_depth(data)) == sorted(set(data.depth.tolist()))


def test_tiny_space_raises_clearly():
    with pytest.raises(ValueError, match="distinct expressions"):
        A.generate(50, operands=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=-1), "`n`"),
        (dict(n=5, length=0), "`length`"),
        (dict(n=5, operands=0), "`operands`"),
        (dict(n=5, length=9, max_depth=5), "`max_depth`"),
        (dict(n=5, operands=4, max_depth=3), "`operands` >= 5"),
        (dict(n=5, operands=6, length=12), "does not fit"),
        (dict(n=5, min_depth=3, max_depth=2), "`max_depth`"),
        (dict(n=5, operands=4, max_depth=2, depth_weights=[1, 1]), "`depth_weights`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        A.generate(**kwargs)
