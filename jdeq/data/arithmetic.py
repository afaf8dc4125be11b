"""Random symbolic arithmetic expressions mod 10, with a controllable nesting depth.

Each example is an expression over the digits ``0-9``, the operators ``+ - *`` and parentheses,
written one character per token, e.g. ``"3*(4-(7+2)*5)+1"``. Its label is its value mod 10
(Python's ``eval(text) % 10``; arithmetic in Z/10 is exact, so every subexpression has a value),
and its *depth* is the maximum parenthesis nesting depth. Deeper expressions need more sequential
computation to evaluate, which makes the task a small probe of a model's effective depth (the
"infinite depth" of a deep equilibrium model).

Every expression has exactly the same number of tokens. Each production of the grammar
``E -> digit | E op E | ( E )`` keeps the length odd, so for an even ``length`` the expression
has ``length - 1`` tokens and one ``<pad>`` token (id 0) follows it.

How the depth is controlled: the depth of each example is drawn first (uniformly over
``[min_depth, max_depth]``, or from ``depth_weights``), then an expression of exactly that
depth and length is built top-down. An expression of depth ``d > 0`` is a chain
``operand op operand op ...`` with one *deep* operand ``( E' )``, ``E'`` of depth ``d - 1`` and
a random odd length, plus other operands filling the remaining budget: single digits, or
parenthesized groups of a random depth ``<= d``. So each depth is hit exactly, at any fixed
length that can hold it (depth ``d`` needs ``2d + 1 <= length``). Up to
:func:`default_max_depth` (7 for length 32) every parenthesis pair encloses an operator; deeper
expressions need redundant pairs such as ``((7))``, since the length is fixed.

Example:
  >>> from jdeq.data import arithmetic
  >>> data = arithmetic.generate(1000, length=32, max_depth=6, seed=0)
  >>> data.tokens.shape, data.labels.shape, int(data.depth.max())
  ((1000, 32), (1000,), 6)
  >>> all(eval(t) % 10 == y for t, y in zip(data.text, data.labels))
  True
  >>> train, tests = arithmetic.depth_split(data, train_max_depth=3)  # extrapolation split
"""

from __future__ import annotations

import dataclasses
import numbers
import random
from typing import Sequence

import numpy as np

__all__ = [
    "PAD",
    "VOCAB",
    "Dataset",
    "by_depth",
    "decode",
    "default_max_depth",
    "depth_split",
    "generate",
    "train_test_split",
]

VOCAB: tuple[str, ...] = ("<pad>", *"0123456789", "+", "-", "*", "(", ")")
"""Token ids: ``<pad>`` = 0, digit ``k`` = ``k + 1``, then ``+ - * ( )`` (16 tokens)."""

PAD = 0
NUM_CLASSES = 10

_LUT = np.zeros(256, np.int32)
for _i, _c in enumerate(VOCAB[1:], start=1):
    _LUT[ord(_c)] = _i
_DIGITS = "0123456789"
_OPS = "+-*"
_GROUP_PROB = 0.3  # chance that a filler operand is a parenthesized group rather than a digit


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A set of tokenized expressions (all arrays share the leading axis ``n``).

    Attributes:
      tokens: int32 ``(n, length)``, token ids (see :data:`VOCAB`), right-padded with ``PAD``.
      labels: int32 ``(n,)``, the value of the expression mod 10.
      depth: int32 ``(n,)``, the maximum parenthesis nesting depth.
      text: list of ``n`` strings, the expressions without padding.
      vocab: the vocabulary (token id -> string).
    """

    tokens: np.ndarray
    labels: np.ndarray
    depth: np.ndarray
    text: list
    vocab: tuple = VOCAB

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def length(self) -> int:
        """Number of tokens per example (with padding)."""
        return int(self.tokens.shape[1])

    def take(self, indices) -> "Dataset":
        """The examples at ``indices`` (an int array or a boolean mask), as a new Dataset."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return Dataset(
            tokens=self.tokens[idx],
            labels=self.labels[idx],
            depth=self.depth[idx],
            text=[self.text[i] for i in idx],
            vocab=self.vocab,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """``{"inputs": tokens, "labels": labels, "depth": depth}``, the form ``jdeq.train`` takes."""
        return {"inputs": self.tokens, "labels": self.labels, "depth": self.depth}


def default_max_depth(length: int) -> int:
    """The largest depth at which every parenthesis pair can still enclose an operator.

    A depth-``d`` expression without redundant parentheses, ``a+(b+(c+...(y+z)))``, needs
    ``4d + 3`` tokens. Deeper ones, up to ``(length - 1) // 2`` (a lone digit in ``d`` pairs of
    parentheses), may be asked for explicitly; they contain redundant pairs such as ``((7))``.
    """
    n = length if length % 2 else length - 1
    return max((n - 3) // 4, 0)


def decode(tokens) -> str:
    """The text of one row of token ids (padding dropped)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"`tokens` must be one row of int token ids, got dtype {tokens.dtype} and shape {tokens.shape}.")
    bad = tokens[(tokens < 0) | (tokens >= len(VOCAB))]
    if bad.size:
        raise ValueError(f"`tokens` holds ids outside the vocabulary [0, {len(VOCAB)}): {bad.tolist()}.")
    return "".join(VOCAB[int(t)] for t in tokens if int(t) != PAD)


# ----------------------------------------------------------------------------- generation


def _chain_value(vals: Sequence[int], ops: Sequence[str]) -> int:
    """Value mod 10 of ``v0 op1 v1 op2 v2 ...`` with ``*`` binding tighter, left to right."""
    total, sign, term = 0, 1, vals[0]
    for op, v in zip(ops, vals[1:]):
        if op == "*":
            term = term * v % 10
        else:
            total += sign * term
            sign, term = (1 if op == "+" else -1), v
    return (total + sign * term) % 10


def _chain(operands: list, rng: random.Random) -> tuple[str, int]:
    """Joins ``(text, value)`` operands with random operators."""
    ops = [_OPS[rng.randrange(3)] for _ in range(len(operands) - 1)]
    parts = [operands[0][0]]
    for op, (s, _) in zip(ops, operands[1:]):
        parts.append(op)
        parts.append(s)
    return "".join(parts), _chain_value([v for _, v in operands], ops)


def _digit(rng: random.Random) -> tuple[str, int]:
    v = rng.randrange(10)
    return _DIGITS[v], v


def _odd_between(lo: int, hi: int, rng: random.Random) -> int:
    """A uniformly random odd number in ``[lo, hi]`` (``lo`` odd, ``lo <= hi``)."""
    return lo + 2 * rng.randrange((hi - lo) // 2 + 1)


def _expr(n: int, d: int, rng: random.Random) -> tuple[str, int]:
    """A random expression of exactly ``n`` tokens (odd) and depth exactly ``d`` (2d+1 <= n).

    Whenever the budget allows (``n >= 4d + 3``) every parenthesis pair encloses an operator at
    its own level; shorter budgets fall back to redundant parentheses such as ``((7))``.
    """
    if d == 0:
        return _chain([_digit(rng) for _ in range((n + 1) // 2)], rng)
    # The deep operand "( E' )" with E' of depth d - 1, of odd size s: leave room for at least
    # one more operand (s <= n - 2) and for an operator at every level inside (s >= 4d + 1).
    if n - 2 >= 4 * d + 1:
        size = _odd_between(4 * d + 1, n - 2, rng)
    elif n - 2 >= 2 * d + 1:
        size = _odd_between(2 * d + 1, n - 2, rng)
    else:
        size = n
    s, v = _expr(size - 2, d - 1, rng)
    deep = ("(" + s + ")", v)
    others = []
    left = n - size  # even: each filler is "op operand" of even length
    while left > 0:
        if left >= 6 and rng.random() < _GROUP_PROB:
            fill = 2 * rng.randint(3, left // 2)  # operand "( E )" of fill - 1 >= 5 tokens
            e = rng.randint(1, min(d, max(1, (fill - 2) // 4)))
            s, v = _expr(fill - 3, e - 1, rng)
            others.append(("(" + s + ")", v))
        else:
            fill = 2
            others.append(_digit(rng))
        left -= fill
    others.insert(rng.randrange(len(others) + 1), deep)
    return _chain(others, rng)


def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return int(value)


def generate(
    n: int,
    *,
    length: int = 32,
    min_depth: int = 0,
    max_depth: int | None = None,
    seed: int = 0,
    depth_weights: Sequence[float] | None = None,
) -> Dataset:
    """Generates ``n`` distinct random expressions of a fixed token length.

    Args:
      n: number of examples (all distinct, so any split of the result is duplicate-free).
      length: tokens per example (expressions have ``length`` tokens when it is odd, else
        ``length - 1`` followed by one ``<pad>``).
      min_depth, max_depth: range of nesting depths; ``max_depth=None`` means
        :func:`default_max_depth` ``(length)``. Depth ``d`` needs ``2d + 1 <= length``.
      seed: the random seed (the result is a deterministic function of all arguments).
      depth_weights: optional relative frequency of each depth in ``[min_depth, max_depth]``
        (default: uniform).

    Returns:
      A :class:`Dataset` with ``tokens`` ``(n, length)``, ``labels`` ``(n,)`` (``eval(text) %
      10``), ``depth`` ``(n,)`` and ``text``.

    Example:
      >>> d = generate(4, length=8, seed=1)
      >>> d.tokens.shape
      (4, 8)
    """
    n = _check_int("n", n, 0)
    length = _check_int("length", length, 1)
    min_depth = _check_int("min_depth", min_depth, 0)
    seed = _check_int("seed", seed, 0)
    expr_len = length if length % 2 else length - 1
    if expr_len < 1:
        raise ValueError(f"`length` must be >= 1, got {length}.")
    limit = (expr_len - 1) // 2
    if max_depth is None:
        max_depth = max(default_max_depth(length), min_depth)
    max_depth = _check_int("max_depth", max_depth, min_depth)
    if max_depth > limit:
        raise ValueError(
            f"`max_depth`={max_depth} does not fit in `length`={length}: depth d needs 2d+1 "
            f"tokens, so the largest depth is {limit}."
        )
    depths = np.arange(min_depth, max_depth + 1)
    if depth_weights is None:
        probs = np.full(len(depths), 1.0 / len(depths))
    else:
        probs = np.asarray(depth_weights, float)
        if probs.shape != depths.shape or (probs < 0).any() or not probs.sum() > 0:
            raise ValueError(
                f"`depth_weights` must hold {len(depths)} non-negative numbers (one per depth "
                f"{min_depth}..{max_depth}) with a positive sum, got {depth_weights!r}."
            )
        probs = probs / probs.sum()

    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    seen: set[str] = set()
    texts: list[str] = []
    labels: list[int] = []
    out_depth: list[int] = []
    budget = 20 * n + 1000
    while len(texts) < n:
        want = n - len(texts)
        for d in np_rng.choice(depths, size=want, p=probs):
            s, v = _expr(expr_len, int(d), rng)
            if s not in seen:
                seen.add(s)
                texts.append(s)
                labels.append(v)
                out_depth.append(int(d))
        budget -= want
        if len(texts) < n and budget <= 0:
            raise ValueError(
                f"could not generate `n`={n} distinct expressions of `length`={length} with depths "
                f"{min_depth}..{max_depth} (only {len(texts)} found): lower `n` or raise `length`."
            )
    tokens = np.full((n, length), PAD, np.int32)
    if n:
        raw = np.frombuffer("".join(texts).encode("ascii"), np.uint8).reshape(n, expr_len)
        tokens[:, :expr_len] = _LUT[raw]
    return Dataset(
        tokens=tokens,
        labels=np.asarray(labels, np.int32).reshape(n),
        depth=np.asarray(out_depth, np.int32).reshape(n),
        text=texts,
    )


# ----------------------------------------------------------------------------- splits


def train_test_split(data: Dataset, test_size: int, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """A random disjoint split (the expressions of one :func:`generate` call are distinct).

    Args:
      data: the dataset to split.
      test_size: number of test examples.
      seed: seed of the shuffle.

    Returns:
      ``(train, test)``.
    """
    test_size = _check_int("test_size", test_size, 0)
    if test_size > len(data):
        raise ValueError(f"`test_size`={test_size} exceeds the {len(data)} examples.")
    perm = np.random.default_rng(seed).permutation(len(data))
    return data.take(np.sort(perm[test_size:])), data.take(np.sort(perm[:test_size]))


def by_depth(data: Dataset) -> dict[int, Dataset]:
    """``{depth: the examples of that depth}`` for every depth present, in increasing order."""
    return {int(d): data.take(data.depth == d) for d in np.unique(data.depth)}


def depth_split(data: Dataset, train_max_depth: int) -> tuple[Dataset, dict[int, Dataset]]:
    """The depth-extrapolation split: train on depth ``<= train_max_depth``, test deeper.

    Args:
      data: one :func:`generate` result (distinct expressions, so the parts are disjoint).
      train_max_depth: the deepest nesting seen in training.

    Returns:
      ``(train, tests)`` where ``tests`` maps each deeper depth present in ``data`` to its
      examples, so each depth is scored separately.
    """
    train_max_depth = _check_int("train_max_depth", train_max_depth, 0)
    train = data.take(data.depth <= train_max_depth)
    tests = {d: part for d, part in by_depth(data).items() if d > train_max_depth}
    return train, tests
