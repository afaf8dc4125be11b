"""jdeq.models.transformer: shapes, padding, DEQ fixed point, parameter sharing, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdeq
from jdeq.models.transformer import (
    LSTMClassifier,
    TiedTransformerClassifier,
    TransformerCell,
    TransformerClassifier,
)
from jdeq.train import count_params

V, C, L = 16, 10, 8


def _tokens(seed=0, n=4):
    t = jax.random.randint(jax.random.key(seed), (n, L), 1, V)
    return t.at[:, -2:].set(0)  # two padding positions


def test_cell_deq_reaches_its_fixed_point_and_is_contractive_at_init():
    cell = TransformerCell(16, 2, rngs=nnx.Rngs(0))
    x = (jax.random.normal(jax.random.key(1), (3, L, 16)), jnp.ones((3, L)))

    @nnx.jit  # one compile for the solve, the residual and the power iteration
    def check(cell, x):
        z, stats = jdeq.nnx.DEQ(cell, solver=jdeq.FixedPointIteration(tol=1e-5, maxiter=100))(x)
        rho = jdeq.spectral_radius(lambda z, x: cell(z, x), z, x, jax.random.key(2), iters=30)
        return stats.converged, jnp.abs(cell(z, x) - z).max(), rho

    converged, gap, rho = check(cell, x)
    assert converged.all() and gap < 1e-3
    # plain iteration converges at initialization, but the state is not ignored: 0 << rho(J) < 1
    assert (rho > 0.3).all() and (rho < 0.95).all()


def test_tied_classifier_deq_and_unrolled_share_structure():
    # (the DEQ's forward pass and run-time maxiter are exercised in test_train)
    deq = TiedTransformerClassifier(V, C, length=L, features=16, num_heads=2, rngs=nnx.Rngs(0))
    unr = TiedTransformerClassifier(V, C, length=L, features=16, num_heads=2, depth=4, rngs=nnx.Rngs(0))
    assert count_params(deq) == count_params(unr)
    logits, stats = unr(_tokens())
    assert logits.shape == (4, C) and (stats.nsteps == 4).all()
    with pytest.raises(ValueError, match="maxiter"):
        unr(_tokens(), maxiter=3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TiedTransformerClassifier(V, C, length=L, features=16, num_heads=2, depth=2, rngs=nnx.Rngs(0)),
        lambda: TransformerClassifier(V, C, length=L, features=16, num_heads=2, num_layers=2, rngs=nnx.Rngs(0)),
        lambda: LSTMClassifier(V, C, features=8, hidden=16, rngs=nnx.Rngs(0)),
    ],
)
def test_padding_does_not_change_the_output(make):
    model = make()
    out = nnx.jit(lambda m, t: jdeq.train.split_output(m(t))[0])  # one compile per shape
    out = functools.partial(out, model)
    t = _tokens()
    other = t.at[:, -2:].set(0)
    changed = t.at[:, :-2].set((t[:, :-2] % (V - 1)) + 1)
    np.testing.assert_allclose(out(t), out(other), atol=1e-6)
    assert not np.allclose(out(t), out(changed))
    if isinstance(model, LSTMClassifier):  # the final state is read at the last real token
        np.testing.assert_allclose(out(t), out(t[:, :-2]), atol=1e-5)


def test_untied_transformer_has_separate_layers():
    m = TransformerClassifier(V, C, length=L, features=16, num_heads=2, num_layers=3, rngs=nnx.Rngs(0))
    one = TransformerClassifier(V, C, length=L, features=16, num_heads=2, num_layers=1, rngs=nnx.Rngs(0))
    block = count_params(m) - count_params(one)
    assert block > 0 and block % 2 == 0 and len(m.blocks) == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        TransformerCell(10, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_layers"):
        TransformerClassifier(V, C, length=L, features=8, num_heads=2, num_layers=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden"):
        LSTMClassifier(V, C, hidden=0, rngs=nnx.Rngs(0))
    m = TiedTransformerClassifier(V, C, length=L, features=8, num_heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens"):
        m(jnp.ones((2, L + 1), jnp.int32))
