"""Shared fixtures: float64 on request, a few Adam steps on a classifier."""

import jax
import optax
import pytest
from flax import nnx


@pytest.fixture
def x64():
    """Runs the test with float64 enabled (restored afterwards)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def adam_losses():
    """``adam_losses(model, x, y, steps, lr=1e-2)``: the cross-entropy loss at each of ``steps``
    jitted Adam steps on one batch (the model returns ``(logits, stats)``); trains ``model``."""

    def run(model, x, y, steps, lr=1e-2):
        opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

        @nnx.jit
        def step(model, opt):
            def loss_fn(model):
                logits, _ = model(x)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            opt.update(model, grads)
            return loss

        return [float(step(model, opt)) for _ in range(steps)]

    return run
