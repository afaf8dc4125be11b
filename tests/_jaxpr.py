"""Reading a traced program in tests: every equation of a jaxpr, nested ones included."""

from __future__ import annotations


def _sub_jaxprs(value):
    """The jaxprs held by one equation parameter: a jaxpr, a closed jaxpr, or a sequence of them.

    Written out rather than ``jax.extend.core.jaxprs_in_params``, which jax 0.8 (pyproject's floor)
    does not have.
    """
    if hasattr(value, "eqns"):  # a Jaxpr
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):  # a ClosedJaxpr
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def eqns(jaxpr):
    """Every equation of ``jaxpr``, those of its sub-jaxprs (loops, calls, custom rules) included."""
    for e in jaxpr.eqns:
        yield e
        for value in e.params.values():
            for sub in _sub_jaxprs(value):
                yield from eqns(sub)
