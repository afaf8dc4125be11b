"""scikit-learn's handwritten digits (8x8 images, 10 classes), with a fixed stratified split.

The 1797 images ship inside scikit-learn (``sklearn.datasets.load_digits``): nothing is
downloaded. Pixels (0..16) are scaled to [0, 1].

Example:
  >>> from jdeq.data import digits
  >>> data = digits.load(seed=0)
  >>> data.train["inputs"].shape, data.test["inputs"].shape
  ((1437, 8, 8, 1), (360, 8, 8, 1))

Reference: Alpaydin & Kaynak, "Optical Recognition of Handwritten Digits", UCI ML Repository
1998 (the data behind ``load_digits``).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jdeq import _validate as V

__all__ = ["NUM_CLASSES", "Splits", "load"]

NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Splits:
    """A train/test split of one dataset.

    Attributes:
      train, test: ``{"inputs": float32 array, "labels": int32 (n,)}``, ready for
        :func:`jdeq.train.fit` / :func:`jdeq.train.evaluate`.
      train_index, test_index: int arrays, the examples' positions in the full generated set
        (disjoint).
      name: the dataset's name.
    """

    train: dict
    test: dict
    train_index: np.ndarray
    test_index: np.ndarray
    name: str = ""


@functools.lru_cache(maxsize=1)
def _raw():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("jdeq.data.digits needs scikit-learn: pip install 'jdeq[zoo]'.") from e
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int32)


def load(*, seed: int = 0, test_fraction: float = 0.2, flat: bool = False) -> Splits:
    """The digits with a stratified train/test split drawn from ``seed``.

    Args:
      seed: seed of the split (the same seed always gives the same split).
      test_fraction: fraction of the 1797 examples held out for testing.
      flat: inputs as ``(n, 64)`` vectors instead of ``(n, 8, 8, 1)`` images.

    Returns:
      A :class:`Splits` (float32 inputs in [0, 1], int32 labels 0..9).
    """
    seed = V.nonnegative_int(seed, "seed")
    test_fraction = V.fraction(test_fraction, "test_fraction")
    from sklearn.model_selection import train_test_split

    images, labels = _raw()
    n = len(labels)
    train_idx, test_idx = train_test_split(
        np.arange(n), test_size=test_fraction, random_state=int(seed), stratify=labels
    )
    x = images.reshape(n, 64) if flat else images[..., None]

    def part(idx):
        return {"inputs": x[idx], "labels": labels[idx]}

    return Splits(part(train_idx), part(test_idx), np.asarray(train_idx), np.asarray(test_idx), "digits")
