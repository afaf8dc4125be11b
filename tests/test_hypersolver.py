"""Hypersolver: HyperAnderson without (or with untrained) mixer is exactly Anderson, its loss is
differentiable, and training the initializer and mixer on a frozen tiny DEQ cuts the number of
evaluations to reach the tolerance on held-out inputs, without touching the DEQ; calibration
never keeps a learned part that costs evaluations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdeq
from _jaxpr import eqns
from jdeq._hypersolver import mixer_features

N, D, IN = 8, 16, 4


def cell(z, x):
    w = jnp.asarray(np.random.default_rng(0).normal(size=(D, D)) * 0.95 / np.sqrt(D), z.dtype)
    return jnp.tanh(z @ w + x)


@pytest.mark.parametrize("params", [None, "untrained"])
def test_without_training_it_is_anderson(params):
    if params == "untrained":
        params = jdeq.init_mixer(jax.random.key(0), memory=4)
    x = jax.random.normal(jax.random.key(1), (N, D))
    z0 = jnp.zeros((N, D))
    run = jax.jit(lambda s: jdeq.fixed_point(cell, z0, x, solver=s), static_argnums=0)
    ref = run(jdeq.Anderson(memory=4, tol=1e-6, maxiter=60))
    hyp = jdeq.fixed_point(cell, z0, x, solver=jdeq.HyperAnderson(params=params, memory=4, tol=1e-6,
                                                                  maxiter=60))
    # the same iteration up to rounding (two programs): at most one step apart near the tolerance
    assert int(jnp.max(jnp.abs(hyp.stats.nsteps - ref.stats.nsteps))) <= 1
    assert float(jnp.mean(hyp.stats.nsteps - ref.stats.nsteps)) < 0.5
    np.testing.assert_allclose(hyp.value, ref.value, rtol=1e-5, atol=1e-6)


def test_hyper_loss_is_differentiable():
    x = jax.random.normal(jax.random.key(1), (N, D))
    params = jdeq.init_mixer(jax.random.key(0), memory=2)
    loss, g = jax.jit(jax.value_and_grad(lambda p, z0: jdeq.hyper_loss(
        cell, z0, x, jdeq.HyperAnderson(params=p, memory=2), steps=3), argnums=(0, 1)))(
        params, jnp.zeros((N, D)))
    assert np.isfinite(loss)
    leaves = jax.tree_util.tree_leaves(g)
    assert all(bool(jnp.isfinite(a).all()) for a in leaves)
    assert float(jnp.abs(g[0]["w2"]).sum()) > 0 and float(jnp.abs(g[1]).sum()) > 0


def test_hypersolver_cuts_iterations_on_a_frozen_deq():
    deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(IN, D, w_scale=1.0, rngs=nnx.Rngs(0)),
                       solver=jdeq.Anderson(tol=1e-4, maxiter=50))
    frozen = jax.tree_util.tree_map(np.asarray, nnx.state(deq))
    hyper = jdeq.models.HyperSolver(IN, D, hidden=32, memory=4, rngs=nnx.Rngs(1))
    x_train = jax.random.normal(jax.random.key(0), (256, IN))
    x_test = jax.random.normal(jax.random.key(1), (128, IN))
    losses = hyper.fit(deq, x_train, steps=60, batch_size=32, unroll=8, learning_rate=1e-2)
    assert np.mean(losses[-10:]) < np.mean(losses[:5])
    for a, b in zip(jax.tree_util.tree_leaves(frozen), jax.tree_util.tree_leaves(nnx.state(deq))):
        np.testing.assert_array_equal(a, b)  # the DEQ is frozen
    nfe = hyper.calibrate(deq, x_test, tol=1e-4)
    assert min(nfe["init"], nfe["init+mixer"]) < 0.9 * nfe["anderson"]
    kept = {(True, True): "init+mixer", (True, False): "init", (False, True): "mixer",
            (False, False): "anderson"}[(hyper.use_init, hyper.use_mixer)]
    assert nfe[kept] == min(nfe.values())
    z, stats = hyper.solve(deq, x_test, tol=1e-4)
    z_ref, _ = deq(x_test)
    assert bool(stats.converged.all())
    np.testing.assert_allclose(z, z_ref, atol=2e-3)  # same fixed point (tol 1e-4), fewer evaluations


def test_mixer_features_are_the_documented_ones():
    """Two filled slots of three, in ring-buffer order [slot 2 newest, slot 0 older, slot 1
    empty]: cosines, log norm ratios to the newest, weights and mask, newest first."""
    gram = np.zeros((3, 3))
    gram[np.ix_([0, 2], [0, 2])] = [[4.0, 1.0], [1.0, 9.0]]  # ||r_slot0||=2, ||r_slot2||=3, <.,.>=1
    valid = jnp.array([True, False, True])
    alpha = jnp.array([[0.25, 0.0, 0.75]])
    order = jnp.array([2, 0, 1])  # newest to oldest
    feats = np.asarray(mixer_features(jnp.asarray(gram[None], jnp.float32), valid, alpha, order))[0]
    m = 3
    cos, lognorm, a, mask = feats[: m * m].reshape(m, m), feats[m * m: m * m + m], feats[-2 * m: -m], feats[-m:]
    np.testing.assert_allclose(cos, [[1.0, 1 / 6, 0.0], [1 / 6, 1.0, 0.0], [0.0, 0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(lognorm, [0.0, np.log(2 / 3), 0.0], rtol=1e-6)
    np.testing.assert_allclose(a, [0.75, 0.25, 0.0])
    np.testing.assert_array_equal(mask, [1.0, 1.0, 0.0])


def test_mixer_features_stay_finite_for_a_zero_residual(x64):
    """A filled slot whose residual is exactly zero (an example solved exactly) gets finite
    features: the diagonal's guard is in the Gram matrix's own dtype, so it still guards a
    float32 history when float64 is on (a float64 eps**4 would vanish in float32)."""
    gram = np.zeros((3, 3))
    gram[2, 2] = 9.0  # slot 2 newest, ||r|| = 3; slot 0 filled with a zero residual
    valid = jnp.array([True, False, True])
    alpha = jnp.array([[0.5, 0.0, 0.5]], jnp.float32)
    feats = mixer_features(jnp.asarray(gram[None], jnp.float32), valid, alpha, jnp.array([2, 0, 1]))
    assert feats.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(feats))), feats


def test_init_mixer_is_lecun_normal_with_a_zero_output_layer():
    p = jdeq.init_mixer(jax.random.key(0), memory=5, hidden=64)
    n_in = 5 * 5 + 3 * 5
    assert p["w1"].shape == (n_in, 64)
    np.testing.assert_allclose(float(jnp.var(p["w1"])), 1 / n_in, rtol=0.1)  # 2,560 draws
    assert abs(float(jnp.mean(p["w1"]))) < 0.1 / np.sqrt(n_in)
    for name in ("b1", "w2", "b2"):
        assert not bool(jnp.any(p[name]))
    half = jdeq.init_mixer(jax.random.key(0), memory=2, hidden=4, dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}  # every array in `dtype`


@pytest.mark.parametrize("gradient", [jdeq.Implicit(), jdeq.Phantom(steps=2), jdeq.JacobianFree()],
                         ids=["implicit", "phantom", "jfb"])
def test_a_models_loss_differentiates_with_a_learned_solver(gradient):
    """A loss through a solve with HyperAnderson differentiates (reverse mode once tried to
    linearize the forward while loop through the mixer's weights and failed): the cell's
    arguments get their gradient, the solver's weights a zero one; also in an nnx layer."""
    params = jdeq.init_mixer(jax.random.key(1), memory=3, hidden=8)
    solver = jdeq.HyperAnderson(params=params, memory=3, tol=1e-6, maxiter=60)
    f = lambda z, a: jnp.tanh(0.5 * z + a)  # noqa: E731
    x = jax.random.normal(jax.random.key(0), (2, 3))

    def loss(s, a):
        return jnp.sum(jdeq.fixed_point(f, jnp.zeros((2, 3)), a, solver=s, gradient=gradient).value ** 2)

    g_solver, g_x = jax.grad(loss, argnums=(0, 1))(solver, x)
    assert all(not bool(jnp.any(a)) for a in jax.tree.leaves(g_solver))
    plain = jax.grad(loss, argnums=1)(jdeq.Anderson(memory=3, tol=1e-6, maxiter=60), x)
    np.testing.assert_allclose(g_x, plain, rtol=1e-3, atol=1e-5)
    states = jax.grad(lambda s: sum(jnp.sum(v) for v in jdeq.fixed_point_states(
        f, jnp.zeros((2, 3)), x, states=2, solver=s, gradient=gradient).value))(solver)
    assert all(not bool(jnp.any(a)) for a in jax.tree.leaves(states))
    deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0)), solver=solver, gradient=gradient)
    g = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(deq)
    assert any(float(jnp.abs(a).sum()) > 0 for a in jax.tree.leaves(nnx.state(g, nnx.Param)))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="init_mixer"):
        jdeq.HyperAnderson(params=jdeq.init_mixer(jax.random.key(0), memory=3), memory=5)
    # each check on its own: the first layer's input size, a missing first layer
    mixer = jdeq.init_mixer(jax.random.key(0), memory=5)
    for bad in ({**mixer, "w1": mixer["w1"][:-1]}, {k: v for k, v in mixer.items() if k != "w1"}):
        with pytest.raises(ValueError, match=r"`params` must come from jdeq.init_mixer\(key, memory=5\)"):
            jdeq.HyperAnderson(params=bad, memory=5)
    # every piece of init_mixer's layout is checked: each layer's shape, the dict itself
    bad_mixers = [{**mixer, "w2": mixer["w2"][:, :-1]}, {**mixer, "b2": mixer["b2"][:-1]},
                  {**mixer, "b1": mixer["b1"][:-1]}, {**mixer, "w2": mixer["w2"][:-1]},
                  {**mixer, "w1": mixer["w1"][0]}, {**mixer, "extra": mixer["b1"]},
                  tuple(mixer.values()), [mixer]]
    for bad in bad_mixers:
        with pytest.raises(ValueError, match=r"`params` must come from jdeq.init_mixer\(key, memory=5\)"):
            jdeq.HyperAnderson(params=bad, memory=5)
    jdeq.HyperAnderson(params=mixer, memory=5)  # the right sizes pass
    jdeq.HyperAnderson(params=jdeq.init_mixer(jax.random.key(0), memory=5, hidden=7), memory=5)
    with pytest.raises(ValueError, match=r"^`hidden` must be an int >= 1, got 0\.$"):
        jdeq.init_mixer(jax.random.key(0), hidden=0)
    with pytest.raises(TypeError, match=r"^`safeguard` must be a bool, got 'yes'\.$"):
        jdeq.HyperAnderson(safeguard="yes")
    with pytest.raises(ValueError, match="learned_steps"):
        jdeq.HyperAnderson(learned_steps=-1)
    with pytest.raises(ValueError, match="memory"):
        jdeq.init_mixer(jax.random.key(0), memory=0)
    with pytest.raises(TypeError, match="HyperAnderson"):
        jdeq.hyper_loss(cell, jnp.zeros((N, D)), None, jdeq.Anderson(), steps=4)
    with pytest.raises(ValueError, match="steps"):
        jdeq.hyper_loss(cell, jnp.zeros((N, D)), None, jdeq.HyperAnderson(), steps=1)
    hyper = jdeq.models.HyperSolver(IN, D, rngs=nnx.Rngs(0))
    deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(IN, D, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="criterion"):
        hyper.calibrate(deq, jnp.ones((2, IN)), criterion="speed")
    with pytest.raises(ValueError, match="features"):
        jdeq.models.HyperSolver(IN, 0, rngs=nnx.Rngs(0))


def test_hyper_loss_is_the_documented_mean_log_relative_residual(x64):
    """``hyper_loss`` = mean over examples and iterations of
    ``log(||g_k|| / (||f(z0)|| + 1e-8) + 1e-8)``, each example relative to its own ``||f(z0)||``
    (inputs of sizes 1e-9 to 1 here, where the 1e-8 matters, and one of 0: z0 = 0 is its fixed
    point, residual 0 at every step), for ``steps`` iterations whatever the solver's own ``tol``
    and ``maxiter`` (50 by default, here 6 steps)."""
    x = jax.random.normal(jax.random.key(1), (N, D), jnp.float64) * jnp.logspace(-9, 0, N)[:, None]
    x = x.at[0].set(0.0)
    z0 = jnp.zeros((N, D), jnp.float64)
    sol = jdeq.fixed_point(cell, z0, x, solver=jdeq.Anderson(memory=3, tol=1e-30, stop_mode="abs", trace=True),
                           maxiter=6)
    scale = jnp.linalg.norm(cell(z0, x), axis=1, keepdims=True) + 1e-8
    trace = sol.stats.trace
    assert np.isnan(trace[0, 1:]).all() and float(trace[0, 0]) == 0.0  # row 0 stops at once
    per_step = jnp.where(jnp.isfinite(trace), jnp.log(trace / scale + 1e-8), np.log(1e-8))
    for solver in (jdeq.HyperAnderson(memory=3), jdeq.HyperAnderson(memory=3, tol=0.5, maxiter=3)):
        loss = jdeq.hyper_loss(cell, z0, x, solver, steps=6)
        np.testing.assert_allclose(loss, jnp.mean(per_step), rtol=1e-5)


def test_mixer_features_floor_and_clip_as_documented():
    """``d_i = G_ii + eps**4`` (float32: 2.0e-28) in the cosines and norm ratios, and the log
    norm ratios clipped to [-20, 20]: slots with residual norms 1 (newest), 1e-15 (its squared
    norm 1e-30 is below the floor), 1e-6 and 1e14 (log ratios -34.5, -13.8 and 32.2)."""
    sq = np.array([1.0, 1e-30, 1e-12, 1e28])
    gram = np.diag(sq)
    gram[0, 2] = gram[2, 0] = 0.5e-6  # cos = 0.5 between the newest and the 1e-6 residual
    e = float(np.finfo(np.float32).eps) ** 4
    d = sq + e
    m = 4
    feats = np.asarray(mixer_features(jnp.asarray(gram[None], jnp.float32), jnp.ones(m, bool),
                                      jnp.full((1, m), 0.25), jnp.arange(m)))[0]
    cos, lognorm = feats[: m * m].reshape(m, m), feats[m * m: m * m + m]
    np.testing.assert_allclose(np.diag(cos), sq / d, rtol=1e-5)  # 1, 0.0049, 1, 1
    np.testing.assert_allclose(cos[0, 2], 0.5, rtol=1e-5)
    np.testing.assert_allclose(lognorm, np.clip(0.5 * np.log(d / d[0]), -20.0, 20.0), rtol=1e-5)
    np.testing.assert_array_equal(lognorm[[1, 3]], [-20.0, 20.0])


def test_mixer_features_ask_for_highest_precision():
    """The reordering and the weights' permutation are products at ``Precision.HIGHEST``: exact on
    GPU (TF32) and TPU (bf16 passes) too. Checked in the program (the CPU is exact anyway)."""
    m = 3
    program = jax.make_jaxpr(mixer_features)(jnp.eye(m)[None], jnp.ones(m, bool), jnp.ones((1, m)),
                                             jnp.arange(m)).jaxpr
    precisions = [e.params["precision"] for e in eqns(program) if e.primitive.name == "dot_general"]
    hi = jax.lax.Precision.HIGHEST
    assert len(precisions) == 3 and all(p == (hi, hi) for p in precisions), precisions


def test_the_mixers_hidden_bias_is_a_bias():
    """A constant hidden layer (``w1 = 0``, bias ``b1``) folds into the output bias: the solver
    with ``(b1, w2, b2)`` runs exactly as the one with ``(0, w2, b2 + tanh(b1) @ w2)``."""
    p = jdeq.init_mixer(jax.random.key(0), memory=3, hidden=4)
    rng = np.random.default_rng(0)
    b1 = jnp.asarray(rng.normal(size=4), jnp.float32)
    w2 = jnp.asarray(0.3 * rng.normal(size=(4, 4)), jnp.float32)
    a = {**p, "w1": jnp.zeros_like(p["w1"]), "b1": b1, "w2": w2}
    b = {**a, "b1": jnp.zeros_like(b1), "b2": p["b2"] + jnp.tanh(b1) @ w2}
    x = jax.random.normal(jax.random.key(1), (N, D))
    run = lambda params: jdeq.fixed_point(  # noqa: E731
        cell, jnp.zeros((N, D)), x, solver=jdeq.HyperAnderson(params=params, memory=3, tol=1e-6, maxiter=8)).value
    za, zb = run(a), run(b)
    np.testing.assert_allclose(za, zb, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(za - run(p)).max()) > 1e-4  # the bias changes the iteration


def test_init_mixer_serves_the_default_anderson_memory():
    """``init_mixer``'s default ``memory`` is 5, ``jdeq.HyperAnderson``'s (and Anderson's)."""
    assert jdeq.init_mixer(jax.random.key(0))["w1"].shape == (5 * 5 + 3 * 5, 32)
    assert jdeq.HyperAnderson().memory == 5


def _step_mixer(memory, s):
    """A mixer that outputs ``delta = 0`` and the step logit ``s`` whatever its input."""
    p = jax.tree.map(jnp.zeros_like, jdeq.init_mixer(jax.random.key(0), memory=memory))
    return {**p, "b2": p["b2"].at[memory].set(s)}


@pytest.mark.parametrize("damping,s", [(0.5, 0.0), (0.6, float(np.log(3.0)))])
def test_the_learned_step_size_is_twice_damping_times_sigmoid(damping, s):
    """``beta = 2 * damping * sigmoid(s)``: with zero corrections the learned iteration is
    Anderson's with that damping (0.5 at s = 0; 0.9 = 2 * 0.6 * 0.75 at s = log 3)."""
    x = jax.random.normal(jax.random.key(1), (N, D))
    beta = 2 * damping / (1 + np.exp(-s))
    run = lambda solver: jdeq.fixed_point(cell, jnp.zeros((N, D)), x, solver=solver).value  # noqa: E731
    hyp = run(jdeq.HyperAnderson(params=_step_mixer(3, s), memory=3, damping=damping, tol=1e-30, maxiter=6,
                                 safeguard=False))
    np.testing.assert_allclose(hyp, run(jdeq.Anderson(memory=3, damping=beta, tol=1e-30, maxiter=6)),
                               rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(hyp - run(jdeq.Anderson(memory=3, damping=damping, tol=1e-30, maxiter=6))).max()) > 1e-3 or s == 0


def test_a_float32_state_stays_float32_under_x64():
    """The learned corrections take the state's dtype: a float32 problem with a float32 mixer runs
    in float32 with 64-bit types enabled (the loop's carry keeps its dtype)."""
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(1).normal(size=(N, D)), jnp.float32)
        solver = jdeq.HyperAnderson(params=_trained_like(jdeq.init_mixer(jax.random.key(0), memory=3)), memory=3,
                                    tol=1e-5, maxiter=20)
        sol = jdeq.fixed_point(cell, jnp.zeros((N, D), jnp.float32), x, solver=solver)
        assert sol.value.dtype == jnp.float32 and bool(jnp.isfinite(sol.value).all())


def _trained_like(p):
    """Nonzero output layer: the learned corrections are not zero."""
    k1, k2 = jax.random.split(jax.random.key(5))
    return {**p, "w2": 0.3 * jax.random.normal(k1, p["w2"].shape, p["w2"].dtype),
            "b2": 0.3 * jax.random.normal(k2, p["b2"].shape, p["b2"].dtype)}


def test_the_learned_permutation_asks_for_highest_precision():
    """The newest-first corrections are permuted into the ring's slots by a one-hot product at
    ``Precision.HIGHEST`` (exact on GPU/TPU too); checked in the update's program."""
    solver = jdeq.HyperAnderson(params=_trained_like(jdeq.init_mixer(jax.random.key(0), memory=3)), memory=3)
    z = jnp.ones((2, 4))
    program = jax.make_jaxpr(lambda z: solver.update(solver.init(z), 2, z, 0.5 * z))(z).jaxpr
    hi = jax.lax.Precision.HIGHEST
    dots = [e for e in eqns(program) if e.primitive.name == "dot_general"]
    perm = [e for e in dots if tuple(e.invars[1].aval.shape) == (3, 3)]  # (batch, m) @ (m, m)
    assert perm and all(e.params["precision"] == (hi, hi) for e in perm), [e.params["precision"] for e in dots]
