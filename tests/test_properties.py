"""Property tests (hypothesis) on random contractive cells of random shapes, dtypes and pytrees.

Each drawn problem is a map ``f(z, p) = act(W . flat(z) + x)`` on a pytree state (one array, a
tuple, a dict or a nested dict/tuple mix) whose leaves share a leading batch axis (1-4) and have
random trailing shapes (rank 1-3, sizes 1-3). ``W`` mixes the whole flattened state of an example
(across leaves) and has spectral norm ``rho <= 0.85``; ``act`` is the identity or ``tanh``
(1-Lipschitz), so ``f`` is a ``rho``-contraction with a unique fixed point, which numpy computes
independently in float64 (a linear solve, or 400 Picard steps). Dtypes: float32, float64, and a
float32/float64 mix of leaves. The properties:

1. ``test_every_solver_finds_the_fixed_point``: FixedPointIteration, Anderson, Broyden and
   jaxopt's FixedPointIteration / AndersonAcceleration (via JaxoptSolver) all converge, to the
   reference fixed point within a dtype-dependent bound, with ``z0``'s structure/shapes/dtypes.
2. ``test_implicit_gradient_matches_finite_differences_and_unrolled`` (float64): ``Implicit``
   gradients w.r.t. ``(W, x)`` (backward solver drawn: the forward one, GMRES, BiCGSTAB) equal
   central finite differences along random directions and autodiff through ``Unrolled``.
3. ``test_jit_vmap_grad_and_permutation_compose``: ``jit(solve) == solve``; ``vmap`` over an
   extra leading axis of ``args`` equals a Python loop (values and per-example stats); ``jit(grad)
   == grad``; permuting the batch permutes the value and every per-example stat.
4. ``test_residuals_converged_and_batch_permutation`` (affine/tanh on one array, float64, up to
   rho 0.95, some solvers budget-limited): the reported residuals are those of the returned
   value, ``converged`` means below ``tol``, only converged examples stop early, and permuting
   the batch permutes value and stats.

Every test is derandomized with no example database, so CI runs the same cases every time.
``pytest tests/test_properties.py --hypothesis-show-statistics`` prints how many ran;
``JDEQ_PROPERTY_SCALE=k`` multiplies every test's example count by ``k`` (a longer run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import jdeq

with warnings.catch_warnings():  # the one jaxopt import warning, as in jdeq/_jaxopt.py
    warnings.filterwarnings(
        "ignore", message="JAXopt is no longer maintained", category=DeprecationWarning
    )
    import jaxopt


# JDEQ_PROPERTY_SCALE=k runs k times as many examples (a longer, still reproducible run).
SCALE = int(os.environ.get("JDEQ_PROPERTY_SCALE", "1"))


def _settings(n: int):
    """Reproducible: the same ``n * SCALE`` examples every run (derandomized, no database).

    No "explain" phase: re-running a failing case under coverage costs minutes per compile-heavy
    example; shrinking stays, for a small failing case.
    """
    return settings(
        max_examples=n * SCALE,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow],
    )


# ----------------------------------------------------------------------------- strategies

STRUCTURES = ("array", "tuple", "dict", "nested")
_TEMPLATES = {  # pytree skeletons; the leaves (0, 1, 2) are replaced by arrays
    "array": 0,
    "tuple": (0, 1),
    "dict": {"u": 0, "v": 1},
    "nested": {"a": (0, {"c": 1}), "b": 2},
}
TOL = {"float32": 1e-5, "float64": 1e-10, "mixed": 1e-5}  # relative solver tolerance per dtype


@dataclasses.dataclass(frozen=True)
class Problem:
    """A contractive problem, held in numpy (built into jax arrays under the right x64 mode)."""

    structure: str
    treedef: object
    trailing: tuple  # trailing shape of each leaf
    leaf_dtypes: tuple  # numpy dtype name of each leaf
    dtype: str  # "float32" | "float64" | "mixed"
    batch: int
    kind: str  # "affine" | "tanh"
    rho: float
    W: np.ndarray  # (dim, dim), spectral norm rho
    x: tuple  # injection leaves (batch, *trailing)
    z0: tuple  # starting leaves
    perm: np.ndarray

    @property
    def sizes(self):
        return [math.prod(t) for t in self.trailing]

    @property
    def dim(self):
        return sum(self.sizes)

    def context(self):
        """float64 needs x64 on; float32 problems run in JAX's default mode."""
        return jax.enable_x64(True) if self.dtype != "float32" else contextlib.nullcontext()

    def tree(self, leaves):
        return jax.tree_util.tree_unflatten(self.treedef, [jnp.asarray(a) for a in leaves])

    def args(self):
        return {"W": jnp.asarray(self.W), "x": self.tree(self.x)}

    def permuted(self):
        """``(z0, args)`` with the batch permuted by ``perm``."""
        x = [a[self.perm] for a in self.x]
        z0 = [a[self.perm] for a in self.z0]
        return self.tree(z0), {"W": jnp.asarray(self.W), "x": self.tree(x)}

    def cell(self):
        return CELLS[self.kind]

    def reference(self) -> np.ndarray:
        """The fixed point in float64 numpy, as a ``(batch, dim)`` matrix (leaf order)."""
        W = self.W.astype(np.float64)
        x = np.concatenate([a.astype(np.float64).reshape(self.batch, -1) for a in self.x], axis=1)
        if self.kind == "affine":
            return np.linalg.solve(np.eye(self.dim) - W, x.T).T
        z = np.zeros_like(x)
        for _ in range(400):  # rho <= 0.85: 0.85**400 ~ 1e-28
            z = np.tanh(z @ W.T + x)
        return z


@st.composite
def problems(draw, dtypes=("float32", "float64", "mixed"), kinds=("affine", "tanh"), min_rho=0.0):
    structure = draw(st.sampled_from(STRUCTURES))
    treedef = jax.tree_util.tree_structure(_TEMPLATES[structure])
    n = treedef.num_leaves
    batch = draw(st.integers(1, 4))
    trailing = tuple(
        tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))) for _ in range(n)
    )
    dtype = draw(st.sampled_from(dtypes))
    if dtype == "mixed":
        leaf_dtypes = tuple(draw(st.sampled_from(["float32", "float64"])) for _ in range(n))
    else:
        leaf_dtypes = (dtype,) * n
    kind = draw(st.sampled_from(kinds))
    rho = draw(st.floats(min_rho, 0.85))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dim = sum(math.prod(t) for t in trailing)
    W = rng.normal(size=(dim, dim))
    W = rho * W / max(np.linalg.norm(W, 2), 1e-300)
    w_dtype = "float32" if dtype == "float32" else "float64"
    x = tuple(
        (scale * rng.normal(size=(batch, *t))).astype(dt) for t, dt in zip(trailing, leaf_dtypes)
    )
    z0 = tuple(rng.normal(size=(batch, *t)).astype(dt) for t, dt in zip(trailing, leaf_dtypes))
    return Problem(
        structure, treedef, trailing, leaf_dtypes, dtype, batch, kind, rho,
        W.astype(w_dtype), x, z0, rng.permutation(batch),
    )


# ----------------------------------------------------------------------------- the cells


def _mix(z, W):
    """``W`` applied to each example's whole flattened state, split back into ``z``'s leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(z)
    b = leaves[0].shape[0]
    flat = jnp.concatenate([a.reshape(b, -1).astype(W.dtype) for a in leaves], axis=1)
    y = jnp.dot(flat, W.T, precision=jax.lax.Precision.HIGHEST)
    out, start = [], 0
    for a in leaves:
        size = math.prod(a.shape[1:])
        out.append(y[:, start : start + size].reshape(a.shape))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)


def affine_cell(z, p):
    return jax.tree_util.tree_map(
        lambda y, x, a: (y + x).astype(a.dtype), _mix(z, p["W"]), p["x"], z
    )


def tanh_cell(z, p):
    return jax.tree_util.tree_map(
        lambda y, x, a: jnp.tanh(y + x).astype(a.dtype), _mix(z, p["W"]), p["x"], z
    )


CELLS = {"affine": affine_cell, "tanh": tanh_cell}


def _flat(tree) -> np.ndarray:
    leaves = [np.asarray(a, np.float64) for a in jax.tree_util.tree_leaves(tree)]
    return np.concatenate([a.reshape(a.shape[0], -1) for a in leaves], axis=1)


def _check_like(value, z0):
    """``value`` has ``z0``'s pytree structure and each leaf's shape and dtype."""
    assert jax.tree_util.tree_structure(value) == jax.tree_util.tree_structure(z0)
    for v, a in zip(jax.tree_util.tree_leaves(value), jax.tree_util.tree_leaves(z0)):
        assert v.shape == a.shape and v.dtype == a.dtype, (v.shape, v.dtype, a.shape, a.dtype)


def _readout_loss(f, solver, gradient, z0, readout, p, aux=False):
    """A linear readout of the fixed point: ``sum_leaves <c, z*>`` (and the Solution if aux)."""
    sol = jdeq.fixed_point(f, z0, p, solver=solver, gradient=gradient)
    loss = sum(jnp.vdot(c, v) for c, v in zip(readout, jax.tree_util.tree_leaves(sol.value)))
    return (loss, sol) if aux else loss


def _solver(name: str, tol: float):
    return {
        "fpi": jdeq.FixedPointIteration(tol=tol, maxiter=400),
        "anderson": jdeq.Anderson(tol=tol, maxiter=100, memory=5),
        "broyden": jdeq.Broyden(tol=tol, maxiter=100, memory=20),
    }[name]


# Every random shape compiles anew, and compilation is most of this file's run time: each
# example builds one jitted program, compiled cheaply: low LLVM optimization, XLA:CPU's elemental
# emitters (XLA's HLO passes still run; the properties are about numerics and JAX
# transformations, not code generation). This file: 76 s -> 55 s with the emitters flag.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                 "xla_cpu_use_fusion_emitters": False}


# ----------------------------------------------------------------------------- 1. same fixed point


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=_FAST_COMPILE)
def _solve_all(f, solvers, z0, p):
    return [jdeq.fixed_point(f, z0, p, solver=s) for s in solvers]


@_settings(10)
@given(problems())
def test_every_solver_finds_the_fixed_point(prob):
    ref = prob.reference()
    ref_norm = np.linalg.norm(ref, axis=1)
    tol = TOL[prob.dtype]
    abs_tol = tol * max(float(np.linalg.norm(ref)), 1e-3)  # jaxopt: one global absolute norm
    solvers = (
        _solver("fpi", tol),
        _solver("anderson", tol),
        _solver("broyden", tol),
        jdeq.JaxoptSolver(jaxopt.FixedPointIteration, tol=abs_tol, maxiter=400),
        jdeq.JaxoptSolver(jaxopt.AndersonAcceleration, tol=abs_tol, maxiter=200, history_size=5),
    )
    # ||z - z*|| <= ||f(z) - z|| / (1 - rho): a per-example bound from the stopping test, with
    # slack for rounding (float32 leaves round f(z) to ~1e-7 relative at each evaluation).
    slack = 4.0 / (1.0 - prob.rho)
    with prob.context():
        z0 = prob.tree(prob.z0)
        for solver, sol in zip(solvers, _solve_all(prob.cell(), solvers, z0, prob.args())):
            _check_like(sol.value, z0)
            assert np.asarray(sol.stats.converged).all(), (solver, sol.stats)
            nsteps = np.asarray(sol.stats.nsteps)
            assert ((nsteps >= 1) & (nsteps <= solver.maxiter)).all(), (solver, nsteps)
            err = np.linalg.norm(_flat(sol.value) - ref, axis=1)
            if isinstance(solver, jdeq.JaxoptSolver):  # its global absolute test
                bound = slack * solver.tol * np.ones_like(err)
            else:
                bound = slack * tol * np.maximum(ref_norm, 1e-3)
            assert (err <= bound).all(), (solver, err, bound)


# ----------------------------------------------------------------------------- 2. gradients

_UNROLLED = jdeq.FixedPointIteration(tol=1e-14, maxiter=250)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), compiler_options=_FAST_COMPILE)
def _gradient_checks(f, solver, backward, z0, readout, p, directions, eps):
    """Implicit grad, losses at ``p +- eps * t`` (for finite differences), Unrolled grad."""
    loss = functools.partial(_readout_loss, f, solver, jdeq.Implicit(solver=backward), z0, readout)
    value, g = jax.value_and_grad(loss)(p)
    shifted = jax.tree_util.tree_map(
        lambda a, t: jnp.concatenate([a + eps * t, a - eps * t]), p, directions
    )
    fd = jax.vmap(loss)(shifted)  # one batched solve for all the shifted problems
    k = fd.shape[0] // 2
    fd = (fd[:k] - fd[k:]) / (2 * eps)
    unrolled = functools.partial(_readout_loss, f, _UNROLLED, jdeq.Unrolled(), z0, readout)
    g_unrolled = jax.grad(unrolled)(p)
    return value, g, fd, g_unrolled


def _per_row(a):
    """Sum over every axis but the first."""
    return a.sum(axis=tuple(range(1, a.ndim)))


def _bcast(v, like):
    """``(k,)`` -> broadcastable against ``like`` of shape ``(k, ...)``."""
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree_util.tree_leaves(tree))))


# rho >= 0.05: Unrolled differentiates the last step z_k = f(z_{k-1}), exact only up to
# ||z_{k-1} - z*||; at rho ~ 0 a solve stops after one step from z0 and that error is O(1).
@_settings(8)
@given(
    problems(dtypes=("float64",), min_rho=0.05),
    st.sampled_from(["fpi", "anderson", "broyden"]),
    st.sampled_from([None, "gmres", "bicgstab"]),
)
def test_implicit_gradient_matches_finite_differences_and_unrolled(prob, forward, backward):
    rng = np.random.default_rng(prob.batch * 1000 + prob.dim)
    with jax.enable_x64(True):
        z0, p = prob.tree(prob.z0), prob.args()
        readout = [jnp.asarray(rng.normal(size=a.shape)) for a in prob.z0]
        # Two random directions t in parameter space, each of unit norm over the whole tree.
        dirs = jax.tree_util.tree_map(lambda a: rng.normal(size=(2, *a.shape)), p)
        norm = np.sqrt(sum(_per_row(d**2) for d in jax.tree_util.tree_leaves(dirs)))
        dirs = jax.tree_util.tree_map(lambda d: jnp.asarray(d / _bcast(norm, d)), dirs)
        loss, g, fd, g_unrolled = _gradient_checks(
            prob.cell(), _solver(forward, 1e-13), backward, z0, readout, p, dirs, 1e-5
        )
        assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(p)
        # <grad, t> == central finite difference along unit directions t (the FD error is
        # O(eps^2) plus rounding and solver tolerance over eps, ~1e-8 |loss|).
        leaves = zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(dirs))
        dots = sum(_per_row(np.asarray(a)[None] * np.asarray(t)) for a, t in leaves)
        atol = 1e-7 * (1.0 + abs(float(loss)))
        np.testing.assert_allclose(dots, fd, rtol=1e-6, atol=atol)
        # Autodiff through every iteration of a long unrolled solve (error ~ rho**iterations),
        # relative, plus an absolute floor at the natural scale |c| (1 + |z*|) of the gradient
        # (a saturated tanh can make it ~1e-7 of that, under the solvers' rounding).
        scale = _norm(readout) * (1.0 + np.linalg.norm(prob.reference()))
        diff = _norm(jax.tree_util.tree_map(jnp.subtract, g, g_unrolled))
        assert diff <= 1e-8 * _norm(g_unrolled) + 1e-10 * scale, (diff, _norm(g_unrolled), scale)


# ----------------------------------------------------------------------------- 3. compositions


def _assert_trees_close(a, b, rtol, atol):
    """Leafwise allclose, ``atol`` relative to the largest entry of ``b`` (plus one)."""
    scale = 1.0 + max(float(np.max(np.abs(y), initial=0.0)) for y in jax.tree_util.tree_leaves(b))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale)


def _assert_solutions_close(a, b, rtol, atol, *, exact_steps=True):
    _check_like(a.value, b.value)
    _assert_trees_close(a.value, b.value, rtol, atol)
    np.testing.assert_array_equal(a.stats.converged, b.stats.converged)
    steps_a, steps_b = np.asarray(a.stats.nsteps), np.asarray(b.stats.nsteps)
    if exact_steps:
        np.testing.assert_array_equal(steps_a, steps_b)
    else:  # float32: a residual one rounding away from tol may take one step more
        assert (np.abs(steps_a - steps_b) <= 1).all(), (steps_a, steps_b)
    # Residuals near the rounding floor are noisy: compare them at the scale of the state.
    norm = 1.0 + float(np.max(np.linalg.norm(_flat(b.value), axis=1)))
    np.testing.assert_allclose(
        a.stats.abs_residual, b.stats.abs_residual, rtol=1e-3, atol=atol * norm
    )


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=_FAST_COMPILE)
def _composed(f, solver, z0, readout, p, stacked, ps, z0_perm, p_perm):
    loss = functools.partial(_readout_loss, f, solver, jdeq.Implicit(), z0, readout, aux=True)
    (_, sol), g = jax.value_and_grad(loss, has_aux=True)(p)
    vmapped = jax.vmap(lambda q: jdeq.fixed_point(f, z0, q, solver=solver))(stacked)
    looped = [sol] + [jdeq.fixed_point(f, z0, q, solver=solver) for q in ps[1:]]  # a Python loop
    permuted = jdeq.fixed_point(f, z0_perm, p_perm, solver=solver)
    return sol, g, vmapped, looped, permuted


@_settings(4)
@given(
    problems(),
    st.sampled_from(["fpi", "anderson", "broyden"]),
    st.integers(2, 3),
)
def test_jit_vmap_grad_and_permutation_compose(prob, name, copies):
    f64 = prob.dtype == "float64"
    solver = _solver(name, TOL[prob.dtype])
    rtol, atol = (1e-9, 1e-12) if f64 else (1e-4, 1e-5)
    f = prob.cell()
    rng = np.random.default_rng(prob.dim * 7 + prob.batch)
    with prob.context():
        z0, p = prob.tree(prob.z0), prob.args()
        readout = [jnp.asarray(rng.normal(size=a.shape), a.dtype) for a in prob.z0]
        ps = [p] + [  # more problems of the same shapes: scaled W, shifted injection
            {"W": p["W"] * s, "x": jax.tree_util.tree_map(lambda a: a + s, p["x"])}
            for s in rng.uniform(0.3, 1.0, size=copies - 1).astype(prob.W.dtype)
        ]
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ps)
        z0_perm, p_perm = prob.permuted()
        sol, g, vmapped, looped, permuted = _composed(
            f, solver, z0, readout, p, stacked, ps, z0_perm, p_perm
        )
        # The plain (eager) call: value, stats and gradient equal the jitted ones.
        eager = functools.partial(_readout_loss, f, solver, jdeq.Implicit(), z0, readout, aux=True)
        (_, sol_eager), g_eager = jax.value_and_grad(eager, has_aux=True)(p)
        _assert_solutions_close(sol, sol_eager, rtol, atol, exact_steps=f64)
        _assert_trees_close(g, g_eager, 1e-8 if f64 else 1e-3, 1e-10 if f64 else 1e-4)
        # vmap over an extra leading axis of args == a Python loop over it (stats included).
        for i, one in enumerate(looped):
            ith = jax.tree_util.tree_map(lambda a: a[i], vmapped)
            _assert_solutions_close(ith, one, rtol, atol, exact_steps=f64)
        # Per-example solves: permuting the batch permutes the value and every stat.
        back = jax.tree_util.tree_map(lambda a: a[prob.perm], sol)
        _assert_solutions_close(permuted, back, rtol, atol, exact_steps=f64)


# ----------------------------------------------------------------------------- 4. residual stats

STATS_SOLVERS = [
    jdeq.FixedPointIteration(tol=1e-9, maxiter=60, stop_mode="abs"),
    jdeq.Anderson(tol=1e-9, maxiter=60, stop_mode="rel", memory=3),
    jdeq.Broyden(tol=1e-9, maxiter=60, stop_mode="abs", memory=8),
    jdeq.FixedPointIteration(tol=1e-6, maxiter=8, stop_mode="rel", damping=0.7),  # budget-limited
]


def cell(z, p):
    """Affine (kind 0) or tanh (kind 1) map with a per-example bias: A z + b or tanh(A z + b)."""
    y = z @ p["A"].T + p["b"]
    return jnp.where(p["kind"] == 1, jnp.tanh(y), y)


@st.composite
def matrix_problems(draw):
    batch = draw(st.integers(1, 5))
    dim = draw(st.integers(1, 6))
    rho = draw(st.floats(0.0, 0.95))
    kind = draw(st.integers(0, 1))
    seed = draw(st.integers(0, 2**31 - 1))
    solver = draw(st.sampled_from(STATS_SOLVERS))
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(dim, dim))
    A = rho * A / max(np.linalg.norm(A, 2), 1e-12)
    b = rng.normal(size=(batch, dim)) * draw(st.sampled_from([1e-2, 1.0, 1e2]))
    z0 = rng.normal(size=(batch, dim))
    perm = rng.permutation(batch)
    return {"A": A, "b": b, "kind": np.int32(kind)}, z0, solver, perm


@functools.partial(jax.jit, static_argnums=2)
def solve(z0, p, solver):
    """Jitted with the solver static: a permuted batch (same shapes) reuses the compilation."""
    return jdeq.fixed_point(cell, z0, p, solver=solver)


@jax.jit
def _residual(value, p):
    return jnp.linalg.norm(cell(value, p) - value, axis=1)


def _check_residuals(sol, p, solver):
    stats = sol.stats
    # The value is f(z_b) at the lowest-residual iterate z_b, whose residuals the stats report:
    # rel = abs / ||f(z_b)|| exactly, and (cells are contractions) the value's own residual is
    # at most the reported one.
    res = np.asarray(_residual(sol.value, p))
    assert (res <= np.asarray(stats.abs_residual) * (1 + 1e-7) + 1e-13).all()
    fz_norm = np.linalg.norm(np.asarray(sol.value), axis=1)
    np.testing.assert_allclose(
        stats.rel_residual, np.asarray(stats.abs_residual) / (fz_norm + 1e-8), rtol=1e-7, atol=1e-13
    )
    metric = np.asarray(stats.abs_residual if solver.stop_mode == "abs" else stats.rel_residual)
    conv = np.asarray(stats.converged)
    np.testing.assert_array_equal(conv, metric < solver.tol)
    nsteps = np.asarray(stats.nsteps)
    assert ((nsteps >= 1) & (nsteps <= solver.maxiter)).all()
    assert (nsteps[~conv] == solver.maxiter).all()  # only converged examples stop early


def _check_permutation(sol, sol_perm, perm):
    np.testing.assert_array_equal(sol_perm.stats.nsteps, np.asarray(sol.stats.nsteps)[perm])
    np.testing.assert_array_equal(sol_perm.stats.converged, np.asarray(sol.stats.converged)[perm])
    np.testing.assert_allclose(sol_perm.value, np.asarray(sol.value)[perm], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        sol_perm.stats.abs_residual, np.asarray(sol.stats.abs_residual)[perm], rtol=1e-6, atol=1e-13
    )


# One test for both properties, so each drawn problem costs one compilation (the permuted batch
# has the same shapes and reuses it).
@_settings(15)
@given(matrix_problems())
def test_residuals_converged_and_batch_permutation(problem):
    p, z0, solver, perm = problem
    with jax.enable_x64(True):
        p = jax.tree_util.tree_map(jnp.asarray, p)
        sol = solve(jnp.asarray(z0), p, solver)
        # The stats are those of the iterate the value was computed from; converged <=> below tol.
        _check_residuals(sol, p, solver)
        # Per-example independence: permuting the batch permutes value and stats.
        sol_perm = solve(jnp.asarray(z0[perm]), dict(p, b=p["b"][perm]), solver)
        _check_permutation(sol, sol_perm, perm)


def test_jaxopt_anderson_runs_on_a_float32_state_under_x64(x64):
    """Regression (found by property 1): jaxopt's AndersonAcceleration builds its Gram matrix in
    float64 under x64 and failed on a float32 state; JaxoptSolver now iterates it promoted."""
    solver = jdeq.JaxoptSolver(jaxopt.AndersonAcceleration, tol=1e-5, history_size=3)
    z0, x = jnp.zeros((2, 3), jnp.float32), jnp.ones((2, 3), jnp.float32)
    sol = jdeq.fixed_point(lambda z, a: 0.5 * jnp.tanh(z) + a, z0, x, solver=solver)
    assert sol.value.dtype == jnp.float32 and bool(sol.stats.converged.all())
    np.testing.assert_allclose(sol.value, 0.5 * np.tanh(sol.value) + 1.0, atol=1e-5)
