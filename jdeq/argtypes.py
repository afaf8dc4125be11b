"""argparse ``type=`` validators shared by the command lines (``jdeq.experiments``, ``benchmarks``,
and yours).

A bad value then stops the command at parse time with argparse's usage error (exit status 2)
naming the option and what it expects, before any data is loaded or anything is compiled.

Example:
  >>> import argparse
  >>> from jdeq.argtypes import positive_int
  >>> p = argparse.ArgumentParser()
  >>> _ = p.add_argument("--steps", type=positive_int, default=10)
  >>> p.parse_args(["--steps", "3"]).steps
  3
"""

from __future__ import annotations

import argparse
import math

__all__ = ["fraction", "nonneg_float", "nonneg_int", "positive_float", "positive_int", "probability", "rate"]


def _number(text: str, kind, expected: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def _checked(kind, ok, expected: str):
    def parse(text: str):
        value = _number(text, kind, expected)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    parse.__name__ = expected  # argparse shows the type's name in some messages
    return parse


positive_int = _checked(int, lambda v: v >= 1, "an int >= 1")
"""An int >= 1 (counts: steps, batch sizes, widths, seeds to run, ...)."""

nonneg_int = _checked(int, lambda v: v >= 0, "an int >= 0")
"""An int >= 0 (a seed, or a count where 0 means "automatic")."""

positive_float = _checked(float, lambda v: v > 0, "a number > 0")
"""A finite number > 0 (tolerances, learning rates, scales)."""

nonneg_float = _checked(float, lambda v: v >= 0, "a number >= 0")
"""A finite number >= 0 (weights of optional terms)."""

probability = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
"""A probability in [0, 1]."""

rate = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
"""A rate in [0, 1) (dropout)."""

fraction = _checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")
"""A fraction strictly between 0 and 1 (a split)."""
