"""Unrolled pre-training for :func:`jdeq.train.fit`: the :class:`Pretrain` option.

Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models" (NeurIPS 2020) train MDEQ for its
first steps as the weight-tied net it defines (the cell applied a fixed number of times from
``z0``, backpropagated through), then switch to the equilibrium: the cell first learns a useful
map where gradients are exact and cheap to get right, and the solver then starts from a cell
that is already near a contraction on the data. TorchDEQ exposes the same switch.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from jdeq import _validate as V

__all__ = ["Pretrain"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pretrain:
    """``fit(..., pretrain=Pretrain(steps=N, depth=L))``: the first ``N`` steps unrolled.

    For steps ``0 .. N-1`` every ``jdeq.nnx.DEQ`` of the model runs with
    ``unrolled_depth=L`` (the cell applied exactly ``L`` times from its ``z0``, gradients by
    backpropagation through those applications, ``jdeq.Unrolled``); from step ``N`` on, with its
    own solver and gradient. The parameters and the optimizer state (its schedule included)
    carry over; the two phases compile once each. A resumed run picks the phase from its step.

    Args:
      steps: number of unrolled steps (``>= 1``).
      depth: applications of the cell in those steps (``>= 1``).

    Example:
      >>> import numpy as np, optax, jdeq
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(4, 8, rngs=rngs))
      ...         self.head = nnx.Linear(8, 2, rngs=rngs)
      ...     def __call__(self, x):
      ...         z, stats = self.deq(x)
      ...         return self.head(z), stats
      >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
      >>> data = {"inputs": x, "labels": (x[:, 0] > 0).astype(np.int32)}
      >>> h = jdeq.train.fit(Net(nnx.Rngs(0)), optax.adam(1e-2), data, steps=6, batch_size=16,
      ...                    pretrain=jdeq.train.Pretrain(steps=3, depth=4), progress=False)
    """

    steps: int
    depth: int

    def __post_init__(self):
        V.positive_int(self.steps, "steps")
        V.positive_int(self.depth, "depth")

    def graphdef(self, model: nnx.Module):
        """The ``nnx.GraphDef`` of ``model`` with every ``jdeq.nnx.DEQ`` set to
        ``unrolled_depth=depth`` (``model`` itself is not modified).

        Raises:
          ValueError: ``model`` holds no ``jdeq.nnx.DEQ`` (nothing to pre-train).
        """
        from jdeq.nnx import DEQ

        clone = nnx.clone(model)
        layers = [m for _, m in nnx.iter_graph(clone) if isinstance(m, DEQ)]
        if not layers:
            raise ValueError("`pretrain` unrolls the model's jdeq.nnx.DEQ layers, but the model holds none.")
        for layer in layers:
            layer.unrolled_depth = self.depth
        return nnx.graphdef(clone)
