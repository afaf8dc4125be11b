"""SHINE (``jdeq.Implicit(shine=...)``): the forward solver's inverse-Jacobian estimate reused in
the backward pass. Checks the estimates themselves (secant conditions, transpose consistency,
per-example freezing), each mode's gradient against a tight float64 reference, forward mode,
jit / vmap, bad input, and the benchmark's quick mode."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest


import jdeq
from jdeq._loop import run_loop

N, D = 3, 6


def cell(z, p):
    return jnp.tanh(z @ p["W"].T + p["x"])


def make_params(seed=0, w_norm=0.8, n=N):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(D, D))
    W = w_norm * W / np.linalg.norm(W, 2)
    return {"W": jnp.asarray(W), "x": jnp.asarray(rng.normal(size=(n, D)))}


def readout(z):
    w = jnp.asarray(np.random.default_rng(7).normal(size=z.shape[-1]), z.dtype)
    return jnp.sum(jnp.sin(z) * w)


def loss(p, solver, gradient):
    z = jdeq.fixed_point(cell, jnp.zeros_like(p["x"]), p, solver=solver, gradient=gradient).value
    return readout(z)


FWD = {"broyden": jdeq.Broyden(tol=1e-10, maxiter=60), "anderson": jdeq.Anderson(tol=1e-10, maxiter=60)}
TIGHT_BWD = dict(tol=1e-12, maxiter=300)


def _flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(tree)])


def _rel(a, b):
    a, b = _flat(a), _flat(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@functools.partial(jax.jit, static_argnums=0)
def _final_state(solver, p):
    """The forward solve's (value, stats, final state) on ``cell``."""
    return run_loop(solver, lambda z: cell(z, p), jnp.zeros_like(p["x"]), solver.maxiter, keep_state=True)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _estimate(solver, state, b, transpose):
    return solver.inverse_estimate(state, b, transpose=transpose)


def _exact_inverse(p, z, transpose):
    """Dense ``(I - J)^{-1}`` (or its transpose) per example at ``z`` (the value ``f(z_b)``)."""
    s = 1.0 - jnp.tanh(z @ p["W"].T + p["x"]) ** 2  # J = diag(s) W  per example
    a = jnp.eye(D)[None] - s[:, :, None] * p["W"][None]
    a = jnp.swapaxes(a, 1, 2) if transpose else a
    return jnp.linalg.inv(a)


# ----------------------------------------------------------------------------- the estimates


@pytest.mark.parametrize("name", ["broyden", "anderson"])
def test_estimate_transpose_is_the_adjoint(name):
    """<(I-J)^{-T}-estimate b1, b2> == <b1, (I-J)^{-1}-estimate b2> per example: the two
    directions come from one linear operator."""
    with jax.enable_x64(True):
        solver = FWD[name]
        p = make_params()
        _, _, state = _final_state(solver, p)
        rng = np.random.default_rng(3)
        b1, b2 = (jnp.asarray(rng.normal(size=(N, D))) for _ in range(2))
        lhs = jnp.sum(_estimate(solver, state, b1, True) * b2, axis=1)
        rhs = jnp.sum(b1 * _estimate(solver, state, b2, False), axis=1)
        np.testing.assert_allclose(lhs, rhs, rtol=1e-6)
        assert not np.allclose(_estimate(solver, state, b1, True), b1)  # not the identity


def test_broyden_estimate_meets_the_latest_secant_condition():
    """After the update that saw the pair (dz, dg), the estimate maps -dg to dz:
    (I - J)^{-1} (-dg) ~ -B (-dg) = dz (Sherman-Morrison's secant condition)."""
    with jax.enable_x64(True):
        solver = jdeq.Broyden(memory=3)
        p = make_params()
        z = jnp.asarray(np.random.default_rng(1).normal(size=(N, D)))
        state = solver.init(z)
        pairs = []
        for k in range(1, 7):  # more steps than memory: the ring buffer wraps
            fz = cell(z, p)
            pairs.append((z, fz - z))
            z, state = solver.update(state, k, z, fz)
        (z0, g0), (z1, g1) = pairs[-2:]
        est = _estimate(solver, state, -(g1 - g0), False)
        np.testing.assert_allclose(est, z1 - z0, rtol=1e-8, atol=1e-12)


def test_anderson_estimate_meets_every_secant_condition():
    """For a linear f the Anderson estimate is exact on the span of the residual differences:
    (I - J)^{-1} (-(g_i - g_r)) = x_i - x_r for every stored pair."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        A = jnp.asarray(0.5 * rng.normal(size=(D, D)) / np.sqrt(D))
        c = jnp.asarray(rng.normal(size=(N, D)))
        f = lambda z: z @ A.T + c  # noqa: E731
        solver = jdeq.Anderson(memory=4, ridge=0.0, tol=1e-14, maxiter=5)
        _, _, (fs, gs, gram) = run_loop(solver, f, jnp.zeros((N, D)), 5, keep_state=True)
        xs = fs - gs  # the history keeps f(x_i) = x_i + g_i
        # with ridge 0, -(g_i - g_r) = (I - A)(x_i - x_r) maps back to x_i - x_r
        for i in range(4):
            for r in range(4):
                if i == r:
                    continue
                b = (jnp.eye(D) - A) @ (xs[:, i] - xs[:, r]).T
                est = _estimate(solver, (fs, gs, gram), b.T, False)
                np.testing.assert_allclose(est, xs[:, i] - xs[:, r], rtol=1e-6, atol=1e-9)


def _anderson_history(memory, evals, ridge):
    """Anderson's state after ``evals`` evaluations of a linear ``f`` (``memory`` slots; fewer
    evaluations than slots leaves empty ones), with ``A`` and ``xs``."""
    rng = np.random.default_rng(5)
    A = jnp.asarray(0.5 * rng.normal(size=(D, D)) / np.sqrt(D))
    c = jnp.asarray(rng.normal(size=(N, D)))
    solver = jdeq.Anderson(memory=memory, ridge=ridge, tol=1e-14, maxiter=evals)
    _, _, state = run_loop(solver, lambda z: z @ A.T + c, jnp.zeros((N, D)), evals, keep_state=True)
    return solver, state, A


def _filled(gram):
    """How many slots hold a residual (the same count in every row); asserts some are empty."""
    filled = np.sum(np.diagonal(np.asarray(gram), axis1=1, axis2=2) > 0, axis=1)
    assert np.all(filled == filled[0]) and 3 <= filled[0] < gram.shape[-1], filled
    return int(filled[0])


def test_anderson_estimate_of_a_partial_history_is_exact_on_its_span_and_identity_off_it():
    """Before the ring buffer fills (4 stored residuals, 6 slots), the empty slots are ignored: for a
    linear f the estimate maps -(g_i - g_r) to x_i - x_r, and ``b`` orthogonal to every residual
    difference is returned unchanged (J = 0 there, as documented), even where ``b`` is not
    orthogonal to the stored residuals themselves."""
    with jax.enable_x64(True):
        solver, (fs, gs, gram), A = _anderson_history(memory=6, evals=5, ridge=0.0)
        k = _filled(gram)
        xs = fs - gs
        for i, r in [(0, k - 1), (1, k - 1), (k - 1, 0)]:
            b = (jnp.eye(D) - A) @ (xs[:, i] - xs[:, r]).T
            np.testing.assert_allclose(_estimate(solver, (fs, gs, gram), b.T, False), xs[:, i] - xs[:, r],
                                       rtol=1e-6, atol=1e-9)
        rng = np.random.default_rng(4)
        for transpose, hist in ((False, gs), (True, fs)):  # the adjoint is b - dG H^{-1} dF^T b
            b = rng.normal(size=(N, D))
            for n in range(N):  # project out every difference h_i - h_0 of the four stored slots
                q, _ = np.linalg.qr(np.asarray(hist[n, 1:k] - hist[n, :1]).T)
                b[n] -= q @ (q.T @ b[n])
            # ... but not the stored vectors themselves
            assert np.all(np.abs(np.einsum("nmd,nd->nm", np.asarray(hist[:, :k]), b)) > 1e-3)
            est = _estimate(solver, (fs, gs, gram), jnp.asarray(b), transpose)
            np.testing.assert_allclose(est, b, rtol=1e-12, atol=1e-12)


def test_anderson_estimate_ridge_is_relative_to_the_difference_gram_diagonal():
    """``ridge`` regularizes H = dG^T dG as H + ridge diag(H): the estimate equals
    ``b - dF (H + ridge diag H)^{-1} dG^T b`` (dF = f_i - f_r, dG = g_i - g_r, r the stored
    residual of smallest norm), written out here in NumPy, with a ridge large enough to matter."""
    with jax.enable_x64(True):
        ridge = 0.5
        solver, (fs, gs, gram), _ = _anderson_history(memory=6, evals=5, ridge=ridge)
        b = np.random.default_rng(6).normal(size=(N, D))
        k = _filled(gram)
        for transpose in (False, True):
            est = np.asarray(_estimate(solver, (fs, gs, gram), jnp.asarray(b), transpose))
            for n in range(N):
                f_, g_ = np.asarray(fs[n, :k]), np.asarray(gs[n, :k])
                r = int(np.argmin(np.sum(g_ * g_, axis=1)))
                rest = [i for i in range(k) if i != r]
                dF, dG = (f_[rest] - f_[r]).T, (g_[rest] - g_[r]).T
                H = dG.T @ dG
                Hr = H + ridge * np.diag(np.diag(H))
                ref = b[n] - (dG @ np.linalg.solve(Hr, dF.T @ b[n]) if transpose
                              else dF @ np.linalg.solve(Hr, dG.T @ b[n]))
                np.testing.assert_allclose(est[n], ref, rtol=1e-9, atol=1e-12)
                # and the ridge matters at this size: without it the estimate is elsewhere
                ref0 = b[n] - dF @ np.linalg.solve(H, dG.T @ b[n])
                assert transpose or np.max(np.abs(ref0 - ref)) > 1e-3


def test_forward_state_is_frozen_per_example():
    """An example that converges early keeps the solver state of its own last step: the same
    estimate as when it is solved alone (without the freeze, later no-op steps of the batch
    would overwrite its history)."""
    with jax.enable_x64(True):
        solver = jdeq.Broyden(tol=1e-9, maxiter=60, memory=3)
        p = make_params()
        p_easy = {"W": p["W"], "x": p["x"].at[0].set(0.0)}  # z* = 0: converges at once
        z_all, stats, state_all = _final_state(solver, p_easy)
        assert stats.nsteps[0] < stats.nsteps[1]
        _, _, state_one = _final_state(solver, {"W": p["W"], "x": p_easy["x"][:1]})
        b = jnp.asarray(np.random.default_rng(0).normal(size=(N, D)))
        est_all = _estimate(solver, state_all, b, True)[0]
        est_one = _estimate(solver, state_one, b[:1], True)[0]
        np.testing.assert_allclose(est_all, est_one, rtol=1e-12)


@pytest.mark.parametrize("name", ["broyden", "anderson"])
def test_estimate_approximates_the_exact_adjoint(name):
    """At a converged forward solve the estimate is a useful (not exact) adjoint: closer to
    the exact (I - J)^{-T} b than JFB's b is (the estimate is only accurate on the directions
    the solver explored)."""
    with jax.enable_x64(True):
        solver = FWD[name]
        p = make_params()
        z, _, state = _final_state(solver, p)
        b = jnp.asarray(np.random.default_rng(5).normal(size=(N, D)))
        exact = jnp.einsum("nij,nj->ni", _exact_inverse(p, z, transpose=True), b)
        est = _estimate(solver, state, b, True)
        assert np.linalg.norm(est - exact) < 0.9 * np.linalg.norm(b - exact)


# ----------------------------------------------------------------------------- gradients


_loss_grad = jax.jit(jax.grad(loss), static_argnums=(1, 2))


def _reference(p, name):
    return _loss_grad(p, FWD[name], jdeq.Implicit(**TIGHT_BWD))


def _direct_by_hand(p, solver):
    """SHINE's gradient written out: u = estimate(dL/dz*), then one VJP of f to the params."""
    z, _, state = _final_state(solver, p)
    g = jax.grad(readout)(z)
    u = _estimate(solver, state, g, True)
    _, vjp = jax.vjp(lambda q: cell(z, q), p)
    return vjp(u)[0]


@pytest.mark.parametrize("name", ["broyden", "anderson"])
def test_direct_is_the_estimate_then_one_vjp(name):
    with jax.enable_x64(True):
        p = make_params()
        got = _loss_grad(p, FWD[name], jdeq.Implicit(shine="direct"))
        want = _direct_by_hand(p, FWD[name])
        assert _rel(got, want) < 1e-10
        ref = _reference(p, name)
        jfb = _loss_grad(p, FWD[name], jdeq.JacobianFree())
        # an estimate (not exact), better than dropping (I - J)^{-T} altogether
        assert 1e-6 < _rel(got, ref) < _rel(jfb, ref)


@pytest.mark.parametrize("name", ["broyden", "anderson"])
def test_refine_reaches_the_exact_gradient(name):
    with jax.enable_x64(True):
        p = make_params()
        ref = _reference(p, name)
        got = _loss_grad(p, FWD[name], jdeq.Implicit(shine="refine", tol=1e-10, maxiter=300))
        assert _rel(got, ref) < 1e-8


def test_fallback_per_example():
    """shine_tol between the examples' estimate residuals: the accepted examples get the
    estimate (as "direct", after one matvec), the others the full solve (as the reference)."""
    with jax.enable_x64(True):
        p = make_params(n=4)
        solver = FWD["broyden"]
        ref = _reference(p, "broyden")
        direct = _loss_grad(p, solver, jdeq.Implicit(shine="direct"))
        # each example's residual ||g - (I - J^T) u0|| / ||g||
        z, _, state = _final_state(solver, p)
        g = jax.grad(readout)(z)
        u0 = _estimate(solver, state, g, True)
        jt = jnp.einsum("nij,nj->ni", jnp.linalg.inv(_exact_inverse(p, z, transpose=True)), u0)
        res = np.asarray(jnp.linalg.norm(g - jt, axis=1) / jnp.linalg.norm(g, axis=1))
        cut = float(np.median(res))
        accept = res <= cut
        assert accept.any() and not accept.all()
        seen = []
        grad = _loss_grad(p, solver, jdeq.Implicit(shine="fallback", shine_tol=cut, tol=1e-12, maxiter=300,
                                                   callback=seen.append))
        jax.effects_barrier()
        # d loss / d x_i involves example i only
        np.testing.assert_allclose(grad["x"][accept], direct["x"][accept], rtol=1e-10)
        np.testing.assert_allclose(grad["x"][~accept], ref["x"][~accept], rtol=1e-7)
        nsteps = np.asarray(seen[-1].nsteps)
        assert (nsteps[accept] == 1).all() and (nsteps[~accept] > 2).all()
        # an accepted example reports the estimate's own residual; a refined one its solve's
        abs_res = np.asarray(seen[-1].abs_residual)
        np.testing.assert_allclose(abs_res[accept], (res * np.linalg.norm(g, axis=1))[accept], rtol=1e-6)
        assert (abs_res[~accept] < 1e-10 * np.linalg.norm(g, axis=1)[~accept]).all()


def test_direct_reports_the_residual_of_the_estimate_to_the_callback():
    """With a callback, "direct" spends one matvec on stats: per example ``||g - (I - J^T) u0||``
    and that divided by ``||g||``, the quantity "fallback" tests against shine_tol."""
    with jax.enable_x64(True):
        p = make_params(n=4)
        solver = FWD["anderson"]
        z, _, state = _final_state(solver, p)
        g = jax.grad(readout)(z)
        u0 = _estimate(solver, state, g, True)
        jt = jnp.einsum("nij,nj->ni", jnp.linalg.inv(_exact_inverse(p, z, transpose=True)), u0)
        abs_res = np.asarray(jnp.linalg.norm(g - jt, axis=1))
        seen = []
        _loss_grad(p, solver, jdeq.Implicit(shine="direct", callback=seen.append))
        jax.effects_barrier()
        st = seen[-1]
        np.testing.assert_allclose(st.abs_residual, abs_res, rtol=1e-6)
        np.testing.assert_allclose(st.rel_residual, abs_res / np.linalg.norm(g, axis=1), rtol=1e-6)
        np.testing.assert_array_equal(st.nsteps, 0)


def test_forward_mode_refine_and_direct():
    """jax.jvp uses the non-transposed estimate: refine matches the exact tangent, direct is
    the estimate applied to df/dp . dp."""
    with jax.enable_x64(True):
        p = make_params()
        solver = FWD["broyden"]
        dp = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) * 0.1, p)
        sol = lambda q, grad: jdeq.fixed_point(cell, jnp.zeros_like(q["x"]), q, solver=solver,  # noqa: E731
                                               gradient=grad).value
        jvp = jax.jit(lambda q, t, grad: jax.jvp(lambda r: sol(r, grad), (q,), (t,))[1], static_argnums=2)
        ref = jvp(p, dp, jdeq.Implicit(**TIGHT_BWD))
        assert _rel(jvp(p, dp, jdeq.Implicit(shine="refine", **TIGHT_BWD)), ref) < 1e-8
        z, _, state = _final_state(solver, p)
        rhs = jax.jvp(lambda q: cell(z, q), (p,), (dp,))[1]
        want = _estimate(solver, state, rhs, False)
        assert _rel(jvp(p, dp, jdeq.Implicit(shine="direct")), want) < 1e-10


def test_vmap_of_per_example_code_matches_batched(mode="fallback"):
    """Per-example solves under jax.vmap (the loop's custom batching rule) carry each example's
    own state: same gradient as the batched call."""
    with jax.enable_x64(True):
        p = make_params()
        grad = jdeq.Implicit(shine=mode, shine_tol=0.3, **TIGHT_BWD)
        solver = FWD["broyden"]

        def one(q):
            def per(x):
                return jdeq.fixed_point(cell, jnp.zeros(D), {"W": q["W"], "x": x}, solver=solver,
                                        gradient=grad, batched=False).value
            return readout(jax.vmap(per)(q["x"]))

        got = jax.jit(jax.grad(one))(p)
        want = _loss_grad(p, solver, grad)
        assert _rel(got, want) < 1e-9


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shine": "yes"}, "`shine`"),
        ({"shine": True}, "`shine`"),
        ({"shine": "direct", "solver": "gmres"}, "`shine="),
        ({"shine": "fallback", "shine_tol": 0.0}, "`shine_tol`"),
        ({"shine": "fallback", "shine_tol": "big"}, "`shine_tol`"),
    ],
)
def test_bad_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jdeq.Implicit(**kwargs)


def test_shine_needs_a_solver_with_an_estimate():
    """The message names ``shine``, the solver that keeps no estimate, and the fix, in full."""
    p = make_params()
    with pytest.raises(ValueError) as e:
        jax.grad(loss)(p, jdeq.FixedPointIteration(), jdeq.Implicit(shine="direct"))
    assert str(e.value) == (
        "`shine='direct'` reuses the forward solver's inverse-Jacobian estimate, which "
        "FixedPointIteration does not keep: use solver=jdeq.Broyden(...) or jdeq.Anderson(...) "
        "for the forward solve, or drop `shine`.")


def test_default_path_keeps_no_state():
    """Without shine the forward loop neither masks nor returns the solver state."""
    p = make_params()
    solver = jdeq.Broyden(maxiter=5)

    def loop_eqns(keep):
        jaxpr = jax.make_jaxpr(lambda x: run_loop(solver, lambda z: cell(z, {"W": p["W"], "x": x}),
                                                  jnp.zeros_like(x), 5, keep_state=keep))(p["x"])
        (loop,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "while"]
        return len(loop.params["body_jaxpr"].jaxpr.eqns), len(jaxpr.jaxpr.outvars)

    (body_off, out_off), (body_on, out_on) = loop_eqns(False), loop_eqns(True)
    assert body_on > body_off and out_on > out_off
    assert not jdeq.Implicit().uses_forward_state(jdeq.FixedPointIteration())
    assert jdeq.Implicit(shine="refine").uses_forward_state(solver)


@pytest.mark.parametrize("name", ["broyden", "anderson"])
@pytest.mark.parametrize("dtype,x64", [("float32", True), ("bfloat16", False)], ids=["float32-x64", "bfloat16"])
def test_estimate_keeps_the_state_dtype(name, dtype, x64):
    """The inverse-Jacobian estimate is computed in the state's dtype: no float64 under x64 for
    a float32 solve, no float32 for a bfloat16 one (nothing of the solver's own promotes)."""
    with jax.enable_x64(x64):
        p = jax.tree.map(lambda a: a.astype(dtype), make_params())
        solver = dataclasses.replace(FWD[name], tol=1e-3, maxiter=8)
        _, _, state = _final_state(solver, p)
        b = jnp.ones_like(p["x"])
        for transpose in (False, True):
            est = _estimate(solver, state, b, transpose)
            assert est.dtype == jnp.dtype(dtype) and bool(jnp.all(jnp.isfinite(est)))


def test_direct_rel_residual_of_a_tiny_cotangent_keeps_its_floor():
    """The "direct" stats' relative residual is ``||g - (I - J^T) u0|| / (||g|| + 1e-8)``, the
    shared loop's floor: for a cotangent of size ~1e-9 it stays positive (not divided by a
    negative ``||g|| - eps``) and is the absolute one over ``||g|| + 1e-8``."""
    with jax.enable_x64(True):
        p = make_params(n=4)
        solver = FWD["anderson"]
        seen = []
        gradient = jdeq.Implicit(shine="direct", callback=seen.append)
        jax.grad(lambda p: 1e-9 * loss(p, solver, gradient))(p)
        jax.effects_barrier()
        z, _, _ = _final_state(solver, p)
        g_norm = np.linalg.norm(1e-9 * np.asarray(jax.grad(readout)(z)), axis=1)
        st = seen[-1]
        assert (g_norm < 1e-8).all() and (np.asarray(st.rel_residual) > 0).all()
        np.testing.assert_allclose(st.rel_residual, np.asarray(st.abs_residual) / (g_norm + 1e-8), rtol=1e-6)


def test_refine_runs_the_run_time_backward_budget():
    """``Implicit(shine="refine", maxiter=3)``: the refinement from the estimate stops after 3
    evaluations (tol out of reach), not after the forward solver's 60."""
    with jax.enable_x64(True):
        p = make_params()
        seen = []
        _loss_grad(p, FWD["broyden"], jdeq.Implicit(shine="refine", tol=1e-30, maxiter=3, callback=seen.append))
        jax.effects_barrier()
        np.testing.assert_array_equal(seen[-1].nsteps, 3)


def test_refine_from_a_non_finite_estimate_starts_at_zero():
    """A non-finite estimate counts as failed: "refine" then runs the solve from zero, exactly
    the default backward's iterations (here u <- b + 0.5 u, five evaluations)."""
    from jdeq._gradients import _shine_solve

    with jax.enable_x64(True):
        b = jnp.ones((2, 3))
        F = lambda u: b + 0.5 * u  # noqa: E731  (A = 0.5 I)
        solver = jdeq.FixedPointIteration(tol=1e-30, maxiter=5)
        u0 = jnp.asarray([[jnp.nan, 0.0, 0.0], [0.3, 0.3, 0.3]])
        u, _ = _shine_solve("refine", 0.5, solver, F, b, u0, 5, want_stats=True)
        from_zero, _ = solver.solve(F, jnp.zeros_like(b), 5)
        np.testing.assert_array_equal(u[0], from_zero[0])
        assert not np.allclose(u[1], from_zero[1])  # (the finite estimate is used)


def test_direct_converged_reads_the_backward_stop_mode():
    """"direct" reports ``converged`` as the backward solver would: the estimate's relative
    residual under ``tol`` with ``stop_mode="rel"``, its absolute one with ``"abs"``. The
    cotangent is scaled by 1e3 so that a tol between the two separates them for every example."""
    with jax.enable_x64(True):
        p = make_params(n=4)
        solver = FWD["anderson"]

        grads = []

        def stats(**kw):
            seen = []
            gradient = jdeq.Implicit(shine="direct", callback=seen.append, **kw)
            grads.append(jax.grad(lambda p: 1e3 * loss(p, solver, gradient))(p))
            jax.effects_barrier()
            return seen[-1]

        st = stats()
        rel, abs_ = np.asarray(st.rel_residual), np.asarray(st.abs_residual)
        assert rel.max() < abs_.min()
        tol = float(np.sqrt(rel.max() * abs_.min()))
        np.testing.assert_array_equal(stats(tol=tol, stop_mode="rel").converged, True)
        np.testing.assert_array_equal(stats(tol=tol, stop_mode="abs").converged, False)
        # a residual equal to tol is not under it (the same residuals: tol plays no part in them)
        i = int(np.argsort(abs_)[1])
        np.testing.assert_array_equal(stats(tol=float(abs_[i]), stop_mode="abs").converged, abs_ < abs_[i])
        # the callback only observes: the gradient is the one without it
        plain = jax.grad(lambda p: 1e3 * loss(p, solver, jdeq.Implicit(shine="direct")))(p)
        for g in grads:
            np.testing.assert_allclose(_flat(g), _flat(plain), rtol=1e-12)


def test_fallback_check_of_a_tiny_cotangent_keeps_the_floor():
    """"fallback" tests ``||g - (I - J^T) u0|| / (||g|| + 1e-8)`` against shine_tol; for a
    cotangent of size ~1e-9 that ratio stays positive, so a shine_tol under every example's
    ratio sends them all to the full solve (none accepted on a negative ratio)."""
    with jax.enable_x64(True):
        p = make_params(n=4)
        solver = FWD["broyden"]

        def stats(gradient):
            seen = []
            jax.grad(lambda p: 1e-9 * loss(p, solver, dataclasses.replace(gradient, callback=seen.append)))(p)
            jax.effects_barrier()
            return seen[-1]

        rel = np.asarray(stats(jdeq.Implicit(shine="direct")).rel_residual)
        assert (rel > 0).all()
        st = stats(jdeq.Implicit(shine="fallback", shine_tol=float(rel.min()) / 2, tol=1e-12, maxiter=300))
        assert (np.asarray(st.nsteps) > 1).all()


def test_fallback_accepts_a_ratio_equal_to_shine_tol():
    """"an example at most shine_tol keeps u0": with shine_tol equal to one example's own ratio
    (read from a run that accepts all, where the stats report it), that example is accepted
    (one matvec) and the examples with a larger ratio are not."""
    with jax.enable_x64(True):
        p = make_params(n=4)
        solver = FWD["broyden"]

        def stats(shine_tol):
            seen = []
            gradient = jdeq.Implicit(shine="fallback", shine_tol=shine_tol, tol=1e-12, maxiter=300,
                                     callback=seen.append)
            _loss_grad(p, solver, gradient)
            jax.effects_barrier()
            return seen[-1]

        rel0 = np.asarray(stats(1e9).rel_residual)  # every example accepted: its ratio reported
        i = int(np.argsort(rel0)[1])
        np.testing.assert_array_equal(np.asarray(stats(float(rel0[i])).nsteps) == 1, rel0 <= rel0[i])


def test_fallback_refused_examples_run_the_default_solve_from_zero():
    """A refused example runs the backward solve from zero with the run-time budget: its
    ``nsteps`` is the default backward's plus the check's matvec, and with ``maxiter=3`` (tol
    out of reach) it stops after 3 evaluations."""
    with jax.enable_x64(True):
        p = make_params(n=4)
        solver = FWD["broyden"]

        def stats(**kw):
            seen = []
            _loss_grad(p, solver, jdeq.Implicit(callback=seen.append, **kw))
            jax.effects_barrier()
            return np.asarray(seen[-1].nsteps)

        default = stats(tol=1e-12, maxiter=300)
        refused = stats(shine="fallback", shine_tol=1e-30, tol=1e-12, maxiter=300)
        np.testing.assert_array_equal(refused, default + 1)
        np.testing.assert_array_equal(stats(shine="fallback", shine_tol=1e-30, tol=1e-30, maxiter=3), 3 + 1)


def test_fallback_stats_per_example_accepted_refused_converged_or_not():
    """"fallback"'s stats: an accepted example is converged and finite (one matvec); a refused
    one reports its own solve, converged (row 2) or gone non-finite (row 1, a divergent map)."""
    from jdeq._gradients import _shine_solve

    with jax.enable_x64(True):
        b = jnp.ones((3, 2))
        slope = jnp.asarray([0.5, 3.0, 0.5])[:, None]
        F = lambda u: b + slope * u  # noqa: E731  row 1 diverges: u <- 1 + 3u
        u0 = jnp.stack([2 * b[0], jnp.zeros(2), jnp.zeros(2)])  # row 0: the exact solution
        solver = jdeq.FixedPointIteration(tol=1e-10, maxiter=2000)
        u, st = _shine_solve("fallback", 0.5, solver, F, b, u0, 2000, want_stats=True)
        np.testing.assert_array_equal(st.nsteps[0], 1)
        np.testing.assert_array_equal(st.converged, [True, False, True])
        np.testing.assert_array_equal(st.nonfinite, [False, True, False])
        np.testing.assert_allclose(u[2], 2.0, rtol=1e-8)


@pytest.mark.parametrize("mode", ["direct", "fallback", "refine"])
def test_without_a_forward_state_shine_falls_back_to_the_default_backward(mode):
    """``attach`` without the forward solver's state (``jdeq.fixed_point_states`` keeps none)
    runs the default backward solve: each state's gradient is ``Implicit()``'s."""
    with jax.enable_x64(True):
        p = make_params()
        solver = FWD["broyden"]

        def grad(gradient):
            return jax.grad(lambda p: sum(readout(s) for s in jdeq.fixed_point_states(
                cell, jnp.zeros_like(p["x"]), p, states=2, solver=solver, gradient=gradient).value))(p)

        np.testing.assert_allclose(_flat(grad(jdeq.Implicit(shine=mode, **TIGHT_BWD))),
                                   _flat(grad(jdeq.Implicit(**TIGHT_BWD))), rtol=1e-12)
