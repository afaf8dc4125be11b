"""Reading a traced program in tests: every equation of a jaxpr, nested ones included."""

from __future__ import annotations

import jax


def eqns(jaxpr):
    """Every equation of ``jaxpr``, those of its sub-jaxprs (loops, calls, custom rules) included."""
    for e in jaxpr.eqns:
        yield e
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            yield from eqns(sub)
