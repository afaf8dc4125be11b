"""jdeq: Deep Equilibrium Models in JAX.

A DEQ's output is the fixed point ``z* = f(z*, x)`` of one cell ``f``, found by a root solver
in the forward pass and differentiated with the implicit function theorem in the backward pass,
so training memory does not grow with the effective depth.

The public API is this flat namespace (plus the ``jdeq.nnx``, ``jdeq.linen`` and
``jdeq.models`` subpackages).
"""

from jdeq._fixed_point import fixed_point, unroll
from jdeq._gradients import Implicit, JacobianFree, Phantom, Unrolled
from jdeq._jaxopt import JaxoptSolver
from jdeq._solvers import Anderson, Broyden, FixedPointIteration
from jdeq._stats import Solution, SolverStats
from jdeq import linen, models, nnx  # noqa: E402  (subpackages)

__version__ = "0.1.0"

__all__ = [
    "Anderson",
    "Broyden",
    "FixedPointIteration",
    "Implicit",
    "JacobianFree",
    "JaxoptSolver",
    "Phantom",
    "Solution",
    "SolverStats",
    "Unrolled",
    "fixed_point",
    "linen",
    "models",
    "nnx",
    "unroll",
]
