"""Random symbolic arithmetic expressions whose nesting depth is the only thing that varies.

Each example is an expression over the digits ``0-9``, the operators ``+ -`` and parentheses,
written one character per token, e.g. ``"3-(4+(7-2)-5)+1"``. Its *depth* is the maximum
parenthesis nesting depth, and the default label is its exact value, kept in ``[0, 9]``
(Python's ``eval(text)``; see ``target`` below for the other labels).

**Depth is not confounded with size.** All the expressions of one dataset have the same number
of digits (``operands``) and of operators (``operands - 1``); only the parenthesisation changes.
Depth 0 is a flat chain ``a+b-c+...``; depth ``k`` nests exactly ``k`` pairs of parentheses, one
inside the other, e.g. ``a-(b+c-(d-e))+f`` at depth 2. Every pair encloses an operator and
leaves an operand outside it at its own level (no redundant pair such as ``((7))`` or ``(a+b)``
around a whole level), so depth ``k`` needs ``operands >= k + 2``. With ``+`` and ``-`` only, the
nesting is what makes the task hard: the sign of each digit is the product of the signs in front
of the groups that enclose it, a chain of ``k + 1`` dependent steps at depth ``k``.

Tokens: depth ``k`` has ``2 * operands - 1 + 2k`` tokens, right-padded with ``<pad>`` (id 0) to
``length``. When only ``length`` is given, ``operands`` is the largest count that fits the
deepest requested depth, and the default deepest depth is :func:`default_max_depth`.

Targets (``target=``), the choice justified by a sweep in ``docs/arithmetic/task.md``:

- ``"range"`` (default): the exact value, with expressions drawn until their value lies in
  ``[0, 9]`` (rejection sampling), so there are :data:`NUM_CLASSES` = 10 classes;
- ``"value"``: the exact value, unbounded (class = value + 9 * (operands - 1));
- ``"mod10"``: the value mod 10 (the old task; parity-like, hard to learn at this scale).

Example:
  >>> from jdeq.data import arithmetic
  >>> data = arithmetic.generate(1000, operands=7, max_depth=5, seed=0)
  >>> data.tokens.shape, data.labels.shape, int(data.depth.max())
  ((1000, 23), (1000,), 5)
  >>> all(eval(t) == y for t, y in zip(data.text, data.labels))
  True
  >>> train, tests = arithmetic.depth_split(data, train_max_depth=2)  # extrapolation split
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

import numpy as np

from jdeq import _validate as V

__all__ = [
    "NUM_CLASSES",
    "PAD",
    "DEFAULT_OPERANDS",
    "TARGETS",
    "VOCAB",
    "Dataset",
    "by_depth",
    "decode",
    "default_max_depth",
    "depth_split",
    "generate",
    "num_classes",
    "train_test_split",
]

VOCAB: tuple[str, ...] = ("<pad>", *"0123456789", "+", "-", "*", "(", ")")
"""Token ids: ``<pad>`` = 0, digit ``k`` = ``k + 1``, then ``+ - * ( )`` (16 tokens; ``*`` is
kept for stable ids but no longer generated)."""

PAD = 0
NUM_CLASSES = 10
"""Classes of the default target ``"range"`` (values 0..9)."""
TARGETS = ("range", "value", "mod10")
DEFAULT_OPERANDS = 7
"""Digits per expression when neither ``operands`` nor ``length`` is given (depths 0..5)."""

_LUT = np.zeros(256, np.int32)
for _i, _c in enumerate(VOCAB[1:], start=1):
    _LUT[ord(_c)] = _i
_DIGITS = "0123456789"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A set of tokenized expressions (all arrays share the leading axis ``n``).

    Attributes:
      tokens: int32 ``(n, length)``, token ids (see :data:`VOCAB`), right-padded with ``PAD``.
      labels: int32 ``(n,)``, the class of each expression (see the module's targets).
      depth: int32 ``(n,)``, the maximum parenthesis nesting depth.
      text: list of ``n`` strings, the expressions without padding.
      vocab: the vocabulary (token id -> string).
      operands: digits per expression (the same for every example).
      num_classes: number of label classes of the target.
    """

    tokens: np.ndarray
    labels: np.ndarray
    depth: np.ndarray
    text: list
    vocab: tuple = VOCAB
    operands: int = 0
    num_classes: int = NUM_CLASSES

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
        return dataclasses.replace(self, tokens=self.tokens[idx], labels=self.labels[idx],
                                   depth=self.depth[idx], text=[self.text[i] for i in idx])

    def arrays(self) -> dict[str, np.ndarray]:
        """``{"inputs": tokens, "labels": labels, "depth": depth}``, the form ``jdeq.train`` takes."""
        return {"inputs": self.tokens, "labels": self.labels, "depth": self.depth}


def default_max_depth(length: int) -> int:
    """The deepest nesting that fits ``length`` tokens: depth ``d`` needs ``d + 2`` operands,
    hence ``4d + 3`` tokens."""
    return max((length - 3) // 4, 0)


def num_classes(target: str, operands: int) -> int:
    """Number of classes of ``target`` for expressions of ``operands`` digits.

    Args:
      target: one of :data:`TARGETS`.
      operands: digits per expression.

    Returns:
      10 for ``"range"`` and ``"mod10"``; ``18 * operands - 8`` (values ``-9 (operands - 1)``
      .. ``9 operands``) for ``"value"``.
    """
    return 18 * operands - 8 if target == "value" else NUM_CLASSES


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


def _expr(n: int, d: int, rng: random.Random) -> tuple[str, int]:
    """``(text, value)`` of a random expression of ``n`` digits and depth exactly ``d``.

    Depth 0 is a chain of ``n`` digits. Depth ``d > 0``: a chain in which one operand is the
    group ``( E' )``, ``E'`` of ``m`` digits and depth ``d - 1`` with ``d + 1 <= m <= n - 1``
    (an operator inside at every level, an operand outside), at a random position.
    """
    if d == 0:
        items = [(c, int(c)) for c in (_DIGITS[rng.randrange(10)] for _ in range(n))]
    else:
        m = rng.randint(d + 1, n - 1)
        s, v = _expr(m, d - 1, rng)
        items = [(c, int(c)) for c in (_DIGITS[rng.randrange(10)] for _ in range(n - m))]
        items.insert(rng.randrange(len(items) + 1), ("(" + s + ")", v))
    text, value = items[0]
    for s, v in items[1:]:
        plus = rng.random() < 0.5
        text += ("+" if plus else "-") + s
        value += v if plus else -v
    return text, value


def _label(value: int, target: str, operands: int) -> int | None:
    if target == "range":
        return value if 0 <= value <= 9 else None
    if target == "value":
        return value + 9 * (operands - 1)
    return value % 10


def generate(
    n: int,
    *,
    operands: int | None = None,
    length: int | None = None,
    min_depth: int = 0,
    max_depth: int | None = None,
    seed: int = 0,
    depth_weights: Sequence[float] | None = None,
    target: str = "range",
) -> Dataset:
    """Generates ``n`` distinct random expressions with the same digits and operators count.

    Args:
      n: number of examples (all distinct, so any split of the result is duplicate-free).
      operands: digits per expression (>= 1). None: the most that fit ``length`` at
        ``max_depth``, or :data:`DEFAULT_OPERANDS` when ``length`` is None too.
      length: tokens per example after padding (default: the longest expression,
        ``2 * operands - 1 + 2 * max_depth``).
      min_depth, max_depth: range of nesting depths. ``max_depth=None`` means ``operands - 2``
        (or :func:`default_max_depth` ``(length)`` when only ``length`` is given). Depth ``d``
        needs ``operands >= d + 2`` (``d = 0``: one operand suffices).
      seed: the random seed (the result is a deterministic function of all arguments).
      depth_weights: optional relative frequency of each depth in ``[min_depth, max_depth]``
        (default: uniform).
      target: the label, one of :data:`TARGETS` (see the module docstring).

    Returns:
      A :class:`Dataset` with ``tokens`` ``(n, length)``, ``labels`` ``(n,)``, ``depth``
      ``(n,)``, ``text``, ``operands`` and ``num_classes``.

    Example:
      >>> d = generate(4, length=8, seed=1)
      >>> d.tokens.shape, d.operands
      ((4, 8), 3)
    """
    n = V.nonnegative_int(n, "n")
    min_depth = V.nonnegative_int(min_depth, "min_depth")
    seed = V.nonnegative_int(seed, "seed")
    V.one_of(target, "target", TARGETS)
    if max_depth is not None:
        max_depth = V.integer(max_depth, "max_depth", min_depth)
    if length is not None:
        length = V.positive_int(length, "length")
    if operands is not None:
        operands = V.positive_int(operands, "operands")
    elif length is None:
        operands = DEFAULT_OPERANDS
    if max_depth is None:
        max_depth = max(operands - 2 if operands is not None else default_max_depth(length), min_depth)
    max_depth = V.integer(max_depth, "max_depth", min_depth)
    if operands is None:
        operands = (length + 1 - 2 * max_depth) // 2
    need = 2 * max(operands, 1) - 1 + 2 * max_depth
    if length is not None and (need > length or operands < 1):
        raise ValueError(
            f"`max_depth`={max_depth} does not fit in `length`={length}: depth d needs d+2 "
            f"operands and 2*operands-1+2d tokens, so the largest depth is {default_max_depth(length)}."
        )
    if max_depth > 0 and operands < max_depth + 2:
        raise ValueError(f"`max_depth`={max_depth} needs `operands` >= {max_depth + 2}, got {operands}.")
    length = need if length is None else length
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
    budget = 50 * n + 1000
    while len(texts) < n:
        want = n - len(texts)
        for d in np_rng.choice(depths, size=want, p=probs):
            s, v = _expr(operands, int(d), rng)
            y = _label(v, target, operands)
            if y is not None and s not in seen:
                seen.add(s)
                texts.append(s)
                labels.append(y)
                out_depth.append(int(d))
        budget -= want
        if len(texts) < n and budget <= 0:
            raise ValueError(
                f"could not generate `n`={n} distinct expressions of `length`={length} with depths "
                f"{min_depth}..{max_depth} (only {len(texts)} found): lower `n` or raise `length`."
            )
    tokens = np.full((n, length), PAD, np.int32)
    for i, s in enumerate(texts):
        tokens[i, : len(s)] = _LUT[np.frombuffer(s.encode("ascii"), np.uint8)]
    return Dataset(
        tokens=tokens,
        labels=np.asarray(labels, np.int32).reshape(n),
        depth=np.asarray(out_depth, np.int32).reshape(n),
        text=texts,
        operands=operands,
        num_classes=num_classes(target, operands),
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
    test_size = V.nonnegative_int(test_size, "test_size")
    V.nonnegative_int(seed, "seed")
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
    train_max_depth = V.nonnegative_int(train_max_depth, "train_max_depth")
    train = data.take(data.depth <= train_max_depth)
    tests = {d: part for d, part in by_depth(data).items() if d > train_max_depth}
    return train, tests
