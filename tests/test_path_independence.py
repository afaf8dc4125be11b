"""jdeq.aa_score and jdeq.initial_states (path independence, Anil et al. 2022)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq


def test_unique_fixed_point_scores_one():
    f = lambda z, x: 0.5 * jnp.tanh(z) + x  # a contraction: one fixed point per input
    x = jax.random.normal(jax.random.key(0), (6, 4))
    z = jdeq.fixed_point(f, jnp.zeros((6, 4)), x, solver=jdeq.Anderson(tol=1e-8)).value
    for key in (None, jax.random.key(1)):
        s = jdeq.aa_score(f, x, z, solver=jdeq.Anderson(tol=1e-8), key=key)
        assert s.per_example.shape == (6,)
        np.testing.assert_allclose(s.per_example, 1.0, atol=1e-5)
        assert bool((s.perm != jnp.arange(6)).all())  # every example starts elsewhere
        assert sorted(np.asarray(s.perm).tolist()) == list(range(6))
    # key=None: example i starts from example i + 1's fixed point (a cyclic shift)
    np.testing.assert_array_equal(jdeq.aa_score(f, x, z).perm, [1, 2, 3, 4, 5, 0])


def test_eps_is_added_to_the_norms_product():
    """The cosine is <a, b> / (|a| |b| + eps): a large eps shrinks every score by that factor."""
    f = lambda z, x: 0.5 * jnp.tanh(z) + x  # noqa: E731
    x = jax.random.normal(jax.random.key(0), (4, 3))
    z = jdeq.fixed_point(f, jnp.zeros((4, 3)), x, solver=jdeq.Anderson(tol=1e-8)).value
    s = jdeq.aa_score(f, x, z, solver=jdeq.Anderson(tol=1e-8), eps=1.0)
    a, b = s.value, z
    want = jnp.sum(a * b, axis=1) / (jnp.linalg.norm(a, axis=1) * jnp.linalg.norm(b, axis=1) + 1.0)
    np.testing.assert_allclose(s.per_example, want, rtol=1e-6)
    assert bool((s.per_example < 0.99).all())


def test_maxiter_is_the_resolves_budget():
    """``maxiter`` bounds the re-solve: with one evaluation each example has moved only one step
    from its neighbour's fixed point, so it scores below the converged re-solve."""
    f = lambda z, x: 0.9 * jnp.tanh(z) + x  # noqa: E731  (a slow contraction)
    x = jax.random.normal(jax.random.key(0), (4, 3))
    solver = jdeq.FixedPointIteration(tol=1e-7, maxiter=300)
    z = jdeq.fixed_point(f, jnp.zeros((4, 3)), x, solver=solver).value
    short = jdeq.aa_score(f, x, z, solver=solver, maxiter=1)
    full = jdeq.aa_score(f, x, z, solver=solver)
    np.testing.assert_array_equal(short.stats.nsteps, 1)
    assert float(short.mean) < float(full.mean) - 1e-3 and float(full.mean) > 0.9999


def test_the_solver_is_the_resolves_and_a_batch_of_two_suffices():
    """``solver`` runs the re-solve (its own tolerance and budget, seen in ``stats``), and the
    smallest batch the docstring allows (2: each example starts from the other's) works."""
    f = lambda z, x: 0.9 * jnp.tanh(z) + x  # noqa: E731
    x = jax.random.normal(jax.random.key(3), (2, 3))
    z = jdeq.fixed_point(f, jnp.zeros((2, 3)), x, solver=jdeq.FixedPointIteration(tol=1e-7, maxiter=300)).value
    loose = jdeq.aa_score(f, x, z, solver=jdeq.FixedPointIteration(tol=1e-7, maxiter=3))
    np.testing.assert_array_equal(loose.stats.nsteps, 3)  # its budget, not the default solver's
    assert not bool(loose.stats.converged.any())
    tight = jdeq.aa_score(f, x, z, solver=jdeq.FixedPointIteration(tol=1e-7, maxiter=300))
    assert bool(tight.stats.converged.all()) and float(tight.mean) > 0.9999
    np.testing.assert_array_equal(tight.perm, [1, 0])
    for k in range(4):  # a random permutation without fixed points: of two examples, the swap
        np.testing.assert_array_equal(jdeq.aa_score(f, x, z, key=jax.random.key(k), maxiter=1).perm, [1, 0])


def test_two_attractors_score_below_one():
    # per coordinate, z -> tanh(3 z) + 0.05 x has two stable fixed points near +1 and -1
    f = lambda z, x: jnp.tanh(3 * z) + 0.05 * x
    x = jax.random.normal(jax.random.key(0), (8, 5))
    signs = jnp.where(jnp.arange(8)[:, None] % 2 == 0, 1.0, -1.0) * jnp.ones((8, 5))
    solver = jdeq.FixedPointIteration(tol=1e-7, maxiter=200)
    z = jdeq.fixed_point(f, signs, x, solver=solver).value  # alternating basins
    s = jdeq.aa_score(f, x, z, solver=solver)
    assert float(s.mean) < 0.0  # each neighbour sits in the opposite basin: cos ~ -1
    np.testing.assert_allclose(s.per_example, -1.0, atol=0.05)
    # the same inputs, all started in one basin: path independent on this set
    z1 = jdeq.fixed_point(f, jnp.ones((8, 5)), x, solver=solver).value
    assert float(jdeq.aa_score(f, x, z1, solver=solver).mean) > 0.999


def test_initial_states():
    like = {"a": jnp.zeros((5, 3)), "b": jnp.zeros((5, 2, 2), jnp.float16)}
    zeros = jdeq.initial_states("zeros", like)
    assert all(bool((v == 0).all()) for v in jax.tree.leaves(zeros))
    normal = jdeq.initial_states("normal", like, jax.random.key(0), scale=2.0)
    assert normal["b"].dtype == jnp.float16 and bool((normal["a"] != 0).all())
    mixed = jdeq.initial_states("mixed", like, jax.random.key(0))
    assert bool((mixed["a"][:3] != 0).all()) and bool((mixed["a"][3:] == 0).all())
    even = jdeq.initial_states("mixed", jnp.zeros((4, 3)), jax.random.key(0))  # ceil(4 / 2) = 2 drawn
    assert bool((even[:2] != 0).all()) and bool((even[2:] == 0).all())
    with pytest.raises(ValueError) as e:
        jdeq.initial_states("uniform", like)
    assert str(e.value) == "`kind` must be one of ('zeros', 'normal', 'mixed'), got 'uniform'."
    # every kind keeps each leaf's dtype (and shape)
    for kind in ("zeros", "normal", "mixed"):
        out = jdeq.initial_states(kind, like, jax.random.key(1))
        assert [(v.dtype, v.shape) for v in jax.tree.leaves(out)] == [(jnp.dtype(jnp.float32), (5, 3)),
                                                                      (jnp.dtype(jnp.float16), (5, 2, 2))], kind
    with pytest.raises(ValueError, match="key"):
        jdeq.initial_states("normal", like)


@pytest.mark.parametrize("kind", ["normal", "mixed"])
def test_initial_states_draw_every_leaf_independently(kind):
    """Each leaf of a many-leaf state gets its own draw: no leaf left out, no two leaves (of
    the same shape) equal, and the draws have the requested scale."""
    like = [jnp.zeros((4, 500)) for _ in range(5)]
    z0 = jdeq.initial_states(kind, like, jax.random.key(0), scale=3.0)
    assert len(z0) == 5
    drawn = [np.asarray(v[:2]) for v in z0]  # the first ceil(4 / 2) rows are drawn in both kinds
    for i in range(5):
        assert abs(float(np.std(drawn[i])) - 3.0) < 0.3
        for j in range(i):
            assert not np.allclose(drawn[i], drawn[j])
    # the default scale is 1: standard normal draws
    assert abs(float(np.std(jdeq.initial_states(kind, like, jax.random.key(1))[0][:2])) - 1.0) < 0.1


def test_bad_input():
    f = lambda z, x: 0.5 * jnp.tanh(z) + x
    with pytest.raises(ValueError, match="z_star"):
        jdeq.aa_score(f, jnp.zeros((1, 3)), jnp.zeros((1, 3)))
    with pytest.raises(ValueError) as e:
        jdeq.aa_score(f, jnp.zeros((2, 3)), jnp.zeros(()))
    assert str(e.value) == ("`z_star` needs a leading batch axis on every leaf; leaf <root> is a scalar. "
                            "To solve one problem, give it a leading axis of 1.")
    with pytest.raises(ValueError) as e:
        jdeq.aa_score(f, jnp.zeros((2, 3)), {"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))})
    assert str(e.value) == "every leaf of `z_star` needs the same leading batch axis; got leading sizes [2, 3]."
