"""jdeq.ReversibleIteration and jdeq.Reversible (McCallum et al. 2025): the exact gradient of the
reversible iteration, reconstructed in reverse with memory flat in maxiter."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jdeq

B, D = 5, 6


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _f(z, p):
    return jnp.tanh(z @ p["W"] + p["x"])


def _params(dtype=jnp.float64, scale=0.4, batch=B, dim=D):
    W = scale * jax.random.normal(jax.random.key(0), (dim, dim), dtype) / np.sqrt(dim)
    x = jax.random.normal(jax.random.key(1), (batch, dim), dtype)
    return {"W": W, "x": x}


def _loss(p, solver, gradient, maxiter=None):
    z0 = jnp.zeros_like(p["x"])
    sol = jdeq.fixed_point(_f, z0, p, solver=solver, gradient=gradient, maxiter=maxiter)
    return jnp.sum(jnp.sin(sol.value) * jnp.arange(1, z0.shape[1] + 1)), sol.stats


def _grads(p, solver, gradient, maxiter=None):
    return jax.grad(lambda p: _loss(p, solver, gradient, maxiter)[0])(p)


def _close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(y))))


@pytest.mark.parametrize(
    "beta,tol,maxiter",
    [(0.5, 1e-30, 41), (0.5, 1e-3, 40), (0.8, 1e-6, 41), (0.8, 1e-3, 12), (0.3, 1e-30, 1), (0.3, 1e-30, 3)],
)
def test_gradient_equals_unrolled(beta, tol, maxiter):
    p = _params()
    rev = jdeq.ReversibleIteration(beta=beta, tol=tol, maxiter=maxiter)
    (l1, s1), (l2, s2) = _loss(p, rev, jdeq.Reversible()), _loss(p, rev, jdeq.Unrolled())
    assert float(l1) == float(l2)  # the same forward computation
    np.testing.assert_array_equal(s1.nsteps, s2.nsteps)
    _close(_grads(p, rev, jdeq.Reversible()), _grads(p, rev, jdeq.Unrolled()), 1e-9)


def test_gradient_finite_differences():
    p = _params()
    rev = jdeq.ReversibleIteration(beta=0.6, tol=1e-30, maxiter=21)  # a fixed number of steps
    check_grads(lambda p: _loss(p, rev, jdeq.Reversible())[0], (p,), order=1, modes=["rev"], eps=1e-6)


def test_per_example_freezing_exact():
    """Examples that stop at different steps: each one's gradient is that of its own solve."""
    p = _params()
    p["x"] = p["x"] * jnp.array([0.01, 0.3, 1.0, 3.0, 10.0])[:, None]  # different convergence speeds
    rev = jdeq.ReversibleIteration(beta=0.7, tol=1e-7, maxiter=61)
    _, stats = _loss(p, rev, jdeq.Reversible())
    assert len(set(np.asarray(stats.nsteps).tolist())) > 2 and bool(stats.converged.all())
    g = _grads(p, rev, jdeq.Reversible())
    _close(g, _grads(p, rev, jdeq.Unrolled()), 1e-9)
    for i in (0, B - 1):  # an example alone: its x-gradient row, and its W-gradient share
        pi = {"W": p["W"], "x": p["x"][i : i + 1]}
        loss_i = lambda pi: _loss(pi, rev, jdeq.Reversible())[0]
        gi = jax.grad(loss_i)(pi)
        np.testing.assert_allclose(g["x"][i], gi["x"][0], rtol=1e-8, atol=1e-12)  # rounding only
        _, si = _loss(pi, rev, jdeq.Reversible())
        assert int(si.nsteps[0]) == int(stats.nsteps[i])


def test_runtime_budget_and_jit():
    p = _params()
    rev = jdeq.ReversibleIteration(beta=0.7, tol=1e-30, maxiter=101)
    run = jax.jit(lambda p, m: _grads(p, rev, jdeq.Reversible(), m))
    for m in (9, 21):  # a traced budget: one compilation
        _close(run(p, m), _grads(p, rev, jdeq.Unrolled(), m), 1e-9)
    assert run._cache_size() == 1


def test_vmap_per_example():
    p = _params()
    rev = jdeq.ReversibleIteration(beta=0.6, tol=1e-8, maxiter=61)

    def one(W, xi):
        return jdeq.fixed_point(
            _f, jnp.zeros(D), {"W": W, "x": xi}, solver=rev, gradient=jdeq.Reversible(), batched=False
        ).value

    loss_v = lambda p: jnp.sum(jnp.sin(jax.vmap(one, in_axes=(None, 0))(p["W"], p["x"])))
    loss_b = lambda p: jnp.sum(jnp.sin(jdeq.fixed_point(
        _f, jnp.zeros((B, D)), p, solver=rev, gradient=jdeq.Reversible()).value))
    np.testing.assert_allclose(jax.jit(loss_v)(p), loss_b(p), rtol=1e-12)
    _close(jax.jit(jax.grad(loss_v))(p), jax.grad(loss_b)(p), 1e-9)


def test_other_gradient_modes():
    """An ordinary solver: Implicit at a converged fixed point agrees with the exact gradient."""
    p = _params()
    rev = jdeq.ReversibleIteration(beta=0.8, tol=1e-11, maxiter=201)
    g_rev = _grads(p, rev, jdeq.Reversible())
    _close(_grads(p, rev, jdeq.Implicit(solver=jdeq.Anderson(tol=1e-12, maxiter=100))), g_rev, 1e-6)
    _close(_grads(p, rev, jdeq.Implicit()), g_rev, 1e-6)  # itself as the backward solver
    _grads(p, rev, jdeq.Phantom(steps=3))  # runs


def test_stop_mode_abs_and_rel_are_the_residuals_compared_with_tol():
    """``stop_mode``: a state of size ~2e4 meets a relative tol of 1e-3 long before the same
    absolute one; each mode stops on its own residual."""
    f = lambda z, c: 0.5 * z + c  # noqa: E731
    c = jnp.full((2, 3), 1e4)
    runs = {mode: jdeq.fixed_point(f, jnp.zeros_like(c), c, solver=jdeq.ReversibleIteration(
        beta=0.8, tol=1e-3, maxiter=400, stop_mode=mode)).stats for mode in ("abs", "rel")}
    assert bool(runs["abs"].converged.all()) and bool(runs["rel"].converged.all())
    assert float(runs["abs"].abs_residual.max()) < 1e-3
    assert float(runs["rel"].rel_residual.max()) < 1e-3 < float(runs["rel"].abs_residual.min())
    assert int(runs["abs"].nsteps.min()) > int(runs["rel"].nsteps.max())


def test_pytree_state_and_stats():
    p = _params()
    f = lambda z, p: {"a": jnp.tanh(z["b"] @ p["W"] + p["x"]), "b": 0.5 * z["a"]}
    z0 = {"a": jnp.zeros((B, D)), "b": jnp.zeros((B, D))}
    rev = jdeq.ReversibleIteration(beta=0.6, tol=1e-9, maxiter=99, trace=True)
    sol = jdeq.fixed_point(f, z0, p, solver=rev, gradient=jdeq.Implicit())
    assert bool(sol.stats.converged.all()) and sol.stats.trace.shape == (B, 99)
    assert int(sol.stats.nsteps.max()) % 2 == 1  # 1 + 2 n evaluations
    short = rev.backward(maxiter=21)  # few steps: rounding of the reconstruction stays ~1e-12
    loss = lambda p, g: jnp.sum(jdeq.fixed_point(f, z0, p, solver=short, gradient=g).value["a"])
    _close(jax.grad(loss)(p, jdeq.Reversible()), jax.grad(loss)(p, jdeq.Unrolled()), 1e-9)


def _temp_bytes(gradient, maxiter):
    p = _params(batch=8, dim=64)
    rev = jdeq.ReversibleIteration(beta=0.5, tol=1e-30, maxiter=maxiter)
    fn = jax.jit(lambda p: _grads(p, rev, gradient))
    return fn.lower(p).compile().memory_analysis().temp_size_in_bytes


def test_memory_flat_in_maxiter():
    rev = [_temp_bytes(jdeq.Reversible(), m) for m in (16, 256)]
    unr = [_temp_bytes(jdeq.Unrolled(), m) for m in (16, 256)]
    assert rev[1] == rev[0], rev
    assert unr[1] > 8 * unr[0] and unr[1] > 10 * rev[1], (unr, rev)


def test_float32_reconstruction_drift():
    """Inside the stated float32 safe range (benchmarks/README.md: replayed steps n with
    (1 - beta)^-n <= 1e3) the float32 gradient stays within 1e-4 of backprop through the
    stored iterations (unreachable tol, so every step is replayed)."""
    with jax.enable_x64(False):
        p = _params(jnp.float32)
        for beta, nfe in ((0.3, 41), (0.5, 21), (0.8, 9)):  # 20, 10, 4 steps
            rev = jdeq.ReversibleIteration(beta=beta, tol=1e-30, maxiter=nfe)
            g1, g2 = _grads(p, rev, jdeq.Reversible()), _grads(p, rev, jdeq.Unrolled())
            for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
                assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 1e-4, beta


def test_nonfinite_example_gets_zero_cotangent():
    p = _params()
    f = lambda z, p: jnp.where(p["x"][:, :1] > 50, jnp.exp(30 * z + 30), jnp.tanh(z @ p["W"] + p["x"]))
    p["x"] = p["x"].at[0].set(100.0)
    rev = jdeq.ReversibleIteration(beta=0.5, tol=1e-8, maxiter=41)
    loss = lambda p: jnp.sum(jdeq.fixed_point(f, jnp.zeros((B, D)), p, solver=rev, gradient=jdeq.Reversible()).value)
    sol = jdeq.fixed_point(f, jnp.zeros((B, D)), p, solver=rev, gradient=jdeq.Reversible())
    assert bool(sol.stats.nonfinite[0]) and not bool(sol.stats.nonfinite[1:].any())
    g = jax.grad(loss)(p)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g))
    q = {"W": p["W"], "x": p["x"][1:]}
    g_rest = jax.grad(lambda q: jnp.sum(jdeq.fixed_point(
        _f, jnp.zeros((B - 1, D)), q, solver=rev, gradient=jdeq.Reversible()).value))(q)
    np.testing.assert_allclose(g["W"], g_rest["W"], rtol=1e-10, atol=1e-12)


def test_an_example_nonfinite_from_the_start_leaves_the_others_alone():
    """An example whose f(z0) is already NaN is flagged and never stepped (its y stays NaN),
    while every other example iterates exactly as it would alone: the finiteness check of a
    step is per example."""
    p = _params()
    p_bad = {"W": p["W"], "x": p["x"].at[2, 3].set(jnp.nan)}
    rev = jdeq.ReversibleIteration(beta=0.5, tol=1e-6, maxiter=101)
    sol = jdeq.fixed_point(_f, jnp.zeros((B, D)), p_bad, solver=rev, gradient=jdeq.Reversible())
    keep = np.arange(B) != 2
    alone = jdeq.fixed_point(_f, jnp.zeros((B - 1, D)), {"W": p["W"], "x": p["x"][keep]}, solver=rev,
                             gradient=jdeq.Reversible())
    np.testing.assert_array_equal(sol.stats.nonfinite, ~keep)
    assert bool(alone.stats.converged.all())
    np.testing.assert_array_equal(sol.value[keep], alone.value)
    np.testing.assert_array_equal(sol.stats.nsteps[keep], alone.stats.nsteps)
    # backward: the other examples' input gradients are those they get alone (the flagged one's
    # own NaN input reaches its row and the shared W as 0 * NaN: jdeq.Implicit's stated limit)
    loss = lambda x: jnp.sum(jnp.sin(jdeq.fixed_point(  # noqa: E731
        _f, jnp.zeros_like(x), {"W": p["W"], "x": x}, solver=rev, gradient=jdeq.Reversible()).value))
    np.testing.assert_allclose(jax.grad(loss)(p_bad["x"])[keep], jax.grad(loss)(p["x"][keep]), rtol=1e-10, atol=1e-12)


def test_integer_args():
    f = lambda z, a: 0.5 * jnp.tanh(z * a["s"]) + a["x"]
    a = {"x": jnp.linspace(-1.0, 1.0, B * D).reshape(B, D), "s": jnp.int32(2)}
    rev = jdeq.ReversibleIteration(beta=0.5, tol=1e-8, maxiter=41)
    loss = lambda a, g: jnp.sum(jnp.sin(jdeq.fixed_point(f, jnp.zeros((B, D)), a, solver=rev, gradient=g).value))
    g1 = jax.grad(loss, allow_int=True)(a, jdeq.Reversible())
    g2 = jax.grad(loss, allow_int=True)(a, jdeq.Unrolled())
    np.testing.assert_allclose(g1["x"], g2["x"], rtol=1e-9)
    assert g1["s"].dtype == g2["s"].dtype == jax.dtypes.float0  # an int argument's cotangent


def test_gradient_reaches_values_the_cell_closes_over():
    """A cell that closes over a traced value (here ``w`` under ``jit``): the reversible gradient
    reaches it, as it reaches the same value passed in ``args``."""
    x = jnp.linspace(0.1, 1.0, B * D).reshape(B, D)
    rev = jdeq.ReversibleIteration(beta=0.5, tol=1e-10, maxiter=61)

    def closed(w):
        f = lambda z, a: 0.5 * jnp.tanh(w * z) + a  # noqa: E731
        return jnp.sum(jnp.sin(jdeq.fixed_point(f, jnp.zeros((B, D)), x, solver=rev, gradient=jdeq.Reversible()).value))

    def passed(w):
        f = lambda z, a: 0.5 * jnp.tanh(a[0] * z) + a[1]  # noqa: E731
        return jnp.sum(jnp.sin(jdeq.fixed_point(f, jnp.zeros((B, D)), (w, x), solver=rev,
                                                gradient=jdeq.Reversible()).value))

    w = jnp.asarray(1.5)
    g = jax.jit(jax.grad(closed))(w)
    np.testing.assert_allclose(g, jax.grad(passed)(w), rtol=1e-10)
    assert abs(float(g)) > 1e-3


@pytest.mark.parametrize("stop_mode,stop_fraction", [("abs", 1.0), ("rel", 1.0), ("abs", 0.5)])
def test_the_gradients_forward_is_the_solvers_own(stop_mode, stop_fraction):
    """``gradient=jdeq.Reversible()`` runs the solver's own iteration, with its ``stop_mode`` and
    ``stop_fraction``, whether or not it is differentiated: the same stats and value as the
    solver run alone (``Implicit``'s forward). Rows converge at different speeds, so
    ``stop_fraction=0.5`` stops the loop before the slow ones converge (checked)."""
    c = jnp.asarray([0.1, 0.1, 0.1, 0.9, 0.9])[:, None] * jnp.ones((B, D))
    a = 1e3 * jnp.linspace(-1.0, 1.0, B * D).reshape(B, D)  # large states: abs and rel differ
    f = lambda z, p: p[0] * jnp.tanh(z / 1e3) * 1e3 + p[1]  # noqa: E731
    rev = jdeq.ReversibleIteration(beta=0.5, tol=1e-4, maxiter=201, stop_mode=stop_mode,
                                   stop_fraction=stop_fraction)
    run = lambda g: lambda p: jdeq.fixed_point(f, jnp.zeros((B, D)), p, solver=rev, gradient=g)  # noqa: E731
    ref = run(jdeq.Implicit())((c, a))
    primal = run(jdeq.Reversible())((c, a))
    differentiated, _ = jax.vjp(run(jdeq.Reversible()), (c, a))
    for sol in (primal, differentiated):
        np.testing.assert_array_equal(sol.stats.nsteps, ref.stats.nsteps)
        np.testing.assert_array_equal(sol.stats.converged, ref.stats.converged)
        np.testing.assert_allclose(sol.value, ref.value, rtol=1e-12)
    if stop_fraction < 1:
        assert not bool(ref.stats.converged.all()) and bool(ref.stats.converged[:3].all())
    else:
        other = "rel" if stop_mode == "abs" else "abs"
        alt = jdeq.fixed_point(f, jnp.zeros((B, D)), (c, a), solver=dataclasses.replace(rev, stop_mode=other))
        assert not np.array_equal(alt.stats.nsteps, ref.stats.nsteps)


def test_bad_input():
    with pytest.raises(TypeError) as e:
        jdeq.fixed_point(_f, jnp.zeros((B, D)), _params(), solver=jdeq.Anderson(), gradient=jdeq.Reversible())
    assert str(e.value) == ("`gradient=jdeq.Reversible()` needs `solver=jdeq.ReversibleIteration(...)` (the only "
                            "iteration it can invert); got solver Anderson.")
    with pytest.raises(ValueError) as e:
        jdeq.fixed_point(_f, jnp.zeros((B, D)), _params(), solver=jdeq.ReversibleIteration(trace=True),
                         gradient=jdeq.Reversible())
    assert str(e.value) == "`trace=True` is not supported with gradient=jdeq.Reversible()."
    with pytest.raises(NotImplementedError) as e:
        jdeq.fixed_point_states(_f, jnp.zeros((B, D)), _params(), solver=jdeq.ReversibleIteration())
    assert str(e.value) == ("ReversibleIteration does not record snapshots (jdeq.fixed_point_states / "
                            "correction); use another `solver` there.")
    rev, z = jdeq.ReversibleIteration(), jnp.zeros((B, D))
    for call in (lambda: rev.init(z), lambda: rev.update(None, 0, z, z)):  # no state-step form
        with pytest.raises(NotImplementedError) as e:
            call()
        assert str(e.value) == ("ReversibleIteration runs its own loop (each step evaluates f twice); "
                                "call solve().")
    for beta in (0.0, 1.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"^`beta` must be a number in \(0, 1\), got "):
            jdeq.ReversibleIteration(beta=beta)
    with pytest.raises(ValueError, match="tol"):
        jdeq.ReversibleIteration(tol=-1.0)


def test_benchmark_smoke(tmp_path, capsys):
    import json

    from benchmarks import reversible

    with jax.enable_x64(False):
        reversible.main(["--quick", "--betas", "0.5", "--nfes", "5", "--mem-maxiters", "16", "32",
                         "--epochs", "1", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "reversible.json").read_text())
    assert (tmp_path / "reversible.png").stat().st_size > 1000
    assert doc["machine"]["backend"]
    assert doc["drift"][0]["grad_error"] < 1e-3
    assert doc["accuracy"][0]["reversible_vs_own_unrolled"] < 1e-9
    mem = doc["memory"]
    assert mem[0]["reversible"] == mem[1]["reversible"] and mem[1]["unrolled"] > mem[0]["unrolled"]
    assert set(doc["training"]) == {"reversible", "implicit"}
    assert "test acc" in capsys.readouterr().out.strip().splitlines()[-4]


def test_gradient_equals_unrolled_when_the_best_iterate_is_not_the_last():
    """A cell that does not contract (``W`` of norm ~3): the residual rises and falls, so the
    returned lowest-residual iterate comes before the last step for some examples; its
    cotangent enters the reverse sweep at that step (checked: the value is not F(last z))."""
    p = _params(scale=3.0)
    rev = jdeq.ReversibleIteration(beta=0.5, tol=1e-30, maxiter=15)
    (l1, s1), (l2, s2) = _loss(p, rev, jdeq.Reversible()), _loss(p, rev, jdeq.Unrolled())
    assert float(l1) == float(l2)
    assert not bool(s1.converged.any())
    _close(_grads(p, rev, jdeq.Reversible()), _grads(p, rev, jdeq.Unrolled()), 1e-9)


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_an_example_already_within_tol_at_z0_takes_no_step(stop_mode):
    """The test at ``z0`` uses ``stop_mode``'s residual too: near the fixed point 2e4 of
    ``0.5 z + 1e4``, the relative residual (~1e-5) is under tol while the absolute one (~0.4)
    is not, so only ``"rel"`` stops before its first step (one evaluation)."""
    f = lambda z, c: 0.5 * z + c  # noqa: E731
    c = jnp.full((2, 3), 1e4)
    z0 = 2 * c + 0.5
    stats = jdeq.fixed_point(f, z0, c, solver=jdeq.ReversibleIteration(
        beta=0.8, tol=1e-3, maxiter=41, stop_mode=stop_mode)).stats
    assert float(stats.rel_residual.max()) < 1e-3 < float(stats.abs_residual.min()) or stop_mode == "abs"
    assert bool(stats.converged.all())
    if stop_mode == "rel":
        np.testing.assert_array_equal(stats.nsteps, 1)
    else:
        assert int(stats.nsteps.min()) > 1


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_trace_holds_the_residual_every_second_column(stop_mode):
    """``trace=True``: column 0 is the residual at ``z0``, column ``2 n`` the residual after step
    ``n`` (the evaluations in between measure nothing: NaN), NaN after an example stopped; the
    stats' counts are int32 whatever the default integer type (x64 here)."""
    f = lambda z, a: 0.5 * jnp.tanh(z) + a  # noqa: E731
    a = jnp.asarray([[0.3, -0.2], [0.0, 0.0]])  # the second example starts at its fixed point
    rev = jdeq.ReversibleIteration(beta=0.5, tol=1e-6, maxiter=9, stop_mode=stop_mode, trace=True)
    stats = jdeq.fixed_point(f, jnp.zeros_like(a), a, solver=rev).stats
    assert stats.nsteps.dtype == jnp.int32
    trace = np.asarray(stats.trace)
    assert trace.shape == (2, 9)
    z0_res = jdeq.fixed_point(f, jnp.zeros_like(a), a, solver=dataclasses.replace(rev, maxiter=1)).stats
    want0 = z0_res.rel_residual if stop_mode == "rel" else z0_res.abs_residual
    np.testing.assert_allclose(trace[:, 0], want0, rtol=1e-12)
    assert np.isnan(trace[:, 1::2]).all()
    for n in range(1, 5):  # the residual after n steps: a run whose budget is n steps
        st = jdeq.fixed_point(f, jnp.zeros_like(a), a, solver=dataclasses.replace(rev, maxiter=1 + 2 * n)).stats
        res = st.rel_residual if stop_mode == "rel" else st.abs_residual
        np.testing.assert_allclose(trace[0, 2 * n], res[0], rtol=1e-12)
    steps = (np.asarray(stats.nsteps) - 1) // 2
    assert steps[1] == 0 and steps[0] == 4  # (the budget: 4 steps)
    for b, k in enumerate(steps):
        assert np.isfinite(trace[b, 0:2 * k + 1:2]).all() and np.isnan(trace[b, 2 * k + 1:]).all()


def test_an_example_overflowing_from_the_start_gets_no_gradient_and_adds_none():
    """An example whose input is +inf (finite z0, f(z0) = inf: flagged non-finite, no step
    taken) gets a zero input gradient, and the shared weight's gradient is the one of the other
    examples alone: the reverse sweep gives it a zero cotangent and replays none of its steps
    (replaying one would rebuild z = -inf there, and ``0 * inf`` would reach the weight). The
    other examples' gradient is finite and equals ``Unrolled``'s (the cell and budget are
    chosen so the reconstruction's rounding stays small: at |x| up to 0.2 and tol 1e-10 this
    iteration runs ~70 steps and its reverse sweep overflows, even in float64)."""
    f = lambda z, p: p["a"] * z * z + p["x"]  # noqa: E731
    x = jnp.linspace(-0.1, 0.1, 4 * 3).reshape(4, 3).at[1].set(jnp.inf)
    rev = jdeq.ReversibleIteration(beta=0.5, tol=1e-8, maxiter=201)

    def loss(p, gradient=jdeq.Reversible()):
        sol = jdeq.fixed_point(f, jnp.zeros_like(p["x"]), p, solver=rev, gradient=gradient)
        return jnp.sum(jnp.sin(sol.value)), sol.stats

    p = {"a": jnp.asarray(1.0), "x": x}
    g, stats = jax.grad(loss, has_aux=True)(p)
    np.testing.assert_array_equal(stats.nonfinite, [False, True, False, False])
    keep = np.arange(4) != 1
    rest_p = {"a": p["a"], "x": x[keep]}
    g_rest, rest = jax.grad(loss, has_aux=True)(rest_p)
    assert bool(rest.converged.all())
    g_unrolled, _ = jax.grad(loss, has_aux=True)(rest_p, jdeq.Unrolled())
    assert all(bool(jnp.isfinite(v).all()) for v in jax.tree.leaves(g_rest))
    np.testing.assert_allclose(g_rest["a"], g_unrolled["a"], rtol=1e-10)
    np.testing.assert_allclose(g_rest["x"], g_unrolled["x"], rtol=1e-10)
    np.testing.assert_array_equal(g["x"][1], 0.0)
    np.testing.assert_allclose(g["x"][keep], g_rest["x"], rtol=1e-12)
    np.testing.assert_allclose(g["a"], g_rest["a"], rtol=1e-12)


def test_a_residual_equal_to_tol_is_not_under_it_and_ties_keep_the_first():
    """``f(z) = z + 0.25`` has no fixed point: every iterate's residual is exactly 0.25 (dyadic
    values, no rounding). With ``tol=0.25`` it is never *under* tol, so the example runs its
    whole budget and is not converged; among the equal residuals the first iterate is kept, so
    the value is ``f(z0)``, as in jdeq's shared loop."""
    f = lambda z, c: z + c  # noqa: E731
    c = jnp.full((2, 1), 0.25)
    rev = jdeq.ReversibleIteration(beta=0.5, tol=0.25, maxiter=9, stop_mode="abs")
    sol = jdeq.fixed_point(f, jnp.zeros_like(c), c, solver=rev)
    np.testing.assert_array_equal(sol.stats.abs_residual, 0.25)
    np.testing.assert_array_equal(sol.stats.nsteps, 9)
    assert not bool(sol.stats.converged.any())
    np.testing.assert_array_equal(sol.value, 0.25)
