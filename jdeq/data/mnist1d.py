"""MNIST-1D (Greydanus 2020), generated locally from the ``mnist1d`` package's templates.

``mnist1d.data.get_dataset`` downloads a pickle by default; this module never does. It calls the
package's own generator, ``mnist1d.data.make_dataset``, which builds every example offline from
the ten 12-point digit templates (``get_templates``) by random padding, dilation, scaling,
translation, correlated and iid noise, shear and resampling to length 40. With the package's
default arguments (``get_dataset_args``: 5000 examples, 80/20 split, seed 42) this is the
dataset of the paper: 4000 training and 1000 test signals.

``make_dataset`` seeds NumPy's and Python's *global* random generators; this module saves and
restores both around the call, so loading has no side effect on the caller's randomness. Results
are cached per argument set within the process.

Example:
  >>> from jdeq.data import mnist1d
  >>> data = mnist1d.load()
  >>> data.train["inputs"].shape, data.test["inputs"].shape
  ((4000, 40, 1), (1000, 40, 1))

Reference: Greydanus, "Scaling down Deep Learning" (MNIST-1D), arXiv:2011.14439, 2020; the
``mnist1d`` package (Greydanus & Steinbach). Published test accuracies on the default set:
logistic regression 32%, MLP 68%, CNN 94%, GRU 91%, human expert 96% (:data:`PUBLISHED`).
"""

from __future__ import annotations

import functools
import random

import numpy as np

from jdeq import _validate as V
from jdeq.data.digits import Splits

__all__ = ["LENGTH", "NUM_CLASSES", "PUBLISHED", "load"]

NUM_CLASSES = 10
LENGTH = 40
PUBLISHED = {"logistic regression": 0.32, "MLP": 0.68, "CNN": 0.94, "GRU": 0.91, "human expert": 0.96}
"""Test accuracies reported for the default MNIST-1D set (Greydanus 2020, README table)."""


@functools.lru_cache(maxsize=4)
def _generate(num_samples: int, train_split: float, seed: int, shuffle_seq: bool):
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("jdeq.data.mnist1d needs the `mnist1d` package: pip install 'jdeq[zoo]'.") from e
    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed, args.shuffle_seq = num_samples, train_split, seed, shuffle_seq
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)  # offline: templates + random transforms, seeded by args.seed
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return (d["x"].astype(np.float32), d["y"].astype(np.int32),
            d["x_test"].astype(np.float32), d["y_test"].astype(np.int32))


def load(*, num_samples: int = 5000, train_split: float = 0.8, seed: int = 42, shuffle_seq: bool = False,
         flat: bool = False) -> Splits:
    """MNIST-1D, generated from the templates (the defaults give the paper's dataset).

    Args:
      num_samples: examples in total (split ``train_split`` / rest).
      train_split: fraction used for training (the first part of the shuffled set).
      seed: the generator's seed (42 is the published dataset).
      shuffle_seq: permute the 40 positions with one fixed permutation (the paper's "shuffled"
        variant, which removes spatial structure).
      flat: inputs ``(n, 40)`` instead of ``(n, 40, 1)`` signals.

    Returns:
      A :class:`jdeq.data.digits.Splits` (float32 standardized signals, int32 labels 0..9);
      indices refer to positions in the generated set.
    """
    V.integer(num_samples, "num_samples", 20)
    V.nonnegative_int(seed, "seed")
    train_split = V.fraction(train_split, "train_split")
    x, y, xt, yt = _generate(int(num_samples), train_split, int(seed), bool(shuffle_seq))
    if not flat:
        x, xt = x[..., None], xt[..., None]
    n = len(y)
    return Splits({"inputs": x, "labels": y}, {"inputs": xt, "labels": yt},
                  np.arange(n), np.arange(n, n + len(yt)), "mnist1d")
