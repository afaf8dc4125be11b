"""One validation layer: every rule on an argument's value is written once, here.

Configs (solver and gradient options, model and data constructors, ``jdeq.train`` options) and
the argparse types of the command lines (:mod:`jdeq.argtypes`) call these functions, so a
config and a CLI reject the same values with the same rule and the same words:
``\\`maxiter\\` must be an int >= 1, got 0.``

Conventions, shared by every rule:

* the message names the argument (in backticks), says what is expected and shows what it got;
* bools are not ints (nor numbers); numpy integers are ints, numpy floats are numbers;
* "a number" is a finite real: NaN and +-inf are rejected;
* a value of the wrong kind (a string for an int, ``2.5`` for an int, a non-callable ...) raises
  :class:`BadType`, which is both a ``TypeError`` and a ``ValueError``; a value of the right kind
  outside the rule (``0`` for an int >= 1, an unknown choice) raises :class:`BadValue`, a
  ``ValueError``. Both carry ``name``, ``expected`` and ``value``;
* each rule returns the value, normalized (``int``/``float``), so ``self.n = positive_int(n, "n")``.

This module imports nothing but the standard library at import time (``import jdeq`` and the
command lines stay lean); the two rules that need JAX (:func:`key`, :func:`floating_dtype`,
and arrays in :func:`budget`) import it when called.

Example:
  >>> from jdeq import _validate as V
  >>> V.positive_int(3, "steps")
  3
  >>> V.positive_int(0, "steps")
  Traceback (most recent call last):
  ...
  jdeq._validate.BadValue: `steps` must be an int >= 1, got 0.
  >>> V.number(0.0, "prob", 0, 1, lo_open=True)
  Traceback (most recent call last):
  ...
  jdeq._validate.BadValue: `prob` must be a number in (0, 1], got 0.0.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

__all__ = [
    "BadType",
    "BadValue",
    "boolean",
    "budget",
    "callable_",
    "fraction",
    "floating_dtype",
    "instance",
    "integer",
    "is_int",
    "is_number",
    "key",
    "nonnegative_int",
    "nonnegative_number",
    "number",
    "odd_int",
    "one_of",
    "positive_int",
    "positive_number",
    "probability",
    "rate",
    "stop_mode",
]

STOP_MODES = ("abs", "rel")


class BadValue(ValueError):
    """A value of the right kind outside its rule (``0`` for an int >= 1, an unknown choice).

    Attributes:
      name: the argument's name; expected: what the rule expects ("an int >= 1"); value: what
        was given.
    """

    def __init__(self, message: str, *, name: str | None = None, expected: str | None = None, value: Any = None):
        super().__init__(message)
        self.name, self.expected, self.value = name, expected, value


class BadType(BadValue, TypeError):
    """A value of the wrong kind (a string or ``2.5`` for an int, a non-callable): a
    ``TypeError``, and a ``ValueError`` too (a bad argument value), so callers catching either
    see it."""


def _fail(cls, name: str, expected: str, value: Any, shown: str | None = None):
    shown = repr(value) if shown is None else shown
    raise cls(f"`{name}` must be {expected}, got {shown}.", name=name, expected=expected, value=value)


def _or_none(expected: str, none: bool) -> str:
    return f"None or {expected}" if none else expected


# ----------------------------------------------------------------------------- predicates


def is_int(value: Any) -> bool:
    """True for a Python or numpy integer; False for a bool (bools are not ints), a float
    (even a whole one), a string or an array.

    >>> import numpy as np
    >>> [is_int(v) for v in (3, np.int64(3), True, 3.0, "3")]
    [True, True, False, False, False]
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for a finite real number (Python or numpy, ints included); False for a bool, NaN,
    +-inf, a complex number, a string or an array.

    >>> [is_number(v) for v in (0.5, 2, float("nan"), float("inf"), False, "1")]
    [True, True, False, False, False, False]
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except (TypeError, ValueError, OverflowError):
        return False


# ----------------------------------------------------------------------------- integers


def _describe_int(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"an int in [{lo}, {hi}]"
    if lo is not None:
        return f"an int >= {lo}"
    if hi is not None:
        return f"an int <= {hi}"
    return "an int"


def integer(value: Any, name: str, lo: int | None = None, hi: int | None = None, *, none: bool = False):
    """An int in ``[lo, hi]`` (either bound optional): returns ``int(value)`` (or None, with
    ``none=True``).

    Args:
      value: what was given; name: the argument's name, for the message.
      lo, hi: inclusive bounds (None: unbounded).
      none: accept None too.

    Raises:
      BadType: not an int (a bool, a float, a string, ...). BadValue: out of bounds.

    >>> integer(20, "num_samples", 20)
    20
    >>> integer(None, "eval_every", 1, none=True) is None
    True
    """
    if none and value is None:
        return None
    expected = _or_none(_describe_int(lo, hi), none)
    if not is_int(value):
        _fail(BadType, name, expected, value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        _fail(BadValue, name, expected, value)
    return int(value)


def positive_int(value: Any, name: str, *, none: bool = False):
    """An int >= 1 (counts: steps, widths, batch sizes, memory, samples). See :func:`integer`.

    >>> positive_int(1, "batch_size")
    1
    """
    return integer(value, name, 1, none=none)


def nonnegative_int(value: Any, name: str, *, none: bool = False):
    """An int >= 0 (seeds, step indices, sizes where 0 is meaningful). See :func:`integer`.

    >>> nonnegative_int(0, "seed")
    0
    """
    return integer(value, name, 0, none=none)


def odd_int(value: Any, name: str) -> int:
    """An odd int >= 1 (a "same"-padded convolution's kernel size).

    >>> odd_int(3, "kernel_size")
    3
    """
    expected = "an odd int >= 1"
    if not is_int(value):
        _fail(BadType, name, expected, value)
    if value < 1 or value % 2 == 0:
        _fail(BadValue, name, expected, value)
    return int(value)


def budget(value: Any, name: str = "maxiter") -> None:
    """A run-time iteration budget: an int >= 1, or an integer scalar array, possibly traced
    (the budget of a compiled function; its value is then unknown and only its dtype and shape
    are checked).

    Raises:
      BadType: a bool, a float, a string, None, or an array that is not an integer scalar.
      BadValue: a concrete value < 1.

    >>> import jax, jax.numpy as jnp
    >>> budget(5); budget(jnp.int32(5)); jax.jit(lambda m: budget(m) or m)(3).item()
    3
    """
    expected = "an int >= 1"
    if is_int(value):
        if value < 1:
            _fail(BadValue, name, expected, value)
        return
    dtype = getattr(value, "dtype", None)
    if dtype is None or isinstance(value, bool):
        _fail(BadType, name, expected, value)
    import numpy as np

    if getattr(value, "shape", None) != () or not np.issubdtype(dtype, np.integer):
        _fail(BadType, name, f"{expected} (a Python int or an integer scalar array)", value)
    import jax

    try:
        concrete = int(value)
    except jax.errors.ConcretizationTypeError:
        return  # traced: checked at run time by the loop (it runs while k < maxiter)
    if concrete < 1:
        _fail(BadValue, name, expected, value)


# ----------------------------------------------------------------------------- real numbers


def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _describe_number(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"a number in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"a number {'>' if lo_open else '>='} {_fmt(lo)}"
    if hi is not None:
        return f"a number {'<' if hi_open else '<='} {_fmt(hi)}"
    return "a number"


def number(
    value: Any,
    name: str,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    none: bool = False,
):
    """A finite real number in the interval from ``lo`` to ``hi`` (open or closed at each end,
    either bound optional): returns ``float(value)`` (or None, with ``none=True``).

    Args:
      value: what was given; name: the argument's name, for the message.
      lo, hi: the bounds (None: unbounded); lo_open, hi_open: exclude the bound itself.
      none: accept None too.

    Raises:
      BadType: not a real number (a bool, a string, a complex, an array, None).
      BadValue: NaN, +-inf, or outside the interval.

    >>> number(0.5, "beta", 0, 1, lo_open=True, hi_open=True)
    0.5
    >>> number(float("nan"), "tol", 0, lo_open=True)
    Traceback (most recent call last):
    ...
    jdeq._validate.BadValue: `tol` must be a number > 0, got nan.
    """
    if none and value is None:
        return None
    expected = _or_none(_describe_number(lo, hi, lo_open, hi_open), none)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        _fail(BadType, name, expected, value)
    if not is_number(value):
        _fail(BadValue, name, expected, value)
    if lo is not None and (value <= lo if lo_open else value < lo):
        _fail(BadValue, name, expected, value)
    if hi is not None and (value >= hi if hi_open else value > hi):
        _fail(BadValue, name, expected, value)
    return float(value)


def positive_number(value: Any, name: str, *, none: bool = False):
    """A finite number > 0 (tolerances, learning rates, scales, monotonicity).

    >>> positive_number(1e-3, "tol")
    0.001
    """
    return number(value, name, 0, lo_open=True, none=none)


def nonnegative_number(value: Any, name: str, *, none: bool = False):
    """A finite number >= 0 (weights of optional terms: 0 switches the term off).

    >>> nonnegative_number(0, "gamma")
    0.0
    """
    return number(value, name, 0, none=none)


def probability(value: Any, name: str) -> float:
    """The probability of doing something on a call or step: a number in (0, 1]. 0 is
    excluded: "never" is an off switch (``gamma=0``, ``jac_reg=None``), not a probability to
    sample with (Bai, Koltun & Kolter, ICML 2021, apply the Jacobian term with such a
    probability per step).

    >>> probability(1, "prob")
    1.0
    """
    return number(value, name, 0, 1, lo_open=True)


def rate(value: Any, name: str) -> float:
    """A dropout rate: a number in [0, 1) (1 would drop everything).

    >>> rate(0.0, "rate")
    0.0
    """
    return number(value, name, 0, 1, hi_open=True)


def fraction(value: Any, name: str) -> float:
    """A split fraction strictly between 0 and 1 (both sides of the split non-empty).

    >>> fraction(0.25, "test_fraction")
    0.25
    """
    return number(value, name, 0, 1, lo_open=True, hi_open=True)


# ----------------------------------------------------------------------------- choices and kinds


def _member(value: Any, choices: Sequence) -> bool:
    for c in choices:
        if isinstance(value, bool) != isinstance(c, bool) or type(value) is str and not isinstance(c, str):
            continue  # True is not the choice 1, "1" is not 1
        try:
            if value == c:
                return True
        except (TypeError, ValueError):  # an array compared elementwise
            continue
    return False


def one_of(value: Any, name: str, choices: Sequence, *, none: bool = False):
    """One of ``choices`` (strings, ints; a bool only matches a bool): returns the value.

    >>> one_of("rademacher", "noise", ("normal", "rademacher"))
    'rademacher'
    >>> one_of(True, "spatial_dims", (1, 2, 3))
    Traceback (most recent call last):
    ...
    jdeq._validate.BadValue: `spatial_dims` must be one of (1, 2, 3), got True.
    """
    if none and value is None:
        return None
    choices = tuple(choices)
    if not _member(value, choices):
        _fail(BadValue, name, _or_none(f"one of {choices}", none), value)
    return value


def stop_mode(value: Any, name: str = "stop_mode", *, none: bool = False):
    """A stopping test: ``"abs"`` (``||f(z) - z||``) or ``"rel"`` (``||f(z) - z|| / ||f(z)||``).

    >>> stop_mode("rel")
    'rel'
    """
    return one_of(value, name, STOP_MODES, none=none)


def boolean(value: Any, name: str) -> bool:
    """A bool (``True``/``False`` or a numpy bool; not 0/1, not a string).

    >>> boolean(False, "throw")
    False
    """
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ == "bool"):  # numpy >= 2
        return bool(value)
    _fail(BadType, name, "a bool", value)


def callable_(value: Any, name: str, *, usage: str | None = None, none: bool = False):
    """A callable (``usage`` shows how it is called, for the message).

    >>> callable_(len, "loss_fn") is len
    True
    >>> callable_("tanh", "activation", usage="activation(x)")
    Traceback (most recent call last):
    ...
    jdeq._validate.BadType: `activation` must be callable as activation(x), got 'tanh'.
    """
    if (none and value is None) or callable(value):
        return value
    _fail(BadType, name, _or_none("callable" + (f" as {usage}" if usage else ""), none), value)


def instance(value: Any, name: str, types, what: str, *, none: bool = False):
    """An instance of ``types``; ``what`` names them for the message ("an nnx.Module").

    >>> instance(3, "layer", str, "a string")
    Traceback (most recent call last):
    ...
    jdeq._validate.BadType: `layer` must be a string, got 3.
    """
    if (none and value is None) or isinstance(value, types):
        return value
    _fail(BadType, name, _or_none(what, none), value)


def key(value: Any, name: str = "key"):
    """A JAX PRNG key: a typed key (``jax.random.key(0)``) or a raw ``uint32[2]`` one
    (``jax.random.PRNGKey(0)``), possibly traced.

    >>> import jax
    >>> _ = key(jax.random.key(0))
    """
    import jax
    import jax.numpy as jnp

    if isinstance(value, jax.Array) and (
        jnp.issubdtype(value.dtype, jax.dtypes.prng_key) or (value.dtype == jnp.uint32 and value.shape == (2,))
    ):
        return value
    _fail(BadType, name, "a JAX PRNG key (jax.random.key(0) or jax.random.PRNGKey(0))", value)


def floating_dtype(value: Any, name: str):
    """A floating dtype (``jnp.float32``, ``"bfloat16"``, ...): returns it as a numpy dtype.

    >>> floating_dtype("float32", "dtype")
    dtype('float32')
    """
    import jax.numpy as jnp

    try:
        dtype = jnp.dtype(value)
    except TypeError:
        _fail(BadType, name, "a floating dtype", value)
    if not jnp.issubdtype(dtype, jnp.floating):
        _fail(BadType, name, "a floating dtype", value, shown=str(dtype))
    return dtype
