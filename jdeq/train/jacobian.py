"""Jacobian regularization for :func:`jdeq.train.fit`: the :class:`JacReg` option.

Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization" (ICML 2021)
add ``gamma * ||df/dz||_F^2`` at ``z*`` (a Hutchinson estimate) to the training loss, at every
step or with probability ``p`` per step, which keeps the cell contractive and the number of
solver iterations from growing as training goes on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jdeq import _validate as V
from jdeq._regularizers import _NOISE  # the probe kinds of jdeq.jacobian_frobenius

__all__ = ["JacReg"]



@dataclasses.dataclass(frozen=True, kw_only=True)
class JacReg:
    """The Jacobian penalty ``gamma * ||J||_F^2 / dim`` added to the loss by :func:`fit`.

    With ``fit(..., jac_reg=JacReg(gamma=...))`` every equilibrium layer of the model
    (``jdeq.nnx.DEQ``, ``jdeq.models.MonDEQ``, or any module with ``record_equilibria`` and
    ``jacobian_penalty``) sows the ``(x, z*)`` of each of its solves during the forward pass, and the step adds the sum over those
    solves of ``gamma * mean_b ||J_b||_F^2 / dim`` (``jdeq.jacobian_penalty`` at
    ``stop_gradient(z*)``, via ``DEQ.jacobian_penalty``) to the loss it differentiates. With
    probability ``prob < 1`` one Bernoulli draw per step decides whether the term is computed
    (a ``lax.cond``: skipped steps run no JVP). The random key of step ``k`` is
    ``jax.random.fold_in(jax.random.key(seed), k)``, so the draws are deterministic given the
    seed and a resumed run draws the same ones. ``gamma == 0`` is exactly no regularization
    (``prob == 0`` is rejected, as by :func:`jdeq.jacobian_penalty`: "never" is ``gamma=0`` or
    ``jac_reg=None``, not a probability). The term is logged as the metric ``"jac_reg"`` (0 on skipped steps);
    ``"loss"`` stays the task loss.

    Args:
      gamma: weight of the term (``>= 0``).
      prob: probability in ``(0, 1]`` that a step computes the term (the rule of
        :func:`jdeq.jacobian_penalty`'s ``prob`` and of the ``--prob`` argparse type
        ``jdeq.argtypes.probability``).
      num_samples: Hutchinson probes per example.
      noise: ``"normal"`` or ``"rademacher"`` probes.

    Example:
      >>> import optax, jdeq  # doctest: +SKIP
      >>> jdeq.train.fit(model, optax.adam(1e-3), data, steps=100, batch_size=32,
      ...                jac_reg=jdeq.train.JacReg(gamma=1.0, prob=0.5))  # doctest: +SKIP

    Reference: Bai, Koltun & Kolter, ICML 2021.
    """

    gamma: float
    prob: float = 1.0
    num_samples: int = 1
    noise: str = "normal"

    def __post_init__(self):
        V.nonnegative_number(self.gamma, "gamma")
        V.probability(self.prob, "prob")  # (0, 1], as jdeq.jacobian_penalty
        V.positive_int(self.num_samples, "num_samples")
        V.one_of(self.noise, "noise", _NOISE)

    @property
    def active(self) -> bool:
        """False when the term is identically 0 (``gamma == 0``)."""
        return self.gamma > 0


def find_deqs(model: nnx.Module) -> list[nnx.Module]:
    """The equilibrium layers of ``model`` (itself included), in graph order: every module with
    a ``record_equilibria`` attribute and a ``jacobian_penalty(x, z_star, key, *, gamma, ...)``
    method (``jdeq.nnx.DEQ``, ``jdeq.models.MonDEQ`` or a layer of your own with the same two
    members)."""
    return [
        node for _, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Module) and hasattr(node, "record_equilibria")
        and callable(getattr(node, "jacobian_penalty", None))
    ]


def start_recording(model: nnx.Module) -> list:
    """Switches on ``record_equilibria`` in every equilibrium layer of ``model`` (a copy merged
    inside the differentiated loss): each solve then sows ``(x, z*)`` into ``nnx.Intermediate``
    ``"equilibria"``. Returns those layers, for :func:`penalty`."""
    layers = find_deqs(model)
    for layer in layers:
        layer.record_equilibria = True
    return layers


def _recorded(layer) -> tuple:
    """The ``(x, z*)`` pairs a layer sowed during the forward pass (and clears them)."""
    records = getattr(layer, "equilibria", None)
    if records is None:
        return ()
    values = tuple(records.get_value())  # an nnx.Intermediate (record_equilibrium, or Flax's sow)
    del layer.equilibria
    return values


def penalty(jac_reg: JacReg, layers: list, key: jax.Array) -> jax.Array:
    """The step's penalty: one Bernoulli(``prob``) draw, then the sum over the recorded solves."""
    records = [(layer, x, z) for layer in layers for x, z in _recorded(layer)]
    if not records:
        raise ValueError(
            "`jac_reg` is set but the model's forward pass solved no equilibrium layer "
            "(jdeq.nnx.DEQ, jdeq.models.MonDEQ, ...)."
        )
    coin, probes = jax.random.split(key)
    dtype = jax.tree_util.tree_leaves(records[0][2])[0].dtype

    def term(_):
        total = jnp.zeros((), dtype)
        for i, (layer, x, z) in enumerate(records):
            total = total + layer.jacobian_penalty(
                x, z, jax.random.fold_in(probes, i), gamma=jac_reg.gamma,
                num_samples=jac_reg.num_samples, noise=jac_reg.noise,
            )
        return total

    if jac_reg.prob == 1:
        return term(None)
    return jax.lax.cond(jax.random.bernoulli(coin, jac_reg.prob), term, lambda _: jnp.zeros((), dtype), None)
