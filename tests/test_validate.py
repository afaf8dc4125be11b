"""The validation layer (jdeq/_validate.py): each rule rejects what it must and accepts its edge
values, the argparse types of jdeq.argtypes apply the same rules, and a config and the command
line option that feeds it reject the same values with the same words."""

from __future__ import annotations

import argparse
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jdeq
from jdeq import _validate as V
from jdeq import argtypes as T

NAN, INF = float("nan"), float("inf")
TINY = 5e-324  # the smallest positive float
_PROPS = settings(max_examples=200, deadline=None)


class Lazy:
    """A parameter built when its test runs, not at collection: a test module must not start
    JAX at import (tests/conftest.py; mutation testing forks the collected tests)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __repr__(self):
        return f"{self.fn.__name__}{self.args}"

    @staticmethod
    def make(value):
        return value.fn(*value.args) if isinstance(value, Lazy) else value


def _raises(kind, fn, *args, **kw):
    with pytest.raises(kind) as info:
        fn(*args, **kw)
    return info.value


def _accepts(fn, *args, **kw) -> bool:
    try:
        fn(*args, **kw)
    except ValueError:  # BadValue, BadType (a TypeError too)
        return False
    return True


# ----------------------------------------------------------------------------- errors


def test_float_bounds_read_as_written_in_short_form():
    """A float bound is printed in its shortest form (1.0 as 1, 0.25 as 0.25), as an int bound
    is: the message reads "a number in (0, 1]" whichever type the bound has."""
    e = _raises(V.BadValue, V.number, 2.0, "beta", 0.0, 1.0, lo_open=True)
    assert str(e) == "`beta` must be a number in (0, 1], got 2.0."
    e = _raises(V.BadValue, V.number, 0.1, "lr", 0.25)
    assert str(e) == "`lr` must be a number >= 0.25, got 0.1."
    e = _raises(V.BadValue, V.number, 3, "p", hi=2.0, hi_open=True)
    assert str(e) == "`p` must be a number < 2, got 3."


def test_message_names_the_argument_and_what_it_expected():
    e = _raises(V.BadValue, V.positive_int, 0, "maxiter")
    assert str(e) == "`maxiter` must be an int >= 1, got 0."
    assert (e.name, e.expected, e.value) == ("maxiter", "an int >= 1", 0)
    e = _raises(V.BadType, V.positive_int, "3", "steps")
    assert str(e) == "`steps` must be an int >= 1, got '3'."


def test_wrong_kind_is_a_type_error_and_a_value_error_wrong_value_only_a_value_error():
    e = _raises(V.BadType, V.positive_int, 2.5, "n")
    assert isinstance(e, TypeError) and isinstance(e, ValueError)
    e = _raises(V.BadValue, V.positive_int, -2, "n")
    assert isinstance(e, ValueError) and not isinstance(e, TypeError)


def test_errors_pickle():  # they cross process boundaries (the experiments' --jobs)
    e = pickle.loads(pickle.dumps(_raises(V.BadType, V.positive_int, None, "seeds")))
    assert isinstance(e, TypeError) and "`seeds`" in str(e)


# ----------------------------------------------------------------------------- integers


@pytest.mark.parametrize("value", [1, 2, 10**30, np.int64(1), np.uint8(7), np.int32(3)])
def test_positive_int_accepts(value):
    out = V.positive_int(value, "n")
    assert out == value and type(out) is int


@pytest.mark.parametrize("value", [True, False, 1.0, 2.5, "1", None, np.bool_(True), Lazy(jnp.int32, 2), [1], 1 + 0j])
def test_ints_reject_other_kinds(value):  # bools are not ints; floats, strings, arrays neither
    value = Lazy.make(value)
    _raises(V.BadType, V.positive_int, value, "n")
    _raises(V.BadType, V.nonnegative_int, value, "n")


@pytest.mark.parametrize("value", [0, -1, np.int64(0), -(10**30)])
def test_positive_int_rejects_below_one(value):
    _raises(V.BadValue, V.positive_int, value, "n")


def test_nonnegative_int_edges():
    assert V.nonnegative_int(0, "seed") == 0
    assert V.nonnegative_int(np.int64(0), "seed") == 0
    assert str(_raises(V.BadValue, V.nonnegative_int, -1, "seed")) == "`seed` must be an int >= 0, got -1."


def test_integer_bounds_and_none():
    assert V.integer(20, "num_samples", 20) == 20
    assert str(_raises(V.BadValue, V.integer, 19, "num_samples", 20)) == "`num_samples` must be an int >= 20, got 19."
    assert V.integer(5, "k", 1, 5) == 5
    assert str(_raises(V.BadValue, V.integer, 6, "k", 1, 5)) == "`k` must be an int in [1, 5], got 6."
    assert V.positive_int(None, "eval_every", none=True) is None
    assert str(_raises(V.BadType, V.positive_int, None, "eval_every")) == "`eval_every` must be an int >= 1, got None."
    e = _raises(V.BadValue, V.positive_int, 0, "eval_every", none=True)
    assert str(e) == "`eval_every` must be None or an int >= 1, got 0."


def test_odd_int():
    assert V.odd_int(1, "kernel_size") == 1 and V.odd_int(5, "kernel_size") == 5
    for bad in (0, 2, -1, -3):
        _raises(V.BadValue, V.odd_int, bad, "kernel_size")
    _raises(V.BadType, V.odd_int, 3.0, "kernel_size")


@_PROPS
@given(st.integers(min_value=-(2**70), max_value=2**70), st.integers(-5, 5))
def test_integer_accepts_exactly_the_ints_at_or_above_the_bound(n, lo):
    assert _accepts(V.integer, n, "n", lo) == (n >= lo)
    assert _accepts(V.integer, np.int64(max(min(n, 2**62), -(2**62))), "n", lo) == (max(min(n, 2**62), -(2**62)) >= lo)
    assert not _accepts(V.integer, float(n), "n", lo)  # a whole float is not an int


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "rule, accepted, rejected",
    [
        (V.positive_number, [TINY, 1e-12, 1, 1e300, np.float32(0.5)], [0, 0.0, -0.0, -TINY, NAN, INF, -INF]),
        (V.nonnegative_number, [0, 0.0, -0.0, TINY, 3], [-TINY, -1, NAN, INF]),
        (V.probability, [TINY, 0.5, 1, 1.0], [0, 0.0, -0.1, 1 + 1e-15, NAN, INF]),
        (V.rate, [0, 0.0, 0.5, 1 - 1e-16], [1, 1.0, -TINY, NAN]),
        (V.fraction, [TINY, 0.5, 1 - 1e-16], [0, 1, NAN, -0.5, 1.5]),
    ],
)
def test_number_rules_edges(rule, accepted, rejected):
    for v in accepted:
        out = rule(v, "x")
        assert type(out) is float and out == float(v), v
    for v in rejected:
        e = _raises(V.BadValue, rule, v, "x")
        assert not isinstance(e, TypeError), v


@pytest.mark.parametrize("value", [True, "0.5", None, 1j, Lazy(jnp.float32, 0.5), [0.5], np.array([0.5])])
def test_numbers_reject_other_kinds(value):
    value = Lazy.make(value)
    for rule in (V.positive_number, V.nonnegative_number, V.probability, V.rate, V.fraction):
        _raises(V.BadType, rule, value, "x")


def test_number_messages():
    assert str(_raises(V.BadValue, V.probability, 0.0, "prob")) == "`prob` must be a number in (0, 1], got 0.0."
    assert str(_raises(V.BadValue, V.rate, 1, "rate")) == "`rate` must be a number in [0, 1), got 1."
    assert str(_raises(V.BadValue, V.positive_number, NAN, "tol")) == "`tol` must be a number > 0, got nan."
    assert str(_raises(V.BadValue, V.number, 3.0, "x", hi=2.5, hi_open=True)) == "`x` must be a number < 2.5, got 3.0."
    assert str(_raises(V.BadValue, V.number, 3.0, "x", hi=2.5)) == "`x` must be a number <= 2.5, got 3.0."
    assert str(_raises(V.BadValue, V.number, -1, "x", lo=0)) == "`x` must be a number >= 0, got -1."
    assert V.positive_number(None, "alpha", none=True) is None
    assert "None or a number > 0" in str(_raises(V.BadValue, V.positive_number, -1, "alpha", none=True))


@_PROPS
@given(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2, 2),
    st.floats(-2, 2),
    st.booleans(),
    st.booleans(),
)
def test_number_accepts_exactly_the_finite_values_in_the_interval(x, a, b, lo_open, hi_open):
    lo, hi = min(a, b), max(a, b)
    above = x > lo if lo_open else x >= lo
    below = x < hi if hi_open else x <= hi
    expect = math.isfinite(x) and above and below
    assert _accepts(V.number, x, "x", lo, hi, lo_open=lo_open, hi_open=hi_open) == expect


# ----------------------------------------------------------------------------- choices and kinds


def test_one_of():
    assert V.one_of("rademacher", "noise", ("normal", "rademacher")) == "rademacher"
    assert V.one_of(np.int64(2), "spatial_dims", (1, 2, 3)) == 2
    e = _raises(V.BadValue, V.one_of, "uniform", "noise", ("normal", "rademacher"))
    assert str(e) == "`noise` must be one of ('normal', 'rademacher'), got 'uniform'."
    for bad in (True, 1.5, "1", None, np.array([1, 2]), jnp.ones(2)):  # True is not the choice 1
        _raises(V.BadValue, V.one_of, bad, "spatial_dims", (1, 2, 3))
    assert V.one_of(None, "x", ("a",), none=True) is None


def test_stop_mode_is_one_rule():
    assert V.stop_mode("abs") == "abs" and V.stop_mode("rel") == "rel"
    for bad in ("ABS", "relative", "", None, 0, ("abs",)):
        e = _raises(V.BadValue, V.stop_mode, bad)
        assert str(e).startswith("`stop_mode` must be one of ('abs', 'rel'), got ")
    assert V.stop_mode(None, none=True) is None  # "use the forward solver's" (a gradient's option)
    assert "None or one of" in str(_raises(V.BadValue, V.stop_mode, "max", none=True))


def test_boolean_callable_instance():
    assert V.boolean(True, "throw") is True and V.boolean(np.bool_(False), "throw") is False
    for bad in (0, 1, "yes", None, jnp.bool_(True)):
        _raises(V.BadType, V.boolean, bad, "throw")
    assert V.callable_(len, "f") is len and V.callable_(None, "lipschitz", none=True) is None
    assert str(_raises(V.BadType, V.callable_, "f", "f", usage="f(z, args)")) == "`f` must be callable as f(z, args), got 'f'."
    assert V.instance(3, "n", int, "an int") == 3
    assert str(_raises(V.BadType, V.instance, "x", "mesh", int, "a jax.sharding.Mesh")) == "`mesh` must be a jax.sharding.Mesh, got 'x'."


def test_key():
    V.key(jax.random.key(0))
    V.key(jax.random.PRNGKey(0))
    jax.jit(lambda k: V.key(k) is k)(jax.random.key(1))  # traced keys too
    for bad in (None, 0, np.zeros(2, np.uint32), jnp.zeros(3, jnp.uint32), jnp.zeros(2, jnp.int32)):
        e = _raises(V.BadType, V.key, bad)
        assert str(e).startswith("`key` must be a JAX PRNG key")


def test_floating_dtype():
    assert V.floating_dtype(jnp.bfloat16, "dtype") == jnp.bfloat16
    assert V.floating_dtype("float16", "dtype") == np.float16
    assert str(_raises(V.BadType, V.floating_dtype, jnp.int32, "dtype")) == "`dtype` must be a floating dtype, got int32."
    _raises(V.BadType, V.floating_dtype, "not-a-dtype", "dtype")


def test_budget_accepts_static_and_traced_integer_budgets():
    V.budget(1)
    V.budget(np.int64(3))
    V.budget(jnp.int32(2))
    V.budget(jnp.int32(1))  # the edge: an integer array of one evaluation is a budget too
    assert jax.jit(lambda m: V.budget(m) or m + 1)(4) == 5  # traced: only the dtype is checked
    assert str(_raises(V.BadValue, V.budget, 0)) == "`maxiter` must be an int >= 1, got 0."
    _raises(V.BadValue, V.budget, jnp.int32(0))
    for bad in (True, 2.0, 2.5, "3", None):
        _raises(V.BadType, V.budget, bad)
    e = _raises(V.BadType, V.budget, jnp.float32(5), "eval_maxiter")
    assert "`eval_maxiter` must be an int >= 1 (a Python int or an integer scalar array)" in str(e) and "float32" in str(e)
    _raises(V.BadType, V.budget, jnp.ones(2, jnp.int32))

    class DtypeOnly:  # array-like enough to have a dtype, but no shape: not a scalar budget
        dtype = np.dtype("int32")

    _raises(V.BadType, V.budget, DtypeOnly())
    with pytest.raises(TypeError):
        jax.jit(lambda m: V.budget(m))(jnp.float32(3))


def test_import_is_stdlib_only():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(V))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top for a in n.names} | {n.module.split(".")[0] for n in top
                                                                      if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= {"__future__", "math", "numbers", "typing", "annotations", "Any", "Callable", "Sequence"}, names


# ----------------------------------------------------------------------------- argtypes = the same rules


_ARGTYPES = [  # (argparse type, the rule it applies, the text -> value parse)
    (T.positive_int, V.positive_int, int),
    (T.nonneg_int, V.nonnegative_int, int),
    (T.positive_float, V.positive_number, float),
    (T.nonneg_float, V.nonnegative_number, float),
    (T.probability, V.probability, float),
    (T.rate, V.rate, float),
    (T.fraction, V.fraction, float),
]


@pytest.mark.parametrize("argtype, rule, parse", _ARGTYPES, ids=[a[0].__name__ for a in _ARGTYPES])
@pytest.mark.parametrize("text", ["0", "1", "-1", "0.5", "1.0", "2", "1e-300", "nan", "inf", "-inf", "ten", "", " 3 ", "0x10"])
def test_argtype_accepts_what_its_rule_accepts(argtype, rule, parse, text):
    try:
        value = parse(text)
    except ValueError:
        value = text
    if _accepts(rule, value, "x"):
        assert argtype(text) == rule(value, "x")
    else:
        e = _raises(argparse.ArgumentTypeError, argtype, text)
        assert str(e) == f"must be {_raises(ValueError, rule, value, 'x').expected}, got {text!r}"


@_PROPS
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_float_argtypes_agree_with_their_rules(x):
    for argtype, rule, _ in _ARGTYPES[2:]:
        if _accepts(rule, x, "x"):
            assert argtype(repr(x)) == x
        else:
            assert _rejects_cli(argtype, repr(x))


@_PROPS
@given(st.integers(-(2**40), 2**40))
def test_int_argtypes_agree_with_their_rules(n):
    for argtype, rule, _ in _ARGTYPES[:2]:
        if _accepts(rule, n, "x"):
            assert argtype(str(n)) == n
        else:
            assert _rejects_cli(argtype, str(n))


def _rejects_cli(argtype, text) -> bool:
    try:
        argtype(text)
    except argparse.ArgumentTypeError:
        return True
    return False


# ----------------------------------------------------------------------------- config vs command line


def _jac_penalty(prob):
    f = lambda z, a: 0.5 * jnp.tanh(z) + a  # noqa: E731
    return jax.eval_shape(  # the checks run at trace time; nothing is compiled
        lambda: jdeq.jacobian_penalty(f, jnp.zeros((2, 3)), jnp.ones((2, 3)), jax.random.key(0), gamma=1.0, prob=prob)
    )


def _monotone_cell(m):
    from flax import nnx

    return nnx.eval_shape(lambda: jdeq.models.MonotoneDenseCell(3, 4, m=m, rngs=nnx.Rngs(0)))


def _experiment_config(**kw):
    from jdeq.experiments import arithmetic as E

    return E.Config(**kw)


def _dropout(rate):
    from flax import nnx

    return jdeq.models.VariationalDropout((4,), rate, rngs=nnx.Rngs(0))


# (config field, config factory, the CLI option and its argparse type, values to try)
_FLOATS = [0, 0.0, -0.0, TINY, 1e-9, 0.5, 1, 1.0, 1 + 1e-12, 2.5, -0.1, NAN, INF, -INF]
_INTS = [-5, -1, 0, 1, 2, 64]
CONFIG_VS_CLI = [
    ("prob", lambda v: jdeq.train.JacReg(gamma=1.0, prob=v), ("benchmarks.stabilization --prob", T.probability), _FLOATS),
    ("prob", _jac_penalty, ("benchmarks.stabilization --prob", T.probability), _FLOATS),
    ("gamma", lambda v: jdeq.train.JacReg(gamma=v), ("--gamma", T.nonneg_float), _FLOATS),
    ("num_samples", lambda v: jdeq.train.JacReg(gamma=1.0, num_samples=v), ("--samples", T.positive_int), _INTS),
    ("rate", _dropout, ("benchmarks.stabilization --dropout", T.rate), _FLOATS),
    ("steps", lambda v: _experiment_config(steps=v), ("jdeq.experiments.arithmetic --steps", T.positive_int), _INTS),
    ("n_train", lambda v: _experiment_config(n_train=v), ("jdeq.experiments.arithmetic --n-train", T.positive_int), _INTS),
    ("max_depth", lambda v: _experiment_config(max_depth=v), ("jdeq.experiments.arithmetic --max-depth", T.nonneg_int), _INTS),
    ("lr", lambda v: _experiment_config(lr=v), ("benchmarks.stabilization --lr", T.positive_float), _FLOATS),
    ("m", _monotone_cell, ("--m", T.positive_float), _FLOATS),
    ("test_fraction", lambda v: V.fraction(v, "test_fraction"), ("--test-fraction", T.fraction), _FLOATS),
]


@pytest.mark.parametrize("field, make, cli, values", CONFIG_VS_CLI, ids=[f"{c[0]}:{c[2][0]}" for c in CONFIG_VS_CLI])
def test_config_and_command_line_reject_the_same_values(field, make, cli, values):
    option, argtype = cli
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--opt", type=argtype)
    for v in values:
        text = repr(v) if isinstance(v, float) else str(v)
        try:
            make(v)
            config_error = None
        except ValueError as e:
            config_error = e
        try:
            parser.parse_args([f"--opt={text}"])
            cli_error = None
        except argparse.ArgumentError as e:
            cli_error = e
        assert (config_error is None) == (cli_error is None), (field, option, v, config_error, cli_error)
        if config_error is not None:
            assert f"`{field}` must be {config_error.expected}, got " in str(config_error)
            assert f"must be {config_error.expected}, got {text!r}" in str(cli_error), (str(config_error), str(cli_error))


def test_jacobian_penalty_prob_rule_is_the_jacreg_rule():
    # the two modules had different ranges ((0, 1] vs [0, 1]); now one rule, documented in both
    for v in _FLOATS:
        a, b = _accepts(jdeq.train.JacReg, gamma=1.0, prob=v), _accepts(_jac_penalty, v)
        assert a == b == _accepts(V.probability, v, "prob"), v
    assert "(0, 1]" in jdeq.jacobian_penalty.__doc__ and "(0, 1]" in jdeq.train.JacReg.__doc__


def test_rule_messages_in_full_and_edge_values():
    """Each rule's message names the argument, says what was expected and shows the value,
    word for word (the forms not covered by the bad-input table)."""
    def message(fn, *args, **kw):
        e = _raises(V.BadValue, fn, *args, **kw)  # (BadType is a BadValue)
        return f"{type(e).__name__}: {e}"

    values = (0.5, 2, float("nan"), float("inf"), False, "1", 1j, np.float32(0.5), np.bool_(True), 10**400)
    assert [V.is_number(v) for v in values] == [True, True, False, False, False, False, False, True, False, False]
    assert message(V.integer, 5, "n", hi=3) == "BadValue: `n` must be an int <= 3, got 5."
    assert message(V.integer, "a", "n") == "BadType: `n` must be an int, got 'a'."
    assert message(V.odd_int, 2.5, "kernel_size") == "BadType: `kernel_size` must be an odd int >= 1, got 2.5."
    assert message(V.odd_int, 4, "kernel_size") == "BadValue: `kernel_size` must be an odd int >= 1, got 4."
    assert message(V.budget, jnp.int32(0), "maxiter") == "BadValue: `maxiter` must be an int >= 1, got Array(0, dtype=int32)."
    assert message(V.number, "x", "x") == "BadType: `x` must be a number, got 'x'."
    assert message(V.number, 10**7, "x", hi=1000000) == "BadValue: `x` must be a number <= 1000000, got 10000000."
    assert V.nonnegative_number(None, "x", none=True) is None
    # a bool matches only a bool, and the later choices are still tried
    assert V.one_of(1, "n", (True, 1)) == 1 and V.one_of(True, "n", (1, True)) is True
    assert V.boolean(np.bool_(True), "throw") is True
    assert message(V.boolean, np.int64(1), "throw") == "BadType: `throw` must be a bool, got np.int64(1)."
    assert message(V.callable_, 3, "f") == "BadType: `f` must be callable, got 3."
    assert message(V.callable_, 3, "f", usage="f(z, args)") == "BadType: `f` must be callable as f(z, args), got 3."
    assert message(V.floating_dtype, 3, "dtype") == "BadType: `dtype` must be a floating dtype, got 3."
    assert message(V.floating_dtype, jnp.int32, "dtype") == "BadType: `dtype` must be a floating dtype, got int32."
    with pytest.raises(V.BadType) as e:  # the error keeps the value given (shown as its dtype)
        V.floating_dtype(jnp.int32, "dtype")
    assert (e.value.name, e.value.expected, e.value.value) == ("dtype", "a floating dtype", jnp.int32)
