"""The deterministic shuffled batch stream of :func:`jdeq.train.fit`."""

from __future__ import annotations

from typing import Iterator, Mapping

import jax
import numpy as np

from jdeq import _validate as V

__all__ = ["batch_indices", "batches", "check_run_options", "data_size", "inputs_size"]


def data_size(data: Mapping[str, np.ndarray], *, name: str = "data") -> int:
    """The shared leading size of a mapping of host arrays, checked once on the host.

    Raises:
      TypeError: ``data`` is not a non-empty mapping, or an array is not made of real numbers
        (strings, objects, complex).
      ValueError: the arrays do not share a leading axis, it has size 0, or a float array holds
        NaN/inf (which would silently turn the loss, the gradients and the parameters into NaN).
    """
    if not isinstance(data, Mapping) or not data:
        raise TypeError(f"`{name}` must be a non-empty mapping of arrays, got {type(data).__name__}.")
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in data.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"the arrays of `{name}` must share a leading axis, got sizes {sizes}.")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"`{name}` has no examples (leading size 0).")
    for k, v in data.items():
        v, where = np.asarray(v), name if k is None else f"{name}[{k!r}]"
        if v.dtype.kind not in "biuf":
            raise TypeError(f"`{where}` must be real numbers (bool, int or float), got dtype {v.dtype}.")
        if v.dtype.kind == "f":
            bad = v.size - int(np.count_nonzero(np.isfinite(v)))
            if bad:
                raise ValueError(
                    f"`{where}` has {bad} non-finite value{'s' if bad > 1 else ''} (NaN/inf); "
                    "clean or drop those examples."
                )
    return n


def inputs_size(inputs, *, name: str = "inputs") -> int:
    """:func:`data_size` for an array or any pytree of arrays (the ``inputs`` of ``predict``)."""
    if isinstance(inputs, Mapping):
        named = dict(inputs)
    else:  # a bare array (the root leaf: an empty path) or a pytree of arrays, named by path
        named = {jax.tree_util.keystr(p) or None: v for p, v in jax.tree_util.tree_flatten_with_path(inputs)[0]}
    if not named:
        raise TypeError(f"`{name}` must be an array or a non-empty mapping of arrays, got {inputs!r}.")
    return data_size(named, name=name)


def check_run_options(batch_size, call_kwargs: Mapping, *, loss_fn=...) -> None:
    """Host-side checks of the options of ``fit``/``evaluate``/``predict`` (``loss_fn`` left out:
    not checked).

    ``call_kwargs["maxiter"]`` is checked here because inside the jitted call it is traced.
    """
    V.positive_int(batch_size, "batch_size")
    if loss_fn is not ...:
        V.callable_(loss_fn, "loss_fn", usage="loss_fn(model, batch)")
    if call_kwargs.get("maxiter") is not None:
        V.budget(call_kwargs["maxiter"])


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
    V.positive_int(n, "n")
    V.nonnegative_int(step, "step")
    V.nonnegative_int(seed, "seed")
    V.integer(batch_size, "batch_size", 1, n)  # at most the number of examples
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
