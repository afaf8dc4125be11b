"""The one module that imports jaxopt: ``JaxoptSolver`` and jaxopt's linear solvers.

jaxopt is archived and warns at import that it is no longer maintained; that one warning is
filtered here (by message), nothing broader. It is imported on first use (a ``JaxoptSolver``
built, a jaxopt linear solver run), never by ``import jdeq``. Replacing jaxopt later touches this
module only.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from jdeq import _validate as V
from jdeq._loop import residuals
from jdeq._solvers import Solver
from jdeq._stats import SolverStats

__all__ = ["JaxoptSolver", "jaxopt", "linear_solve"]

# set by JaxoptSolver: the map, jdeq's own differentiation, and jaxopt's loop as a lax.while_loop
# (its "auto" unrolls into a maxiter-step scan when implicit_diff is off, which needs a static
# budget and runs every step's guard after convergence)
_RESERVED = ("fixed_point_fun", "fun", "implicit_diff", "implicit_diff_solve", "has_aux", "unroll", "jit")


def jaxopt():
    """The jaxopt module, imported on first call with its one "no longer maintained" warning
    filtered (by message; nothing broader)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="JAXopt is no longer maintained", category=DeprecationWarning
        )
        import jaxopt as module
    return module


def _root_classes():  # classes that solve g(z) = f(z) - z; the others take a fixed-point map
    return (jaxopt().Broyden,)


def _fixed_point_classes():
    return (jaxopt().FixedPointIteration, jaxopt().AndersonAcceleration)


def linear_solve(name: str, matvec, b, *, tol: float, maxiter):
    """Solves ``matvec(x) = b`` with jaxopt's ``solve_<name>`` (whole batch as one system)."""
    return getattr(jaxopt().linear_solve, f"solve_{name}")(matvec, b, tol=tol, maxiter=maxiter)


class JaxoptSolver(Solver):
    """Any jaxopt fixed-point or root solver as a jdeq forward solver, with jaxopt's semantics.

    ``jaxopt_class`` is one of ``jaxopt.FixedPointIteration``, ``jaxopt.AndersonAcceleration``
    (given ``f``) or ``jaxopt.Broyden`` (given the root function ``f(z) - z``). jaxopt treats
    the whole batch as one problem: one global norm, one stopping test (its own ``tol`` and
    error definition), one iteration count. jdeq then fills ``SolverStats`` per example from
    the final iterate (one extra evaluation of ``f``): ``abs_residual``/``rel_residual`` per
    example, ``nsteps`` = jaxopt's ``iter_num`` for every example, ``converged`` = jaxopt's own
    global test ``error <= tol`` for every example (False where non-finite). jaxopt returns its
    last iterate, not the best one; an example whose last iterate or residual is non-finite gets
    ``z0`` back instead, with ``nonfinite=True`` and the residuals measured at ``z0`` (jaxopt's
    global error is then NaN, which ends its loop at once for the whole batch). jaxopt's
    implicit differentiation is turned off: the jdeq gradient mode (``Implicit``, ``Phantom``,
    ``JacobianFree``) applies. Its loop runs as a ``lax.while_loop`` that stops at convergence.
    ``Unrolled`` is not supported (use jdeq's solvers). A run-time ``maxiter`` may be traced,
    but for ``jaxopt.Broyden``, which sizes its history by it: there it must be a Python int.

    Args:
      jaxopt_class: the jaxopt solver class.
      **options: its constructor options (``tol``, ``maxiter``, ``history_size``, ...);
        unknown ones raise ``TypeError``.

    Example:
      >>> import jaxopt, jax.numpy as jnp, jdeq
      >>> solver = jdeq.JaxoptSolver(jaxopt.AndersonAcceleration, history_size=5, tol=1e-5)
      >>> sol = jdeq.fixed_point(lambda z, a: 0.5 * jnp.tanh(z) + a, jnp.zeros((2, 4)),
      ...                        jnp.ones((2, 4)), solver=solver)
    """

    stop_mode = "abs"
    trace = False
    stop_fraction = 1.0  # jaxopt stops the whole batch on one global test

    @property
    def static_budget(self) -> bool:
        """Whether the budget must be static (baked into jaxopt's options): jaxopt's Broyden
        allocates its history with ``maxiter`` rows."""
        return self._cls in _root_classes()

    def __init__(self, jaxopt_class, **options):
        if jaxopt_class not in _root_classes() + _fixed_point_classes():
            names = [c.__name__ for c in _root_classes() + _fixed_point_classes()]
            raise TypeError(f"`jaxopt_class` must be one of jaxopt's {names}, got {jaxopt_class!r}.")
        fields = {f.name: f for f in dataclasses.fields(jaxopt_class)}
        for key in options:
            if key in _RESERVED:
                raise TypeError(f"JaxoptSolver sets `{key}` itself; do not pass it.")
            if key not in fields:
                raise TypeError(f"unknown option `{key}` for jaxopt.{jaxopt_class.__name__}.")
        object.__setattr__(self, "_cls", jaxopt_class)
        object.__setattr__(self, "_options", tuple(sorted(options.items())))

    def _tree_flatten_with_keys(self):
        return [], (self._cls, self._options)

    @classmethod
    def _tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        object.__setattr__(obj, "_cls", aux[0])
        object.__setattr__(obj, "_options", aux[1])
        return obj

    def backward(self, **overrides):
        overrides.pop("stop_mode", None)  # jaxopt has its own error definition
        return JaxoptSolver(self._cls, **{**self.options, **overrides})

    @property
    def jaxopt_class(self):
        return self._cls

    @property
    def options(self) -> dict[str, Any]:
        return dict(self._options)

    def _option(self, name):
        defaults = {f.name: f.default for f in dataclasses.fields(self._cls)}
        return self.options.get(name, defaults[name])

    @property
    def tol(self) -> float:
        return self._option("tol")

    @property
    def maxiter(self) -> int:
        return self._option("maxiter")

    def __eq__(self, other):
        return (
            isinstance(other, JaxoptSolver)
            and self._cls is other._cls
            and self._options == other._options
        )

    def __hash__(self):
        return hash((JaxoptSolver, self._cls, self._options))

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options)
        return f"JaxoptSolver(jaxopt.{self._cls.__name__}{', ' if opts else ''}{opts})"

    def solve(self, F, z0: jax.Array, maxiter=None, *, unrolled: bool = False, snapshots=None):
        if unrolled:
            raise ValueError(
                "`gradient=jdeq.Unrolled()` is not supported with JaxoptSolver; use a jdeq solver "
                "(FixedPointIteration, Anderson, Broyden) to differentiate through iterations."
            )
        if snapshots is not None:
            raise TypeError(
                "`solver`: JaxoptSolver runs jaxopt's own loop, which takes no snapshots "
                "(fixed_point_states); use a jdeq solver."
            )
        options = dict(self.options, implicit_diff=False, unroll=False, jit=True)
        if maxiter is not None:
            if self.static_budget and not V.is_int(maxiter):
                raise ValueError(
                    f"`maxiter` must be a Python int with JaxoptSolver(jaxopt.{self._cls.__name__}) (jaxopt "
                    "sizes its history by it), not a traced value."
                )
            options["maxiter"] = maxiter
        # jaxopt's AndersonAcceleration builds its Gram matrix in the default float dtype
        # (float64 under x64), and a float32 state then fails its lax.cond dtype check: it
        # iterates in the promoted dtype. The cell still sees the state's own dtypes: jdeq's F
        # casts its rows to each leaf's dtype (BatchLayout.unflatten).
        run_dtype = z0.dtype
        if self._cls is jaxopt().AndersonAcceleration:
            run_dtype = jnp.promote_types(z0.dtype, jnp.result_type(float))
        G = lambda z: F(z).astype(run_dtype)  # noqa: E731  (a no-op cast unless promoted)
        if self._cls in _root_classes():
            solver = self._cls(fun=lambda z: G(z) - z, **options)
        else:
            solver = self._cls(fixed_point_fun=G, **options)
        z, state = solver.run(z0.astype(run_dtype))
        z = z.astype(z0.dtype)
        abs_res, rel_res = residuals(z, F(z))
        # jaxopt keeps no best iterate: an example whose final iterate (or its residual) is
        # non-finite falls back to z0, and its residuals are re-measured there (one more
        # evaluation of F, only when some example went non-finite). As in jdeq's loop, a state
        # whose norm overflows counts as non-finite (its rel residual is NaN, its abs one may not be).
        nonfinite = ~(jnp.isfinite(abs_res) & jnp.isfinite(rel_res))

        def fall_back(_):
            z_back = jnp.where(nonfinite[:, None], z0, z)
            back = residuals(z_back, F(z_back))
            return z_back, jnp.where(nonfinite, back[0], abs_res), jnp.where(nonfinite, back[1], rel_res)

        z, abs_res, rel_res = jax.lax.cond(
            jnp.any(nonfinite), fall_back, lambda _: (z, abs_res, rel_res), None
        )
        n = z0.shape[0]
        stats = SolverStats(
            nsteps=jnp.full((n,), state.iter_num, jnp.int32),
            abs_residual=abs_res,
            rel_residual=rel_res,
            converged=jnp.full((n,), state.error <= self.tol) & ~nonfinite,
            nonfinite=nonfinite,  # (no trace: jaxopt records none)
        )
        return z, stats
