"""The bad-input table: every case of wrong input tried against jdeq's public API.

One record per case: the area, the call, the bad input, a zero-argument callable that makes the
call, the exception expected and a regex its message must match. ``tests/test_bad_input.py``
runs every case; ``docs/errors.md`` is this table rendered with the messages actually raised,
and a test checks that it is up to date. Regenerate it with::

    python -m tests.bad_input_cases > docs/errors.md

A case whose ``exc`` is ``None`` documents bad input that is deliberately *not* an exception:
values that only exist at run time under ``jit`` (NaN/inf inside a solve) show in the solver's
stats instead; the callable then returns a short description of what it observed, and the
regex is matched against that.

The structural checks of the core that ``tests/test_errors.py`` already covers one by one
(pytree structure/shape/dtype changed by ``f``, the solver options' ranges) are not repeated
here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CASES", "Case", "Outcome", "outcome", "render"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
      area: the part of the API (one docs table per area).
      call: the call, as a user would write it.
      bad: what is wrong with the input.
      run: makes the call (no arguments).
      exc: the exception type expected, or None when the outcome is a value (see module doc).
      match: regex that the message (for ``SystemExit``: argparse's last stderr line; for
        ``exc=None``: the returned description) must match (``re.search``).
      runtime: a run-time failure raised on request (``throw=True``), not a bad argument: a
        ``RuntimeError``, which under ``jit`` JAX delivers wrapped in a ``JaxRuntimeError`` from
        XLA's host callback (the only cases allowed to carry XLA's wording).
    """

    area: str
    call: str
    bad: str
    run: Callable[[], Any]
    exc: type | None
    match: str
    runtime: bool = False

    @property
    def id(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{self.area}:{self.call}:{self.bad}")[:120]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What running a case gave: the exception's type name (``"-"`` when none) and message."""

    exc: type | None
    message: str
    exit_code: Any = None
    # a jdeq.BadValue's (name, expected, value) attributes, for the test that they agree
    # with the message (they are the exception's documented, machine-readable part)
    details: tuple | None = None


_ADDR = re.compile(r" at 0x[0-9a-fA-F]+")


def _message(e: BaseException) -> str:
    """``str(e)`` plus its notes (but JAX's note on filtered frames); a host-callback traceback (``throw=True`` under ``jit``) is cut
    to its first line and the exception it carries; memory addresses are blanked."""
    notes = [n for n in getattr(e, "__notes__", ()) if "JAX has removed its internal frames" not in n]
    text = "\n".join([str(e), *notes])
    if "Traceback (most recent call last)" in text:
        head = text.split("Traceback (most recent call last)")[0].strip()
        tail = [ln for ln in text.splitlines() if re.match(r"^\w+(Error|Exception): ", ln)]
        text = f"{head} [traceback] {tail[-1] if tail else ''}"
    return _ADDR.sub("", text)


def outcome(case: Case) -> Outcome:
    """Runs ``case``; returns the exception raised (or None) and its message.

    ``SystemExit`` (argparse) is reported with the last line argparse wrote to stderr.
    """
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            value = case.run()
    except SystemExit as e:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        return Outcome(SystemExit, lines[-1] if lines else "", e.code)
    except Exception as e:  # noqa: BLE001 - any exception is an outcome to check
        from jdeq._validate import BadValue

        details = (e.name, e.expected, e.value) if isinstance(e, BadValue) else None
        return Outcome(type(e), _message(e), details=details)
    return Outcome(None, _ADDR.sub("", str(value)))


# ----------------------------------------------------------------------------- fixtures


def _f(z, a):
    return 0.5 * jnp.tanh(z) + a


def _z0(shape=(2, 3), dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


def _a(shape=(2, 3), value=1.0):
    return jnp.full(shape, value, jnp.float32)


_DEFAULT = object()


def _fp(z0=_DEFAULT, args=_DEFAULT, f=_f, **kw):
    import jdeq

    return jdeq.fixed_point(f, _z0() if z0 is _DEFAULT else z0, _a() if args is _DEFAULT else args, **kw)


def _describe(stats) -> str:
    """A short description of a SolverStats for the non-raising cases."""
    conv = np.asarray(stats.converged).tolist()
    res = np.asarray(stats.abs_residual)
    extra = ""
    for name in ("finite", "nonfinite", "non_finite", "diverged"):
        if getattr(stats, name, None) is not None:
            extra = f", {name}={np.asarray(getattr(stats, name)).tolist()}"
    return f"no exception: converged={conv}, abs_residual finite={np.isfinite(res).tolist()}{extra}"


@functools.cache
def _cell():
    from flax import nnx

    import jdeq

    return jdeq.models.MLPCell(3, 8, rngs=nnx.Rngs(0))


@functools.cache
def _deq():
    import jdeq

    return jdeq.nnx.DEQ(_cell(), solver=jdeq.Anderson(maxiter=10))


def _unrolled_deq(depth):
    from flax import nnx

    deq = nnx.clone(_deq())
    deq.unrolled_depth = depth
    return deq


def _nan_cell_deq():
    from flax import nnx

    deq = nnx.clone(_deq())
    deq.cell.u.bias.set_value(deq.cell.u.bias[...].at[0].set(jnp.nan))
    return deq


def _x(shape=(2, 3), value=1.0, dtype=jnp.float32):
    return jnp.full(shape, value, dtype)


@functools.cache
def _linen_vars():
    import jdeq

    deq = jdeq.linen.DEQ(cell=jdeq.models.linen.MLPCell(features=8), solver=jdeq.Anderson(maxiter=10))
    return deq, deq.init(jax.random.PRNGKey(0), _x())


@functools.cache
def _net():
    """A tiny classifier around one nnx DEQ (inputs (n, 4), 3 classes)."""
    from flax import nnx

    import jdeq

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(4, 8, rngs=rngs), solver=jdeq.Anderson(maxiter=5))
            self.head = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x, **kw):
            z, stats = self.deq(x, **kw)
            return self.head(z), stats

    return Net(nnx.Rngs(0))


def _nan_net():
    from flax import nnx

    net = nnx.clone(_net())
    net.head.kernel.set_value(net.head.kernel[...].at[0, 0].set(jnp.nan))
    return net


@functools.cache
def _plain_net():
    from flax import nnx

    return nnx.Linear(4, 3, rngs=nnx.Rngs(0))


def _data(n=8, *, inputs=None, labels=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32) if inputs is None else inputs
    y = (np.arange(n) % 3).astype(np.int32) if labels is None else labels
    return {"inputs": x, "labels": y}


def _with(array, index, value):
    array = np.array(array)
    array[index] = value
    return array


def _fit(model=None, data=None, **kw):
    import optax

    import jdeq

    kw = {"steps": 1, "batch_size": 4, "progress": False, **kw}
    return jdeq.train.fit(_net() if model is None else model, optax.sgd(0.0), _data() if data is None else data, **kw)


def _loss_of(model):
    import jdeq

    return jdeq.train.classification_loss(model, _data())


def _evaluate(data=None, **kw):
    import jdeq

    return jdeq.train.evaluate(_net(), _data() if data is None else data, **kw)


def _predict(inputs=_DEFAULT, **kw):
    import jdeq

    return jdeq.train.predict(_net(), _data()["inputs"] if inputs is _DEFAULT else inputs, **kw)


class CommandAccepted(Exception):
    """Raised instead of running a benchmark/experiment whose bad command line was accepted."""


def _cli(module: str, *argv: str):
    """Runs ``module.main(argv)``, but stops with :class:`CommandAccepted` where the command would
    start its real work (it calls ``machine()`` first), so a validation regression fails fast
    instead of running a benchmark."""
    import importlib
    from pathlib import Path
    from unittest import mock

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    mod = importlib.import_module(module)

    def accepted(*_, **__):
        raise CommandAccepted(f"{module}.main{list(argv)} accepted its arguments and started running")

    with contextlib.ExitStack() as stack:
        for target in (mod, sys.modules.get("benchmarks._common")):
            if target is not None and hasattr(target, "machine"):
                stack.enter_context(mock.patch.object(target, "machine", accepted))
        return mod.main(list(argv))


def _jit_throw():
    run = jax.jit(lambda a: _fp(args=a, throw=True).value)
    return jax.block_until_ready(run(_a(value=np.nan)))


def _jit_trace(solver: str):
    """``trace=True`` with a budget traced under ``jit``: the trace needs its length statically."""
    import jdeq

    run = jax.jit(lambda m: _fp(solver=getattr(jdeq, solver)(trace=True), maxiter=m).value)
    return jax.block_until_ready(run(5))


def _jit_budget(**kw):
    """A solve whose budget is traced under ``jit`` (``kw``: its solver or gradient)."""
    run = jax.jit(lambda m: _fp(maxiter=m, **{k: v() for k, v in kw.items()}).value)
    return jax.block_until_ready(run(5))


def _key():
    return jax.random.key(0)


# ----------------------------------------------------------------------------- the table

C = Case
J = "import jdeq; "
NAN = float("nan")

CORE_FP = "fixed_point"
CORE_OPT = "solvers and gradients"
CORE_REG = "regularizers"
CORE_COR = "correction"
CORE_HYP = "hypersolver"
NNX = "jdeq.nnx"
LINEN = "jdeq.linen"
MODELS = "jdeq.models"
DATA = "jdeq.data"
TRAIN = "jdeq.train"
CLI = "command lines"


def _lazy(path: str, *args, **kwargs):
    """``lambda: <jdeq attribute path>(*args, **kwargs)``, resolved at call time."""

    def run():
        import importlib

        import jdeq  # noqa: F401

        mod, _, name = path.rpartition(".")
        obj = importlib.import_module(mod)
        for part in name.split("/"):
            obj = getattr(obj, part)
        return obj(*[a() if callable(a) and getattr(a, "_lazy_arg", False) else a for a in args], **kwargs)

    return run


def _arg(fn):
    fn._lazy_arg = True
    return fn


def _models(name):
    import jdeq

    return getattr(jdeq.models, name)


def _mk(name, *args, **kw):
    """Builds ``jdeq.models.<name>(*args, rngs=nnx.Rngs(0), **kw)``."""

    def run():
        from flax import nnx

        return _models(name)(*args, rngs=nnx.Rngs(0), **kw)

    return run


def _core(name, *args, **kw):
    """``lambda: jdeq.<name>(*args, **kw)``; arguments marked with ``@_arg`` are built lazily."""

    def run():
        import jdeq

        obj = jdeq
        for part in name.split("."):
            obj = getattr(obj, part)
        value = lambda a: a() if getattr(a, "_lazy_arg", False) else a  # noqa: E731
        return obj(*map(value, args), **{k: value(v) for k, v in kw.items()})

    return run


@_arg
def _jaxopt_fpi():
    import jaxopt

    return jaxopt.FixedPointIteration


@_arg
def _jaxopt_lbfgs():
    import jaxopt

    return jaxopt.LBFGS


@_arg
def _KEY():
    return jax.random.key(0)


@_arg
def _Z0():
    return _z0()


@_arg
def _A():
    return _a()


@_arg
def _Z0_INT():
    return _z0(dtype=jnp.int32)


@_arg
def _FUN():
    return _f


@_arg
def _ANDERSON():
    import jdeq

    return jdeq.Anderson()


@_arg
def _FPI_JAXOPT():
    import jaxopt

    import jdeq

    return jdeq.JaxoptSolver(jaxopt.FixedPointIteration, maxiter=5)


def _jaxopt_broyden():
    import jaxopt

    import jdeq

    return jdeq.JaxoptSolver(jaxopt.Broyden, maxiter=5, gamma=-1.0)


@_arg
def _UNROLLED():
    import jdeq

    return jdeq.Unrolled()


@_arg
def _MIXER3():
    import jdeq

    return jdeq.init_mixer(jax.random.key(0), memory=3)


@_arg
def _CELL():
    return _cell()


@_arg
def _DENSE_CELL():
    from flax import nnx

    import jdeq

    return jdeq.models.MonotoneDenseCell(3, 8, rngs=nnx.Rngs(0))


def _hyper(**kw):
    import jdeq

    return jdeq.HyperAnderson(**kw)


def _linen_apply(x=None, **kw):
    deq, variables = _linen_vars()
    return deq.apply(variables, _x() if x is None else x, **kw)


def _linen_init(module_fn, x=None):
    def run():
        import jdeq

        return module_fn(jdeq).init(jax.random.PRNGKey(0), _x() if x is None else x)

    return run


CASES: list[Case] = [
    # ------------------------------------------------------------------ core: fixed_point / unroll
    C(CORE_FP, "jdeq.fixed_point(f, z0, args)", "z0 complex64", lambda: _fp(z0=_z0(dtype=jnp.complex64)),
      TypeError, r"`z0` must be floating point.*complex64"),
    C(CORE_FP, "jdeq.fixed_point(f, z0, args)", "z0 with batch 0, shape (0, 3)",
      lambda: _fp(z0=_z0((0, 3)), args=_a((0, 3))), ValueError, r"`z0`.*batch.*0"),
    C(CORE_FP, "jdeq.fixed_point(f, z0, args)", "z0 with no entries per example, shape (2, 0)",
      lambda: _fp(z0=_z0((2, 0)), args=_a((2, 0))), ValueError, r"`z0`.*no entries"),
    C(CORE_FP, "jdeq.fixed_point(f, z0, args)", "z0=None", lambda: _fp(z0=None),
      ValueError, r"`z0` has no array leaves"),
    C(CORE_FP, "jdeq.fixed_point(f, z0, args)", "z0 a nested Python list of floats",
      lambda: _fp(z0=[[0.0, 0.0]], args=_a((1, 2))), ValueError, r"`z0` needs a leading batch axis"),
    C(CORE_FP, "jdeq.fixed_point(f, z0, args)", "z0 a string", lambda: _fp(z0="zeros"),
      TypeError, r"`z0`"),
    C(CORE_FP, "jdeq.fixed_point(f, z0, args)", "f returns int32 (dtype changed)",
      lambda: _fp(f=lambda z, a: jnp.round(z).astype(jnp.int32)), TypeError,
      r"`f\(z, args\)` changed the dtype of leaf <root>: float32 -> int32"),
    C(CORE_FP, "jdeq.fixed_point(f, z0, args)", "args with a feature axis that does not broadcast",
      lambda: _fp(args=_a((2, 4))), TypeError, r"add got incompatible shapes"),
    C(CORE_FP, "jdeq.fixed_point(..., solver=None)", "solver=None", lambda: _fp(solver=None),
      TypeError, r"`solver` must be a jdeq.Solver"),
    C(CORE_FP, "jdeq.fixed_point(..., maxiter='10')", "maxiter a string", lambda: _fp(maxiter="10"),
      TypeError, r"`maxiter` must be an int"),
    C(CORE_FP, "jdeq.fixed_point(..., maxiter=jnp.float32(5))", "maxiter a float array",
      lambda: _fp(maxiter=jnp.float32(5)), TypeError, r"`maxiter` must be an int.*float32"),
    C(CORE_FP, "jdeq.fixed_point(..., throw='yes')", "throw not a bool", lambda: _fp(throw="yes"),
      TypeError, r"`throw` must be a bool"),
    C(CORE_FP, "jdeq.fixed_point(..., batched='yes')", "batched not a bool", lambda: _fp(batched="yes"),
      TypeError, r"`batched` must be a bool"),
    C(CORE_FP, "jdeq.fixed_point(..., tol=1e-3)", "unknown keyword tol (belongs to the solver)",
      lambda: _fp(tol=1e-3), TypeError, r"unexpected keyword argument 'tol'"),
    C(CORE_FP, "jdeq.fixed_point(f, z0, args)", "NaN in args (run-time value)",
      lambda: _describe(_fp(args=_a(value=NAN)).stats), None, r"converged=\[False, False\]"),
    C(CORE_FP, "jdeq.fixed_point(f, z0, args)", "inf in z0 (run-time value)",
      lambda: _describe(_fp(z0=_z0().at[0, 0].set(jnp.inf)).stats), None, r"converged=\[False, True\]"),
    C(CORE_FP, "jdeq.fixed_point(..., throw=True)", "NaN in args", lambda: _fp(args=_a(value=NAN), throw=True),
      RuntimeError, r"throw=True\): non-finite .* in 2 of 2 examples", runtime=True),
    C(CORE_FP, "jax.jit(lambda a: jdeq.fixed_point(..., throw=True))(a)", "NaN in args, under jit",
      _jit_throw, RuntimeError, r"RuntimeError: jdeq.fixed_point\(throw=True\): non-finite .* in 2 of 2 examples",
      runtime=True),
    C(CORE_FP, "jdeq.unroll(f, z0, args, depth=2.5)", "depth not an int",
      _core("unroll", _FUN, _Z0, _A, depth=2.5), ValueError, r"`depth` must be an int >= 1, got 2.5"),
    C(CORE_FP, "jdeq.unroll(f, z0, args, depth=True)", "depth a bool",
      _core("unroll", _FUN, _Z0, _A, depth=True), ValueError, r"`depth` must be an int >= 1"),
    C(CORE_FP, "jdeq.unroll(f, z0, args, depth=3)", "z0 int32",
      _core("unroll", _FUN, _Z0_INT, _A, depth=3), TypeError, r"`z0` must be floating point.*int32"),
    C(CORE_FP, "jdeq.unroll(f, z0, args)", "depth missing", _core("unroll", _FUN, _Z0, _A),
      TypeError, r"missing 1 required keyword-only argument: 'depth'"),
    C(CORE_FP, "jdeq.unroll(f, z0, args, depth=3, maxiter=5)", "unknown keyword maxiter",
      _core("unroll", _FUN, _Z0, _A, depth=3, maxiter=5), TypeError, r"unexpected keyword argument 'maxiter'"),
    C(CORE_FP, "jdeq.unroll('f', z0, args, depth=3)", "f not callable",
      _core("unroll", "f", _Z0, _A, depth=3), TypeError, r"`f` must be callable"),
    # ------------------------------------------------------------------ core: solvers and gradients
    C(CORE_OPT, "jdeq.Anderson(tol=nan)", "tol NaN", _core("Anderson", tol=NAN), ValueError, r"`tol` must be a number > 0"),
    C(CORE_OPT, "jdeq.Anderson(tol='1e-3')", "tol a string", _core("Anderson", tol="1e-3"),
      ValueError, r"`tol` must be a number > 0, got '1e-3'"),
    C(CORE_OPT, "jdeq.FixedPointIteration(damping=nan)", "damping NaN", _core("FixedPointIteration", damping=NAN),
      ValueError, r"`damping` must be a number in \(0, 1\]"),
    C(CORE_OPT, "jdeq.Anderson(memory=2.5)", "memory not an int", _core("Anderson", memory=2.5),
      ValueError, r"`memory` must be an int >= 1, got 2.5"),
    C(CORE_OPT, "jdeq.Broyden(memory=0)", "memory 0", _core("Broyden", memory=0), ValueError, r"`memory` must be an int >= 1"),
    C(CORE_OPT, "jdeq.Anderson(ridge=nan)", "ridge NaN", _core("Anderson", ridge=NAN), ValueError, r"`ridge` must be a number >= 0"),
    C(CORE_OPT, "jdeq.FixedPointIteration(stop_mode=None)", "stop_mode None",
      _core("FixedPointIteration", stop_mode=None), ValueError, r"`stop_mode` must be one of \('abs', 'rel'\)"),
    C(CORE_OPT, "jdeq.Anderson(stop_fraction=0)", "stop_fraction 0", _core("Anderson", stop_fraction=0),
      ValueError, r"`stop_fraction` must be a number in \(0, 1\], got 0"),
    C(CORE_OPT, "jdeq.FixedPointIteration(stop_fraction=1.5)", "stop_fraction above 1",
      _core("FixedPointIteration", stop_fraction=1.5), ValueError, r"`stop_fraction` must be a number in \(0, 1\]"),
    C(CORE_OPT, "jdeq.JaxoptSolver(jaxopt.FixedPointIteration, stop_fraction=0.9)", "stop_fraction with jaxopt",
      _core("JaxoptSolver", _jaxopt_fpi, stop_fraction=0.9), TypeError, r"unknown option `stop_fraction`"),
    C(CORE_OPT, "jdeq.Broyden(maxiter=None)", "maxiter None", _core("Broyden", maxiter=None),
      TypeError, r"`maxiter` must be an int >= 1, got None"),
    C(CORE_OPT, "jdeq.JaxoptSolver(jaxopt.LBFGS)", "not a fixed-point/root solver", _core("JaxoptSolver", _jaxopt_lbfgs),
      TypeError, r"`jaxopt_class` must be one of jaxopt's"),
    C(CORE_OPT, "jdeq.JaxoptSolver(jaxopt.FixedPointIteration, history_size=5)", "option of another class",
      _core("JaxoptSolver", _jaxopt_fpi, history_size=5), TypeError, r"unknown option `history_size`"),
    C(CORE_OPT, "jdeq.fixed_point(..., solver=jdeq.JaxoptSolver(...), gradient=jdeq.Unrolled())",
      "Unrolled through jaxopt's loop", lambda: _fp(solver=_FPI_JAXOPT(), gradient=_UNROLLED()), ValueError,
      r"`gradient=jdeq.Unrolled\(\)` is not supported with JaxoptSolver"),
    C(CORE_OPT, "jax.jit(lambda m: jdeq.fixed_point(..., gradient=jdeq.Unrolled(), maxiter=m))(5)",
      "Unrolled with a traced maxiter", lambda: _jit_budget(gradient=_UNROLLED), ValueError,
      r"`maxiter` must be a static int with gradient=jdeq.Unrolled\(\)"),
    C(CORE_OPT, "jax.jit(lambda m: jdeq.fixed_point(..., solver=jdeq.JaxoptSolver(jaxopt.Broyden), maxiter=m))(5)",
      "jaxopt's Broyden with a traced maxiter", lambda: _jit_budget(solver=_jaxopt_broyden), ValueError,
      r"`maxiter` must be a Python int with JaxoptSolver\(jaxopt.Broyden\)"),
    C(CORE_OPT, "jdeq.JaxoptSolver(jaxopt.FixedPointIteration, implicit_diff=True)", "reserved option",
      _core("JaxoptSolver", _jaxopt_fpi, implicit_diff=True), TypeError, r"sets `implicit_diff` itself"),
    C(CORE_OPT, "jdeq.Implicit(tol=nan)", "tol NaN", _core("Implicit", tol=NAN), ValueError, r"`tol` must be (None or )?a number > 0"),
    C(CORE_OPT, "jdeq.Implicit(maxiter=2.5)", "maxiter not an int", _core("Implicit", maxiter=2.5),
      TypeError, r"`maxiter` must be None or an int >= 1, got 2.5"),
    C(CORE_OPT, "jdeq.Implicit(stop_mode='relative')", "unknown stop mode", _core("Implicit", stop_mode="relative"),
      ValueError, r"`stop_mode` must be None or one of \('abs', 'rel'\), got 'relative'"),
    C(CORE_OPT, "jdeq.Implicit(callback=3)", "callback not callable", _core("Implicit", callback=3),
      TypeError, r"`callback` must be None or callable as callback\(stats\), got 3"),
    C(CORE_OPT, "jdeq.Implicit(solver=jdeq.Anderson)", "the class, not an instance",
      lambda: __import__("jdeq").Implicit(solver=__import__("jdeq").Anderson), ValueError,
      r"`solver` must be None, a jdeq solver or one of"),
    C(CORE_OPT, "jax.jit(lambda m: jdeq.fixed_point(..., solver=jdeq.Anderson(trace=True), maxiter=m))(5)",
      "trace with a traced maxiter", lambda: _jit_trace("Anderson"), ValueError, r"`trace=True` needs a static `maxiter`"),
    C(CORE_OPT, "jax.jit(lambda m: jdeq.fixed_point(..., solver=jdeq.ReversibleIteration(trace=True), maxiter=m))(5)",
      "trace with a traced maxiter", lambda: _jit_trace("ReversibleIteration"), ValueError,
      r"`trace=True` needs a static `maxiter`"),
    C(CORE_OPT, "jdeq.Phantom(steps=True)", "steps a bool", _core("Phantom", steps=True), ValueError, r"`steps` must be an int >= 1"),
    C(CORE_OPT, "jdeq.Phantom(damping=nan)", "damping NaN", _core("Phantom", damping=NAN), ValueError, r"`damping` must be a number in \(0, 1\]"),
    C(CORE_OPT, "jdeq.Phantom(damping='1')", "damping a string", _core("Phantom", damping="1"),
      ValueError, r"`damping` must be a number in \(0, 1\]"),
    # ------------------------------------------------------------------ core: regularizers
    C(CORE_REG, "jdeq.jacobian_frobenius(f, z, args, key=None)", "no key",
      _core("jacobian_frobenius", _FUN, _Z0, _A, None), TypeError, r"`key` must be a JAX PRNG key"),
    C(CORE_REG, "jdeq.jacobian_frobenius(f, z, args, 0)", "key an int",
      _core("jacobian_frobenius", _FUN, _Z0, _A, 0), TypeError, r"`key` must be a JAX PRNG key"),
    C(CORE_REG, "jdeq.jacobian_frobenius(..., num_samples=0)", "num_samples 0",
      _core("jacobian_frobenius", _FUN, _Z0, _A, _KEY, num_samples=0), ValueError, r"`num_samples` must be an int >= 1"),
    C(CORE_REG, "jdeq.jacobian_frobenius(..., noise='uniform')", "unknown noise",
      _core("jacobian_frobenius", _FUN, _Z0, _A, _KEY, noise="uniform"), ValueError, r"`noise` must be one of"),
    C(CORE_REG, "jdeq.jacobian_frobenius(f, z, args, key)", "z int32",
      _core("jacobian_frobenius", _FUN, _Z0_INT, _A, _KEY), TypeError, r"`z` must be floating point"),
    C(CORE_REG, "jdeq.jacobian_frobenius(f, z, args, key)", "z with batch 0",
      lambda: __import__("jdeq").jacobian_frobenius(_f, _z0((0, 3)), _a((0, 3)), _key()), ValueError, r"`z`.*batch.*0"),
    C(CORE_REG, "jdeq.spectral_radius(..., iters=1)", "iters 1",
      _core("spectral_radius", _FUN, _Z0, _A, _KEY, iters=1), ValueError, r"`iters` must be an int >= 2"),
    C(CORE_REG, "jdeq.spectral_radius(f, z, args)", "no key", _core("spectral_radius", _FUN, _Z0, _A),
      TypeError, r"`key` must be a JAX PRNG key"),
    C(CORE_REG, "jdeq.jacobian_penalty(..., gamma=-1)", "gamma negative",
      _core("jacobian_penalty", _FUN, _Z0, _A, _KEY, gamma=-1.0), ValueError, r"`gamma` must be a number >= 0"),
    C(CORE_REG, "jdeq.jacobian_penalty(..., gamma=nan)", "gamma NaN",
      _core("jacobian_penalty", _FUN, _Z0, _A, _KEY, gamma=NAN), ValueError, r"`gamma` must be a number >= 0"),
    C(CORE_REG, "jdeq.jacobian_penalty(..., prob=0)", "prob 0",
      _core("jacobian_penalty", _FUN, _Z0, _A, _KEY, gamma=1.0, prob=0.0), ValueError, r"`prob` must be a number in \(0, 1\]"),
    C(CORE_REG, "jdeq.jacobian_frobenius('tanh', z, args, key)", "f not callable",
      _core("jacobian_frobenius", "tanh", _Z0, _A, _KEY), TypeError, r"`f` must be callable as f\(z, args\)"),
    C(CORE_REG, "jdeq.jacobian_penalty(f, z, args, key, prob=0.5)", "z int32 (skipped calls too)",
      _core("jacobian_penalty", _FUN, _Z0_INT, _A, _KEY, gamma=1.0, prob=0.5), TypeError, r"`z` must be floating point"),
    # ------------------------------------------------------------------ core: correction
    C(CORE_COR, "jdeq.fixed_point_states(..., states=0)", "states 0",
      _core("fixed_point_states", _FUN, _Z0, _A, states=0), ValueError, r"`states` must be an int >= 1"),
    C(CORE_COR, "jdeq.fixed_point_states(..., states=[3, 2])", "budgets not increasing",
      _core("fixed_point_states", _FUN, _Z0, _A, states=[3, 2]), ValueError, r"strictly increasing"),
    C(CORE_COR, "jdeq.fixed_point_states(..., states=[2, 2, 4])", "a budget repeated",
      _core("fixed_point_states", _FUN, _Z0, _A, states=[2, 2, 4]), ValueError,
      r"`states` as budgets must be a non-empty, strictly increasing sequence of ints >= 1, got \[2, 2, 4\]\."),
    C(CORE_COR, "jdeq.fixed_point_states(..., states='ab')", "states a string",
      _core("fixed_point_states", _FUN, _Z0, _A, states="ab"), TypeError, r"`states` must be an int or a sequence"),
    C(CORE_COR, "jdeq.fixed_point_states(..., states=[0, 2])", "a budget below 1",
      _core("fixed_point_states", _FUN, _Z0, _A, states=[0, 2]), ValueError,
      r"`states` as budgets must be a non-empty, strictly increasing sequence of ints >= 1, got \[0, 2\]\."),
    C(CORE_COR, "jdeq.fixed_point_states(..., states=[])", "no budgets",
      _core("fixed_point_states", _FUN, _Z0, _A, states=[]), ValueError,
      r"`states` as budgets must be a non-empty, strictly increasing sequence of ints >= 1, got \[\]\."),
    C(CORE_COR, "jdeq.fixed_point_states(..., states=b'\\x01\\x02')", "states as bytes",
      _core("fixed_point_states", _FUN, _Z0, _A, states=b"\x01\x02"), TypeError, r"`states` must be an int or a sequence"),
    C(CORE_COR, "jdeq.fixed_point_states(..., states=(1, 2.0))", "a float budget",
      _core("fixed_point_states", _FUN, _Z0, _A, states=(1, 2.0)), TypeError, r"`states` must be an int or a sequence"),
    C(CORE_COR, "jdeq.fixed_point_states(..., states=(1, True))", "a bool budget",
      _core("fixed_point_states", _FUN, _Z0, _A, states=(1, True)), TypeError, r"`states` must be an int or a sequence"),
    C(CORE_COR, "jdeq.fixed_point_states(..., solver=jdeq.JaxoptSolver(...))", "solver without snapshots",
      _core("fixed_point_states", _FUN, _Z0, _A, solver=_FPI_JAXOPT), TypeError, r"`solver`: JaxoptSolver runs jaxopt's own loop"),
    C(CORE_COR, "jdeq.fixed_point_states(..., gradient=jdeq.Unrolled())", "unsupported gradient",
      _core("fixed_point_states", _FUN, _Z0, _A, gradient=_UNROLLED), TypeError, r"`gradient` must be a jdeq.Gradient defined at the fixed point"),
    C(CORE_COR, "jdeq.fixed_point_states(..., maxiter=0)", "maxiter 0",
      _core("fixed_point_states", _FUN, _Z0, _A, maxiter=0), ValueError, r"`maxiter` must be an int >= 1"),
    C(CORE_COR, "jdeq.correction_weights(0)", "num_states 0", _core("correction_weights", 0),
      ValueError, r"`num_states` must be an int >= 1"),
    C(CORE_COR, "jdeq.correction_weights(3, 'cosine')", "unknown kind", _core("correction_weights", 3, "cosine"),
      ValueError, r"`kind` must be one of"),
    C(CORE_COR, "jdeq.correction_weights(3, gamma=0)", "gamma 0", _core("correction_weights", 3, gamma=0.0),
      ValueError, r"`gamma` must be a number in \(0, 1\]"),
    C(CORE_COR, "jdeq.correction_loss(3, states)", "loss_fn not callable", _core("correction_loss", 3, (1.0,)),
      TypeError, r"`loss_fn` must be callable"),
    C(CORE_COR, "jdeq.correction_loss(loss, ())", "no states", _core("correction_loss", jnp.sum, ()),
      ValueError, r"`states` must hold at least one state"),
    C(CORE_COR, "jdeq.correction_loss(loss, (s1, s2), weights=[1.0])", "one weight for two states",
      lambda: __import__("jdeq").correction_loss(jnp.sum, (_z0(), _z0()), weights=[1.0]), ValueError,
      r"`weights` must have one entry per state \(2\)"),
    C(CORE_COR, "jdeq.correction_loss(lambda z: z, states)", "loss_fn not scalar",
      lambda: __import__("jdeq").correction_loss(lambda z: z, (_z0(),)), ValueError, r"`loss_fn` must return a scalar"),
    # ------------------------------------------------------------------ core: hypersolver
    C(CORE_HYP, "jdeq.HyperAnderson(params=init_mixer(key, memory=3))", "mixer for another memory",
      lambda: _hyper(params=_MIXER3()), ValueError, r"`params` must come from jdeq.init_mixer\(key, memory=5\)"),
    C(CORE_HYP, "jdeq.HyperAnderson(learned_steps=-1)", "learned_steps negative", lambda: _hyper(learned_steps=-1),
      ValueError, r"`learned_steps` must be None or an int >= 0"),
    C(CORE_HYP, "jdeq.hyper_loss(f, z0, args, jdeq.Anderson(), steps=5)", "not a HyperAnderson",
      _core("hyper_loss", _FUN, _Z0, _A, _ANDERSON, steps=5), TypeError, r"`solver` must be a jdeq.HyperAnderson"),
    C(CORE_HYP, "jdeq.hyper_loss(..., steps=1)", "steps 1",
      lambda: __import__("jdeq").hyper_loss(_f, _z0(), _a(), _hyper(), steps=1), ValueError, r"`steps` must be an int >= 2"),
    C(CORE_HYP, "jdeq.hyper_loss(f, z0, ...)", "z0 of rank 3",
      lambda: __import__("jdeq").hyper_loss(_f, _z0((2, 3, 1)), _a((2, 3, 1)), _hyper(), steps=3), ValueError,
      r"`z0` must be a \(batch, dim\) array, got shape \(2, 3, 1\)"),
    C(CORE_HYP, "jdeq.init_mixer(key, memory=0)", "memory 0", _core("init_mixer", _KEY, memory=0),
      ValueError, r"`memory` must be an int >= 1"),
    C(CORE_HYP, "jdeq.init_mixer(None)", "no key", _core("init_mixer", None), TypeError, r"`key` must be a JAX PRNG key"),
    # ------------------------------------------------------------------ jdeq.nnx
    C(NNX, "jdeq.nnx.DEQ('cell')", "cell not an nnx.Module", lambda: __import__("jdeq").nnx.DEQ("cell"),
      TypeError, r"`cell` must be an nnx.Module"),
    C(NNX, "jdeq.nnx.DEQ(cell, solver='anderson')", "solver a string (caught at construction)",
      lambda: __import__("jdeq").nnx.DEQ(_cell(), solver="anderson"), TypeError, r"`solver` must be a jdeq.Solver"),
    C(NNX, "jdeq.nnx.DEQ(cell, gradient=jdeq.Anderson())", "gradient a solver",
      lambda: __import__("jdeq").nnx.DEQ(_cell(), gradient=__import__("jdeq").Anderson()), TypeError,
      r"`gradient` must be a jdeq.Gradient"),
    C(NNX, "jdeq.nnx.DEQ(cell, maxiter=5)", "unknown keyword (maxiter belongs to the solver or the call)",
      lambda: __import__("jdeq").nnx.DEQ(_cell(), maxiter=5), TypeError, r"unexpected keyword argument 'maxiter'"),
    C(NNX, "jdeq.nnx.Unrolled(cell, depth=0)", "depth 0 (caught at construction)",
      lambda: __import__("jdeq").nnx.Unrolled(_cell(), depth=0), ValueError, r"`depth` must be an int >= 1"),
    C(NNX, "deq.unrolled_depth = 0; deq(x)", "unrolled_depth 0", lambda: _unrolled_deq(0)(_x((2, 3))), ValueError,
      r"`unrolled_depth` must be an int >= 1"),
    C(NNX, "deq(x)", "x with 5 features for a cell built for 3", lambda: _deq()(_x((2, 5))),
      ValueError, r"`x` must have 3 features .*got shape \(2, 5\)"),
    C(NNX, "deq(x)", "x of rank 1 (no batch axis)", lambda: _deq()(_x((3,))),
      ValueError, r"`x` must be \(batch, 3\).*got shape \(3,\)"),
    C(NNX, "deq(x)", "x complex64", lambda: _deq()(_x(dtype=jnp.complex64)), TypeError,
      r"`x` must be real.*complex64"),
    C(NNX, "deq(x)", "x with batch 0", lambda: _deq()(_x((0, 3))), ValueError, r"`z0`.*batch.*0"),
    C(NNX, "deq(x, z0)", "z0 int32", lambda: _deq()(_x(), jnp.zeros((2, 8), jnp.int32)), TypeError,
      r"`z0` must be floating point.*int32"),
    C(NNX, "deq(x, z0)", "z0 of the wrong width", lambda: _deq()(_x(), jnp.zeros((2, 5))), ValueError,
      r"`z` must have 8 features"),
    C(NNX, "deq(x, maxiter=0)", "maxiter 0", lambda: _deq()(_x(), maxiter=0), ValueError, r"`maxiter` must be an int >= 1"),
    C(NNX, "deq(x, batched='yes')", "batched not a bool (a call-time override)",
      lambda: _deq()(_x(), batched="yes"), TypeError, r"`batched` must be a bool"),
    C(NNX, "deq(x, tol=1e-3)", "unknown keyword tol", lambda: _deq()(_x(), tol=1e-3), TypeError,
      r"unexpected keyword argument 'tol'"),
    C(NNX, "deq(x)", "NaN in a cell parameter (run-time value)", lambda: _describe(_nan_cell_deq()(_x())[1]), None,
      r"converged=\[False, False\]"),
    C(NNX, "deq(x)", "NaN in x (run-time value)", lambda: _describe(_deq()(_x(value=NAN))[1]), None,
      r"converged=\[False, False\]"),
    # ------------------------------------------------------------------ jdeq.linen
    C(LINEN, "jdeq.linen.DEQ(cell='cell').init(key, x)", "cell not a Linen module",
      _linen_init(lambda jdeq: jdeq.linen.DEQ(cell="cell")), TypeError, r"`cell` must be a flax.linen.Module"),
    C(LINEN, "jdeq.linen.DEQ(cell=..., solver='anderson').init(key, x)", "solver a string",
      _linen_init(lambda jdeq: jdeq.linen.DEQ(cell=jdeq.models.linen.MLPCell(features=8), solver="anderson")),
      TypeError, r"`solver` must be a jdeq.Solver"),
    C(LINEN, "jdeq.linen.DEQ(cell=..., depth=3)", "unknown keyword",
      lambda: __import__("jdeq").linen.DEQ(cell=__import__("jdeq").models.linen.MLPCell(features=8), depth=3),
      TypeError, r"unexpected keyword argument 'depth'"),
    C(LINEN, "jdeq.linen.Unrolled(cell=..., depth=0).init(key, x)", "depth 0",
      _linen_init(lambda jdeq: jdeq.linen.Unrolled(cell=jdeq.models.linen.MLPCell(features=8), depth=0)),
      ValueError, r"`depth` must be an int >= 1"),
    C(LINEN, "deq.apply(variables, x)", "x with 5 features for variables made with 3", lambda: _linen_apply(_x((2, 5))),
      ValueError, r"`x` must have 3 features"),
    C(LINEN, "deq.apply(variables, x)", "x of rank 1", lambda: _linen_apply(_x((3,))), ValueError,
      r"`x` must be \(batch, features\).*got shape \(3,\)"),
    C(LINEN, "deq.apply(variables, x, z0)", "z0 int32", lambda: _linen_apply(z0=jnp.zeros((2, 8), jnp.int32)),
      TypeError, r"`z0` must be floating point"),
    C(LINEN, "deq.apply(variables, x, maxiter=2.5)", "maxiter a fraction", lambda: _linen_apply(maxiter=2.5),
      TypeError, r"`maxiter` must be an int"),
    # ------------------------------------------------------------------ jdeq.models
    C(MODELS, "jdeq.models.MLPCell(0, 8, rngs=...)", "in_features 0", _mk("MLPCell", 0, 8), ValueError,
      r"`in_features` must be an int >= 1, got 0"),
    C(MODELS, "jdeq.models.MLPCell(3, 8.5, rngs=...)", "features not an int", _mk("MLPCell", 3, 8.5), ValueError,
      r"`features` must be an int >= 1, got 8.5"),
    C(MODELS, "jdeq.models.MLPCell(3, 8, activation='tanh', rngs=...)", "activation a string",
      _mk("MLPCell", 3, 8, activation="tanh"), TypeError, r"`activation` must be callable"),
    C(MODELS, "jdeq.models.MLPCell(3, 8, dtype=jnp.int32, rngs=...)", "integer dtype",
      _mk("MLPCell", 3, 8, dtype=jnp.int32), TypeError, r"`dtype` must be a floating dtype"),
    C(MODELS, "jdeq.models.MLPCell(3, 8)", "rngs missing", lambda: _models("MLPCell")(3, 8), TypeError,
      r"missing 1 required keyword-only argument: 'rngs'"),
    C(MODELS, "jdeq.models.linen.MLPCell(features=0).init(...)", "features 0",
      lambda: __import__("jdeq").models.linen.MLPCell(features=0).init(jax.random.PRNGKey(0), _z0((2, 8)), _x()),
      ValueError, r"`features` must be an int >= 1, got 0"),
    C(MODELS, "jdeq.models.MDEQCell(widths=(), rngs=...)", "no scales", _mk("MDEQCell", ()), ValueError,
      r"`widths` must be 1 to 4 ints >= 1"),
    C(MODELS, "jdeq.models.MDEQCell(spatial_dims=4, rngs=...)", "spatial_dims 4", _mk("MDEQCell", spatial_dims=4),
      ValueError, r"`spatial_dims` must be one of \(1, 2, 3\)"),
    C(MODELS, "jdeq.models.MDEQClassifier(1, 0, rngs=...)", "num_classes 0", _mk("MDEQClassifier", 1, 0),
      ValueError, r"`num_classes` must be an int >= 1"),
    C(MODELS, "jdeq.models.TransformerCell(6, 4, rngs=...)", "heads do not divide features",
      _mk("TransformerCell", 6, 4), ValueError, r"`num_heads` must divide `features`=6"),
    C(MODELS, "jdeq.models.TransformerClassifier(16, 10, length=8, num_layers=0, rngs=...)", "num_layers 0",
      _mk("TransformerClassifier", 16, 10, length=8, num_layers=0), ValueError, r"`num_layers` must be an int >= 1"),
    C(MODELS, "jdeq.models.LSTMClassifier(16, 10, hidden=0, rngs=...)", "hidden 0",
      _mk("LSTMClassifier", 16, 10, hidden=0), ValueError, r"`hidden` must be an int >= 1"),
    C(MODELS, "jdeq.models.MonotoneDenseCell(3, 8, m=0, rngs=...)", "m 0", _mk("MonotoneDenseCell", 3, 8, m=0.0),
      ValueError, r"`m` must be a number > 0"),
    C(MODELS, "jdeq.models.MonotoneConvCell(1, 4, kernel_size=2, rngs=...)", "even kernel",
      _mk("MonotoneConvCell", 1, 4, kernel_size=2), ValueError, r"`kernel_size` must be an odd int >= 1"),
    C(MODELS, "jdeq.models.MonDEQ(cell, splitting='admm')", "unknown splitting",
      lambda: _models("MonDEQ")(_DENSE_CELL(), splitting="admm"), TypeError, r"`splitting`"),
    C(MODELS, "jdeq.models.VariationalDropout(('a', 'b'), 0.1, rngs=...)", "shape not ints",
      _mk("VariationalDropout", ("a", "b"), 0.1), TypeError, r"`shape` must be a sequence of ints"),
    C(MODELS, "jdeq.models.VariationalDropout((8,), 1.0, rngs=...)", "rate 1", _mk("VariationalDropout", (8,), 1.0),
      ValueError, r"`rate` must be a number in \[0, 1\)"),
    C(MODELS, "jdeq.models.reset_dropout(model, 0)", "batch 0", lambda: _models("reset_dropout")(_cell(), 0),
      ValueError, r"`batch` must be an int >= 1"),
    C(MODELS, "jdeq.models.SpectralNorm('w', rngs=...)", "layer not a module", _mk("SpectralNorm", "w"),
      TypeError, r"`layer` must be an nnx.Module"),
    C(MODELS, "jdeq.models.apply_norm(model, 'batch')", "unknown kind", lambda: _models("apply_norm")(_cell(), "batch", rngs=__import__("flax").nnx.Rngs(0)),
      ValueError, r"`kind` must be one of \('spectral', 'weight'\)"),
    C(MODELS, "jdeq.models.MixedPrecision(cell, compute_dtype=jnp.int8)", "integer compute dtype",
      lambda: _models("MixedPrecision")(_cell(), compute_dtype=jnp.int8), ValueError, r"`compute_dtype` must be a floating dtype"),
    C(MODELS, "jdeq.models.HyperSolver(3, 0, rngs=...)", "features 0", _mk("HyperSolver", 3, 0), ValueError,
      r"`features` must be an int >= 1"),
    # ------------------------------------------------------------------ jdeq.data
    C(DATA, "arithmetic.generate(-1)", "n negative", _lazy("jdeq.data.arithmetic.generate", -1), ValueError,
      r"`n` must be an int >= 0, got -1"),
    C(DATA, "arithmetic.generate(2.5)", "n not an int", _lazy("jdeq.data.arithmetic.generate", 2.5), TypeError,
      r"`n` must be an int >= 0, got 2.5"),
    C(DATA, "arithmetic.generate(4, length=0)", "length 0", _lazy("jdeq.data.arithmetic.generate", 4, length=0),
      ValueError, r"`length` must be an int >= 1"),
    C(DATA, "arithmetic.generate(4, length=8, max_depth=5)", "depth that does not fit",
      _lazy("jdeq.data.arithmetic.generate", 4, length=8, max_depth=5), ValueError, r"`max_depth`=5 does not fit in `length`=8"),
    C(DATA, "arithmetic.generate(4, min_depth=3, max_depth=1)", "min_depth > max_depth",
      _lazy("jdeq.data.arithmetic.generate", 4, min_depth=3, max_depth=1), ValueError, r"`max_depth` must be an int >= 3"),
    C(DATA, "arithmetic.generate(4, length=8, depth_weights=[1.0])", "one weight for two depths",
      _lazy("jdeq.data.arithmetic.generate", 4, length=8, depth_weights=[1.0]), ValueError, r"`depth_weights` must hold 2"),
    C(DATA, "arithmetic.generate(4, length=8, depth_weights=[nan, 1])", "NaN weight",
      _lazy("jdeq.data.arithmetic.generate", 4, length=8, depth_weights=[NAN, 1.0]), ValueError, r"`depth_weights` must hold 2 non-negative"),
    C(DATA, "arithmetic.generate(500, length=3)", "more examples than distinct expressions",
      _lazy("jdeq.data.arithmetic.generate", 500, length=3), ValueError, r"could not generate `n`=500 distinct"),
    C(DATA, "arithmetic.train_test_split(data, 10)", "test_size > n",
      lambda: __import__("jdeq").data.arithmetic.train_test_split(__import__("jdeq").data.arithmetic.generate(4, length=8), 10),
      ValueError, r"`test_size`=10 exceeds the 4 examples"),
    C(DATA, "arithmetic.depth_split(data, -1)", "train_max_depth negative",
      lambda: __import__("jdeq").data.arithmetic.depth_split(__import__("jdeq").data.arithmetic.generate(4, length=8), -1),
      ValueError, r"`train_max_depth` must be an int >= 0"),
    C(DATA, "arithmetic.decode([1, 99])", "token id outside the vocabulary", _lazy("jdeq.data.arithmetic.decode", [1, 99]),
      ValueError, r"token"),
    C(DATA, "digits.load(test_fraction=1.0)", "fraction 1", _lazy("jdeq.data.digits.load", test_fraction=1.0),
      ValueError, r"`test_fraction` must be a number in \(0, 1\)"),
    C(DATA, "digits.load(test_fraction=nan)", "fraction NaN", _lazy("jdeq.data.digits.load", test_fraction=NAN),
      ValueError, r"`test_fraction` must be a number in \(0, 1\)"),
    C(DATA, "digits.load(seed=-1)", "seed negative", _lazy("jdeq.data.digits.load", seed=-1), ValueError,
      r"`seed` must be an int >= 0"),
    C(DATA, "mnist1d.load(num_samples=10)", "too few samples", _lazy("jdeq.data.mnist1d.load", num_samples=10),
      ValueError, r"`num_samples` must be an int >= 20"),
    C(DATA, "mnist1d.load(train_split=0)", "split 0", _lazy("jdeq.data.mnist1d.load", train_split=0),
      ValueError, r"`train_split` must be a number in \(0, 1\)"),
    # ------------------------------------------------------------------ jdeq.train
    C(TRAIN, "fit(model, opt, data, steps=0, ...)", "steps 0", lambda: _fit(steps=0), ValueError, r"`steps` must be an int >= 1"),
    C(TRAIN, "fit(..., batch_size=16)", "batch larger than the data", lambda: _fit(batch_size=16), ValueError,
      r"`batch_size`=16 exceeds the 8 training examples"),
    C(TRAIN, "fit(..., batch_size=2.0)", "batch_size a float", lambda: _fit(batch_size=2.0), ValueError,
      r"`batch_size` must be an int >= 1"),
    C(TRAIN, "fit(..., eval_every=0)", "eval_every 0", lambda: _fit(eval_every=0), ValueError,
      r"`eval_every` must be None or an int >= 1"),
    C(TRAIN, "fit(..., log_every=0)", "log_every 0", lambda: _fit(log_every=0), ValueError,
      r"`log_every` must be an int >= 1"),
    C(TRAIN, "fit(..., seed=-1)", "seed negative", lambda: _fit(seed=-1), ValueError, r"`seed` must be an int >= 0"),
    C(TRAIN, "TrainState.create({'w': w}, opt)", "model a dict of arrays",
      lambda: __import__("jdeq").train.TrainState.create({"w": __import__("numpy").ones(2)}, __import__("optax").sgd(0.1)),
      TypeError, r"`model` must be an nnx.Module, got dict\."),
    C(TRAIN, "TrainState.create(model, opt)", "optimizer with init but no update",
      lambda: __import__("jdeq").train.TrainState.create(_net(), __import__("types").SimpleNamespace(init=print)),
      TypeError, r"`optimizer` must be an optax GradientTransformation, got namespace\(init="),
    C(TRAIN, "fit(model, 'adam', data, ...)", "optimizer a string",
      lambda: __import__("jdeq").train.fit(_net(), "adam", _data(), steps=1, batch_size=4), TypeError,
      r"`optimizer` must be an optax GradientTransformation"),
    C(TRAIN, "fit(..., loss_fn='xent')", "loss_fn not callable", lambda: _fit(loss_fn="xent"), TypeError,
      r"`loss_fn` must be callable"),
    C(TRAIN, "fit(..., epochs=3)", "unknown keyword", lambda: _fit(epochs=3), TypeError, r"unexpected keyword argument 'epochs'"),
    C(TRAIN, "fit(model, opt, [x, y], ...)", "data a list", lambda: _fit(data=[1, 2]), TypeError,
      r"`data` must be a non-empty mapping of arrays, got list"),
    C(TRAIN, "fit(model, opt, {'inputs': x[:8], 'labels': y[:7]}, ...)", "arrays of different lengths",
      lambda: _fit(data={"inputs": _data()["inputs"], "labels": _data()["labels"][:7]}), ValueError,
      r"the arrays of `data` must share a leading axis, got sizes \{'inputs': 8, 'labels': 7\}"),
    C(TRAIN, "fit(model, opt, data, ...)", "no examples (leading size 0)", lambda: _fit(data=_data(0)), ValueError,
      r"`data` has no examples"),
    C(TRAIN, "fit(model, opt, data, ...)", "NaN in data['inputs']", lambda: _fit(data=_data(inputs=_with(_data()["inputs"], (3, 1), NAN))),
      ValueError, r"`data\['inputs'\]` has 1 non-finite value"),
    C(TRAIN, "fit(model, opt, data, ...)", "complex inputs", lambda: _fit(data=_data(inputs=_data()["inputs"] + 0j)),
      TypeError, r"`data\['inputs'\]` must be real numbers.*complex"),
    C(TRAIN, "fit(model, opt, data, ...)", "string labels", lambda: _fit(data=_data(labels=np.array(list("abcabcab")))),
      TypeError, r"`data\['labels'\]` must be real numbers.*<U1"),
    C(TRAIN, "fit(model, opt, data, ...)", "float labels", lambda: _fit(data=_data(labels=np.zeros(8, np.float32))),
      TypeError, r"`labels` must be integers.*float32"),
    C(TRAIN, "fit(model, opt, data, ...)", "bool labels", lambda: _fit(data=_data(labels=np.arange(8) % 2 == 0)),
      TypeError, r"`labels` must be integers.*bool"),
    C(TRAIN, "classification_loss(model, batch)", "a model returning a 3-tuple",
      lambda: _loss_of(lambda x: (x, None, None)), ValueError,
      r"a model must return `logits` or `\(logits, stats\)`, got a 3-tuple"),
    C(TRAIN, "fit(model, opt, data, ...)", "labels of shape (n, 1)", lambda: _fit(data=_data(labels=np.zeros((8, 1), np.int32))),
      ValueError, r"`labels` must have shape \(4,\).*\(4, 1\)"),
    C(TRAIN, "fit(model, opt, {'x': x, 'y': y}, ...)", "keys other than inputs/labels",
      lambda: _fit(data={"x": _data()["inputs"], "y": _data()["labels"]}), ValueError,
      r"needs the keys 'inputs' and 'labels'.*\['x', 'y'\]"),
    C(TRAIN, "fit(model, opt, data, ...)", "inputs with 5 features for a model built for 4",
      lambda: _fit(data=_data(inputs=np.zeros((8, 5), np.float32))), ValueError, r"`x` must have 4 features"),
    C(TRAIN, "fit(..., eval_data={'test': data with inf})", "inf in eval data",
      lambda: _fit(eval_data={"test": _data(inputs=_with(_data()["inputs"], (0, 0), np.inf))}), ValueError,
      r"`eval_data\['test'\]\['inputs'\]` has 1 non-finite value"),
    C(TRAIN, "fit(model_with_nan_weight, opt, data, ...)", "NaN in a parameter", lambda: _fit(model=_nan_net()),
      ValueError, r"`model` has non-finite \(NaN/inf\) parameters at \['head.kernel"),
    C(TRAIN, "fit(..., jac_reg=1.0)", "jac_reg a number", lambda: _fit(jac_reg=1.0), TypeError,
      r"`jac_reg` must be None or a jdeq.train.JacReg"),
    C(TRAIN, "fit(plain_linear_model, ..., jac_reg=JacReg(gamma=1))", "jac_reg without a DEQ",
      lambda: _fit(model=_plain_net(), jac_reg=__import__("jdeq").train.JacReg(gamma=1.0)), ValueError,
      r"`jac_reg` needs an equilibrium layer"),
    C(TRAIN, "evaluate(model, data, batch_size=0)", "batch_size 0", lambda: _evaluate(batch_size=0), ValueError,
      r"`batch_size` must be an int >= 1"),
    C(TRAIN, "evaluate(model, data)", "no examples", lambda: _evaluate(_data(0)), ValueError, r"`data` has no examples"),
    C(TRAIN, "evaluate(model, data)", "NaN in inputs", lambda: _evaluate(_data(inputs=np.full((8, 4), NAN, np.float32))),
      ValueError, r"`data\['inputs'\]` has 32 non-finite values"),
    C(TRAIN, "evaluate(model, data, loss_fn=None)", "loss_fn None", lambda: _evaluate(loss_fn=None), TypeError,
      r"`loss_fn` must be callable"),
    C(TRAIN, "predict(model, inputs, batch_size=0)", "batch_size 0", lambda: _predict(batch_size=0), ValueError,
      r"`batch_size` must be an int >= 1"),
    C(TRAIN, "predict(model, inputs)", "no examples", lambda: _predict(np.zeros((0, 4), np.float32)), ValueError,
      r"`inputs` has no examples"),
    C(TRAIN, "predict(model, None)", "inputs None", lambda: _predict(None), TypeError,
      r"`inputs` must be an array or a non-empty mapping of arrays"),
    C(TRAIN, "predict(model, inputs)", "inf in inputs", lambda: _predict(np.full((8, 4), np.inf, np.float32)),
      ValueError, r"`inputs` has 32 non-finite values"),
    C(TRAIN, "predict(model, inputs, maxiter=0)", "maxiter 0", lambda: _predict(maxiter=0), ValueError,
      r"`maxiter` must be an int >= 1"),
    C(TRAIN, "next(batches(data, 0))", "batch_size 0", lambda: next(__import__("jdeq").train.batches(_data(), 0)),
      ValueError, r"`batch_size` must be an int in \[1, 8\]"),
    C(TRAIN, "batch_indices(10, 2.5, 0)", "batch_size a float", lambda: __import__("jdeq").train.batch_indices(10, 2.5, 0),
      TypeError, r"`batch_size` must be an int"),
    C(TRAIN, "batch_indices(10, 2, -1)", "step negative", lambda: __import__("jdeq").train.batch_indices(10, 2, -1),
      ValueError, r"`step` must be an int >= 0"),
    C(TRAIN, "batch_indices(10, 2, 0, seed=-1)", "seed negative",
      lambda: __import__("jdeq").train.batch_indices(10, 2, 0, seed=-1), ValueError, r"`seed` must be an int >= 0"),
    C(TRAIN, "JacReg(gamma=-1)", "gamma negative", lambda: __import__("jdeq").train.JacReg(gamma=-1.0), ValueError,
      r"`gamma` must be a number >= 0"),
    C(TRAIN, "JacReg(gamma=1, prob=1.5)", "prob > 1", lambda: __import__("jdeq").train.JacReg(gamma=1.0, prob=1.5),
      ValueError, r"`prob` must be a number in \(0, 1\]"),
    C(TRAIN, "JacReg(gamma=1, prob=0)", "prob 0 (the rule of jdeq.jacobian_penalty)",
      lambda: __import__("jdeq").train.JacReg(gamma=1.0, prob=0.0), ValueError, r"`prob` must be a number in \(0, 1\]"),
    C(TRAIN, "JacReg(gamma=1, noise='uniform')", "noise not normal/rademacher",
      lambda: __import__("jdeq").train.JacReg(gamma=1.0, noise="uniform"), ValueError,
      r"`noise` must be one of \('normal', 'rademacher'\), got 'uniform'"),
    C(TRAIN, "JacReg(gamma=1, num_samples=0)", "num_samples 0",
      lambda: __import__("jdeq").train.JacReg(gamma=1.0, num_samples=0), ValueError, r"`num_samples` must be an int >= 1"),
    C(TRAIN, "fit(..., pretrain=5)", "pretrain a number", lambda: _fit(pretrain=5), TypeError,
      r"`pretrain` must be None or a jdeq.train.Pretrain"),
    C(TRAIN, "fit(plain_linear_model, ..., pretrain=Pretrain(steps=2, depth=3))", "pretrain without a DEQ",
      lambda: _fit(model=_plain_net(), pretrain=__import__("jdeq").train.Pretrain(steps=2, depth=3)), ValueError,
      r"`pretrain` unrolls the model's jdeq.nnx.DEQ layers, but the model holds none"),
    C(TRAIN, "Pretrain(steps=0, depth=3)", "steps 0", lambda: __import__("jdeq").train.Pretrain(steps=0, depth=3),
      ValueError, r"`steps` must be an int >= 1"),
    C(TRAIN, "Pretrain(steps=2, depth=2.0)", "depth a float",
      lambda: __import__("jdeq").train.Pretrain(steps=2, depth=2.0), TypeError, r"`depth` must be an int"),
    C(TRAIN, "JacReg()", "gamma missing", lambda: __import__("jdeq").train.JacReg(), TypeError,
      r"missing 1 required keyword-only argument: 'gamma'"),
    # ------------------------------------------------------------------ command lines
    C(CLI, "benchmarks.memory_vs_depth.main(['--batch', '0'])", "batch 0", lambda: _cli("benchmarks.memory_vs_depth", "--batch", "0"),
      SystemExit, r"argument --batch: must be an int >= 1, got '0'"),
    C(CLI, "benchmarks.memory_vs_depth.main(['--depths', '4', '-1'])", "negative depth",
      lambda: _cli("benchmarks.memory_vs_depth", "--depths", "4", "-1"), SystemExit, r"argument --depths"),
    C(CLI, "benchmarks.memory_vs_depth.main(['--methods', 'magic'])", "unknown method",
      lambda: _cli("benchmarks.memory_vs_depth", "--methods", "magic"), SystemExit, r"argument --methods: invalid choice: 'magic'"),
    C(CLI, "benchmarks.speed.main(['--steps', 'ten'])", "not a number", lambda: _cli("benchmarks.speed", "--steps", "ten"),
      SystemExit, r"argument --steps: must be an int >= 1, got 'ten'"),
    C(CLI, "benchmarks.speed.main(['--width', '0'])", "width 0", lambda: _cli("benchmarks.speed", "--width", "0"),
      SystemExit, r"argument --width: must be an int >= 1"),
    C(CLI, "benchmarks.speed.main(['--gradients', 'Adjoint'])", "unknown gradient",
      lambda: _cli("benchmarks.speed", "--gradients", "Adjoint"), SystemExit, r"argument --gradients: invalid choice"),
    C(CLI, "benchmarks.backward_solvers.main(['--tols', '1e-3', '-1'])", "negative tolerance",
      lambda: _cli("benchmarks.backward_solvers", "--tols", "1e-3", "-1"), SystemExit, r"argument --tols: must be a number > 0"),
    C(CLI, "benchmarks.backward_solvers.main(['--target', '0'])", "target 0",
      lambda: _cli("benchmarks.backward_solvers", "--target", "0"), SystemExit, r"argument --target: must be a number > 0"),
    C(CLI, "benchmarks.backward_solvers.main(['--solvers', 'lu'])", "unknown backward solver",
      lambda: _cli("benchmarks.backward_solvers", "--solvers", "lu"), SystemExit, r"--solvers: unknown \['lu'\]"),
    C(CLI, "benchmarks.vs_torchdeq.main(['--rounds', '0'])", "rounds 0", lambda: _cli("benchmarks.vs_torchdeq", "--rounds", "0"),
      SystemExit, r"argument --rounds: must be an int >= 1"),
    C(CLI, "benchmarks.vs_torchdeq.main(['--torch-threads', '-2'])", "negative thread count",
      lambda: _cli("benchmarks.vs_torchdeq", "--torch-threads", "-2"), SystemExit, r"argument --torch-threads: must be an int >= 0"),
    C(CLI, "benchmarks.stabilization.main(['--epochs', '0'])", "epochs 0", lambda: _cli("benchmarks.stabilization", "--epochs", "0"),
      SystemExit, r"argument --epochs: must be an int >= 1"),
    C(CLI, "benchmarks.stabilization.main(['--prob', '1.5'])", "probability > 1",
      lambda: _cli("benchmarks.stabilization", "--prob", "1.5"), SystemExit, r"argument --prob: must be a number in \(0, 1\]"),
    C(CLI, "benchmarks.stabilization.main(['--dropout', '1'])", "dropout rate 1",
      lambda: _cli("benchmarks.stabilization", "--dropout", "1"), SystemExit, r"argument --dropout: must be a number in \[0, 1\)"),
    C(CLI, "benchmarks.stabilization.main(['--lr', '-0.1'])", "negative learning rate",
      lambda: _cli("benchmarks.stabilization", "--lr", "-0.1"), SystemExit, r"argument --lr: must be a number > 0"),
    C(CLI, "benchmarks.stabilization.main(['--variants', 'magic'])", "unknown variant",
      lambda: _cli("benchmarks.stabilization", "--variants", "magic"), SystemExit, r"unknown variant 'magic'"),
    C(CLI, "benchmarks.zoo.main(['--seeds', '0'])", "seeds 0", lambda: _cli("benchmarks.zoo", "--seeds", "0"),
      SystemExit, r"argument --seeds: must be an int >= 1"),
    C(CLI, "benchmarks.zoo.main(['--steps-scale', '0'])", "scale 0", lambda: _cli("benchmarks.zoo", "--steps-scale", "0"),
      SystemExit, r"argument --steps-scale: must be a number > 0"),
    C(CLI, "benchmarks.zoo.main(['--only', 'resnet50'])", "unknown model", lambda: _cli("benchmarks.zoo", "--only", "resnet50"),
      SystemExit, r"--only: unknown \['resnet50'\]"),
    C(CLI, "benchmarks.zoo.main(['--tasks', 'cifar10'])", "unknown task", lambda: _cli("benchmarks.zoo", "--tasks", "cifar10"),
      SystemExit, r"--tasks: unknown \['cifar10'\]"),
    C(CLI, "benchmarks.scaling.main(['--devices', '0'])", "zero devices", lambda: _cli("benchmarks.scaling", "--devices", "0"),
      SystemExit, r"argument --devices: must be an int >= 1"),
    C(CLI, "benchmarks.scaling.main(['--batches', '64', '0'])", "batch 0",
      lambda: _cli("benchmarks.scaling", "--batches", "64", "0"), SystemExit, r"argument --batches: must be an int >= 1"),
    C(CLI, "benchmarks.scaling.main(['--steps', '0'])", "steps 0", lambda: _cli("benchmarks.scaling", "--steps", "0"),
      SystemExit, r"argument --steps: must be an int >= 1"),
    C(CLI, "jdeq.experiments.arithmetic.main(['--seeds', '0'])", "seeds 0",
      lambda: _cli("jdeq.experiments.arithmetic", "--seeds", "0"), SystemExit, r"argument --seeds: must be an int >= 1"),
    C(CLI, "jdeq.experiments.arithmetic.main(['--length', '-4'])", "negative length",
      lambda: _cli("jdeq.experiments.arithmetic", "--length", "-4"), SystemExit, r"argument --length: must be an int >= 1"),
    C(CLI, "jdeq.experiments.arithmetic.main(['--experiments', 'depht'])", "unknown experiment (typo)",
      lambda: _cli("jdeq.experiments.arithmetic", "--experiments", "depht"), SystemExit, r"--experiments: unknown \['depht'\]"),
    C(CLI, "jdeq.experiments.arithmetic.main(['--deq-gradient', 'adjoint'])", "unknown gradient",
      lambda: _cli("jdeq.experiments.arithmetic", "--deq-gradient", "adjoint"), SystemExit, r"argument --deq-gradient: invalid choice"),
]


# ----------------------------------------------------------------------------- rendering


def _cell_text(text: str, limit: int = 180) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text.replace("|", "\\|")


def _exc_name(out: Outcome) -> str:
    if out.exc is None:
        return "(none)"
    if out.exc is SystemExit:
        return f"SystemExit({out.exit_code})"
    if out.exc.__module__.startswith("jdeq"):  # jdeq._validate's BadValue/BadType: show the builtin bases
        std = [c.__name__ for c in out.exc.__mro__ if c.__module__ == "builtins" and c not in (Exception, BaseException, object)]
        return f"{out.exc.__name__} ({', '.join(std)})"
    return out.exc.__name__


def row(case: Case, out: Outcome) -> str:
    """``case``'s row of ``docs/errors.md`` (the message as raised, shortened past its cell's
    length)."""
    return f"| `{_cell_text(case.call, 100)}` | {_cell_text(case.bad, 80)} | {_exc_name(out)} | {_cell_text(out.message)} |"


def render(outcomes: dict[int, Outcome] | None = None) -> str:
    """``docs/errors.md``: one table per area with the messages actually raised.

    Args:
      outcomes: ``{index in CASES: Outcome}`` already computed (the rest are run here).
    """
    outcomes = dict(outcomes or {})
    areas: dict[str, list[int]] = {}
    for i, case in enumerate(CASES):
        areas.setdefault(case.area, []).append(i)
    lines = [
        "# Errors on bad input",
        "",
        "<!-- Generated by `python -m tests.bad_input_cases > docs/errors.md`; "
        "tests/test_bad_input.py checks that it is current. Do not edit by hand. -->",
        "",
        f"Every row is a case of `tests/bad_input_cases.py` ({len(CASES)} cases), run by "
        "`tests/test_bad_input.py`, which checks the exception type, that the message names the "
        "argument and says what was expected, and that no XLA/jaxlib internal error reaches the user. "
        "Shape, dtype and structure checks happen at trace time (also under `jax.jit`); values "
        "(NaN/inf) are checked eagerly where they are host data (`jdeq.train`, `jdeq.data`), and "
        "inside a solve they show in `SolverStats` (or raise with `throw=True`). Command lines exit "
        "with argparse's usage error (status 2) naming the option. More core cases (pytree "
        "structure, shapes and dtypes returned by `f`, solver option ranges) are in `tests/test_errors.py`.",
        "",
    ]
    for area, idx in areas.items():
        lines += [f"## {area}", "", "| call | bad input | exception | message |", "|---|---|---|---|"]
        for i in idx:
            lines.append(row(CASES[i], outcomes.get(i) or outcome(CASES[i])))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
