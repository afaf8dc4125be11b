"""The deterministic shuffled batch stream of :func:`jdeq.train.fit`."""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

__all__ = ["batch_indices", "batches", "data_size"]


def data_size(data: Mapping[str, np.ndarray], *, name: str = "data") -> int:
    """The shared leading size of a mapping of arrays; a clear error when they disagree."""
    if not isinstance(data, Mapping) or not data:
        raise TypeError(f"`{name}` must be a non-empty mapping of arrays, got {type(data).__name__}.")
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in data.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"the arrays of `{name}` must share a leading axis, got sizes {sizes}.")
    return next(iter(sizes.values()))


def batch_indices(n: int, batch_size: int, step: int, *, seed: int = 0) -> np.ndarray:
    """Indices of the batch at ``step``: epoch ``e = step // (n // batch_size)`` walks a
    permutation drawn from ``(seed, e)``; the last partial batch of each epoch is dropped.

    Args:
      n: number of examples.
      batch_size: examples per batch (``<= n``).
      step: the global step (0-based).
      seed: the shuffling seed.

    Returns:
      int array ``(batch_size,)``.
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"`batch_size` must be in [1, {n}] (the number of examples), got {batch_size}.")
    per_epoch = n // batch_size
    epoch, k = divmod(int(step), per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size : (k + 1) * batch_size]


def batches(data: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0, start_step: int = 0) -> Iterator[dict]:
    """An endless iterator of shuffled batches (dicts of numpy arrays) from ``start_step`` on.

    Example:
      >>> import numpy as np
      >>> it = batches({"x": np.arange(10)}, 4, seed=0)
      >>> next(it)["x"].shape
      (4,)
    """
    n = data_size(data)
    step = start_step
    while True:
        idx = batch_indices(n, batch_size, step, seed=seed)
        yield {k: np.asarray(v)[idx] for k, v in data.items()}
        step += 1
