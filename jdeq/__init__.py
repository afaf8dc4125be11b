"""jdeq: Deep Equilibrium Models in JAX.

A DEQ's output is the fixed point ``z* = f(z*, x)`` of one cell ``f``, found by a root solver
in the forward pass and differentiated with the implicit function theorem in the backward pass,
so training memory does not grow with the effective depth.

The public API is this flat namespace (plus the ``jdeq.nnx``, ``jdeq.linen`` and
``jdeq.models`` subpackages).
"""

from jdeq._correction import correction_loss, correction_weights, fixed_point_states
from jdeq._fixed_point import fixed_point, unroll
from jdeq._gradients import Gradient, Implicit, JacobianFree, Phantom, Unrolled
from jdeq._hypersolver import HyperAnderson, hyper_loss, init_mixer
from jdeq._jaxopt import JaxoptSolver
from jdeq._path_independence import AAScore, aa_score, initial_states
from jdeq._regularizers import jacobian_frobenius, jacobian_penalty, spectral_radius
from jdeq._reversible import Reversible, ReversibleIteration
from jdeq._solvers import Anderson, Broyden, FixedPointIteration, Solver, leaf_field
from jdeq._splitting import (
    ForwardBackward,
    MonotoneProblem,
    PeacemanRachford,
    monotone_fixed_point,
)
from jdeq._stats import Solution, SolverStats
from jdeq import linen, models, nnx  # noqa: E402  (subpackages)

# Loaded on first attribute access (``jdeq.train``, ...), so ``import jdeq`` stays the core and
# the Flax adapters; ``from jdeq import train`` and ``import jdeq.train`` work as usual.
_LAZY_SUBPACKAGES = ("data", "experiments", "train")


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f"jdeq.{name}")  # the import binds it on jdeq too
    raise AttributeError(f"module 'jdeq' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "AAScore",
    "Anderson",
    "Broyden",
    "FixedPointIteration",
    "ForwardBackward",
    "Gradient",
    "HyperAnderson",
    "Implicit",
    "JacobianFree",
    "JaxoptSolver",
    "MonotoneProblem",
    "PeacemanRachford",
    "Phantom",
    "Reversible",
    "ReversibleIteration",
    "Solution",
    "Solver",
    "SolverStats",
    "Unrolled",
    "aa_score",
    "correction_loss",
    "correction_weights",
    "data",
    "experiments",
    "fixed_point",
    "fixed_point_states",
    "hyper_loss",
    "initial_states",
    "init_mixer",
    "jacobian_frobenius",
    "jacobian_penalty",
    "leaf_field",
    "linen",
    "models",
    "monotone_fixed_point",
    "nnx",
    "spectral_radius",
    "train",
    "unroll",
]
