"""argparse ``type=`` validators shared by the command lines (``jdeq.experiments``, ``benchmarks``,
and yours).

A bad value then stops the command at parse time with argparse's usage error (exit status 2)
naming the option and what it expects, before any data is loaded or anything is compiled. Each
type parses the text and calls the rule of :mod:`jdeq._validate` that the configs call, so an
option and the config field it feeds reject the same values with the same words (``--prob`` and
``jdeq.train.JacReg(prob=...)``: "must be a number in (0, 1]").

Example:
  >>> import argparse
  >>> from jdeq.argtypes import positive_int
  >>> p = argparse.ArgumentParser()
  >>> _ = p.add_argument("--steps", type=positive_int, default=10)
  >>> p.parse_args(["--steps", "3"]).steps
  3
  >>> positive_int("0")
  Traceback (most recent call last):
  ...
  argparse.ArgumentTypeError: must be an int >= 1, got '0'
"""

from __future__ import annotations

import argparse
from typing import Callable

from jdeq import _validate as V

__all__ = ["fraction", "nonneg_float", "nonneg_int", "positive_float", "positive_int", "probability", "rate"]


def _argtype(kind: type, rule: Callable) -> Callable[[str], object]:
    """The argparse type that parses the text as ``kind`` and checks it with ``rule`` (a
    :mod:`jdeq._validate` rule); text that does not parse is handed to the rule as is, so the
    message says what the rule expects."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = text  # the rule rejects it as the wrong kind, with its own words
        try:
            return rule(value, "value")
        except ValueError as e:  # BadValue / BadType
            raise argparse.ArgumentTypeError(f"must be {e.expected}, got {text!r}") from None

    parse.__name__ = rule.__name__  # argparse shows the type's name in some messages
    return parse


positive_int = _argtype(int, V.positive_int)
"""An int >= 1 (counts: steps, batch sizes, widths, seeds to run, ...)."""

nonneg_int = _argtype(int, V.nonnegative_int)
"""An int >= 0 (a seed, or a count where 0 means "automatic")."""

positive_float = _argtype(float, V.positive_number)
"""A finite number > 0 (tolerances, learning rates, scales)."""

nonneg_float = _argtype(float, V.nonnegative_number)
"""A finite number >= 0 (weights of optional terms)."""

probability = _argtype(float, V.probability)
"""A probability of doing something per step, in (0, 1] (``jdeq.train.JacReg``'s ``prob``)."""

rate = _argtype(float, V.rate)
"""A rate in [0, 1) (dropout)."""

fraction = _argtype(float, V.fraction)
"""A fraction strictly between 0 and 1 (a split)."""
