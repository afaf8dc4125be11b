"""Bad input gets a clear error at trace time (or construction time), naming the argument."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq

# (numpy: a test module must not start JAX at import, see tests/conftest.py)
Z0 = np.zeros((2, 3), np.float32)
A = np.ones((2, 3), np.float32)


def good(z, a):
    return 0.5 * jnp.tanh(z) + a


def _fp(f=good, z0=Z0, args=A, **kw):
    return jdeq.fixed_point(f, z0, args, **kw)


# ----------------------------------------------------------------------------- f and z0


def test_f_changes_structure():
    with pytest.raises(TypeError, match=r"`f\(z, args\)` must return the pytree structure of `z0`"):
        _fp(lambda z, a: (z, z))


def test_f_changes_dict_keys():
    z0 = {"a": Z0, "b": Z0}
    with pytest.raises(TypeError, match="pytree structure of `z0`"):
        jdeq.fixed_point(lambda t, a: {"a": t["a"], "c": t["b"]}, z0, A)


def test_f_changes_shape():
    with pytest.raises(ValueError, match=r"changed the shape of leaf .*\(2, 3\) -> \(2, 4\)"):
        _fp(lambda z, a: jnp.concatenate([z, z[:, :1]], axis=1))


def test_f_changes_shape_names_the_leaf():
    z0 = {"h": Z0, "c": Z0}
    with pytest.raises(ValueError, match=r"leaf \['c'\]"):
        jdeq.fixed_point(lambda t, a: {"h": t["h"], "c": t["c"][:, :2]}, z0, A)


def test_f_changes_dtype():
    with jax.enable_x64(True):
        with pytest.raises(TypeError, match=r"changed the dtype of leaf .*float32 -> float64"):
            _fp(lambda z, a: z.astype(jnp.float64))


def test_f_not_callable():
    with pytest.raises(TypeError, match="`f` must be callable"):
        _fp(f=3)


def test_z0_integer():
    with pytest.raises(TypeError, match="`z0` must be floating point.*int32"):
        _fp(z0=jnp.zeros((2, 3), jnp.int32), args=jnp.ones((2, 3), jnp.int32), f=lambda z, a: z)


def test_z0_scalar_leaf_missing_batch_axis():
    with pytest.raises(ValueError, match="`z0` needs a leading batch axis.*scalar"):
        _fp(z0=jnp.float32(0.0), args=jnp.float32(1.0))


def test_z0_scalar_leaf_in_a_tree():
    with pytest.raises(ValueError, match=r"`z0` needs a leading batch axis.*\['s'\]"):
        jdeq.fixed_point(lambda t, a: t, {"z": Z0, "s": jnp.float32(0.0)}, A)


def test_z0_leaves_with_different_batch_sizes():
    with pytest.raises(ValueError, match=r"same leading batch axis.*\[2, 3\]"):
        jdeq.fixed_point(lambda t, a: t, {"a": Z0, "b": jnp.zeros((3, 3))}, A)


def test_z0_with_an_empty_batch_or_a_non_array_leaf_in_full():
    with pytest.raises(ValueError) as e:
        jdeq.fixed_point(lambda t, a: t, jnp.zeros((0, 3)), A)
    assert str(e.value) == "`z0` has batch size 0 (leading axis of shape (0, 3)): nothing to solve."
    with pytest.raises(TypeError) as e:
        jdeq.fixed_point(lambda t, a: t, {"z": Z0, "name": "zeros"}, A)
    assert str(e.value) == "`z0` must be a pytree of arrays; leaf ['name'] is a str: 'zeros'."
    with pytest.raises(TypeError) as e:  # one example (batched=False): the same message
        jdeq.fixed_point(lambda t, a: t, {"z": Z0[0], "name": "zeros"}, A[0], batched=False)
    assert str(e.value) == "`z0` must be a pytree of arrays; leaf ['name'] is a str: 'zeros'."


def test_z0_empty():
    with pytest.raises(ValueError, match="`z0` has no array leaves"):
        jdeq.fixed_point(lambda t, a: t, {}, A)


# ----------------------------------------------------------------------------- solver options


SOLVERS = [jdeq.FixedPointIteration, jdeq.Anderson, jdeq.Broyden]


@pytest.mark.parametrize("cls", SOLVERS)
@pytest.mark.parametrize("tol", [0.0, -1e-3])
def test_tol_must_be_positive(cls, tol):
    with pytest.raises(ValueError, match="`tol` must be a number > 0"):
        cls(tol=tol)


@pytest.mark.parametrize("cls", SOLVERS)
@pytest.mark.parametrize("maxiter", [0, -5])
def test_maxiter_at_least_one(cls, maxiter):
    with pytest.raises(ValueError, match="`maxiter` must be an int >= 1"):
        cls(maxiter=maxiter)


@pytest.mark.parametrize("cls", SOLVERS)
def test_maxiter_must_be_int(cls):
    with pytest.raises(TypeError, match="`maxiter` must be an int"):
        cls(maxiter=10.5)


@pytest.mark.parametrize("maxiter", [0, -1])
def test_fixed_point_maxiter_override_at_least_one(maxiter):
    with pytest.raises(ValueError, match="`maxiter` must be an int >= 1"):
        _fp(maxiter=maxiter)


def test_fixed_point_maxiter_override_not_bool_or_fraction():
    with pytest.raises(TypeError, match="`maxiter` must be an int"):
        _fp(maxiter=True)
    with pytest.raises(TypeError, match="`maxiter` must be an int"):
        _fp(maxiter=2.5)


@pytest.mark.parametrize("cls", [jdeq.Anderson, jdeq.Broyden])
@pytest.mark.parametrize("memory", [0, -2])
def test_memory_at_least_one(cls, memory):
    with pytest.raises(ValueError, match="`memory` must be an int >= 1"):
        cls(memory=memory)


@pytest.mark.parametrize("cls", [jdeq.FixedPointIteration, jdeq.Anderson])
@pytest.mark.parametrize("damping", [0.0, 1.5, -0.5])
def test_damping_in_unit_interval(cls, damping):
    with pytest.raises(ValueError, match=r"`damping` must be a number in \(0, 1\]"):
        cls(damping=damping)


def test_anderson_ridge_non_negative():
    with pytest.raises(ValueError, match="`ridge` must be a number >= 0"):
        jdeq.Anderson(ridge=-1e-3)


@pytest.mark.parametrize("cls", SOLVERS)
def test_stop_mode_unknown(cls):
    with pytest.raises(ValueError, match="`stop_mode` must be one of"):
        cls(stop_mode="max")


@pytest.mark.parametrize("cls", SOLVERS)
def test_unknown_solver_option_is_named(cls):
    with pytest.raises(TypeError, match="histroy_size"):
        cls(histroy_size=3)


def test_broyden_has_no_damping():
    with pytest.raises(TypeError, match="damping"):
        jdeq.Broyden(damping=0.5)


def test_solver_options_are_keyword_only():
    with pytest.raises(TypeError):
        jdeq.Anderson(1e-3)


def test_trace_must_be_bool():
    with pytest.raises(TypeError, match="`trace` must be a bool"):
        jdeq.Anderson(trace=1)


# ----------------------------------------------------------------------------- static maxiter


def test_unrolled_with_traced_maxiter():
    run = jax.jit(lambda a, m: _fp(args=a, gradient=jdeq.Unrolled(), maxiter=m).value)
    with pytest.raises(ValueError, match=r"`maxiter` must be a static int with gradient=jdeq.Unrolled"):
        run(A, 5)


def test_trace_with_traced_maxiter():
    run = jax.jit(lambda a, m: _fp(args=a, solver=jdeq.Anderson(trace=True), maxiter=m).value)
    with pytest.raises(ValueError) as e:
        run(A, 5)
    assert str(e.value).startswith(
        "`trace=True` needs a static `maxiter` (the trace has one column per iteration); pass a Python int, "
        "not a traced value.")


def test_unrolled_with_jaxopt_solver():
    import jaxopt

    solver = jdeq.JaxoptSolver(jaxopt.FixedPointIteration, maxiter=5)
    with pytest.raises(ValueError, match="Unrolled.*not supported with JaxoptSolver"):
        _fp(solver=solver, gradient=jdeq.Unrolled())


# ----------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize("solver", ["anderson", jdeq.Implicit(), jdeq.Anderson])
def test_solver_of_wrong_type(solver):
    with pytest.raises(TypeError, match="`solver` must be a jdeq.Solver"):
        _fp(solver=solver)


@pytest.mark.parametrize("gradient", ["implicit", jdeq.Anderson(), jdeq.Implicit, None])
def test_gradient_of_wrong_type(gradient):
    with pytest.raises(TypeError, match="`gradient` must be a jdeq.Gradient"):
        _fp(gradient=gradient)


@pytest.mark.parametrize("steps", [0, -1, 2.5])
def test_phantom_steps(steps):
    with pytest.raises(ValueError, match="`steps` must be an int >= 1"):
        jdeq.Phantom(steps=steps)


@pytest.mark.parametrize("damping", [0.0, 1.5])
def test_phantom_damping(damping):
    with pytest.raises(ValueError, match=r"`damping` must be a number in \(0, 1\]"):
        jdeq.Phantom(damping=damping)


def test_implicit_unknown_backward_solver():
    with pytest.raises(ValueError, match="`solver` must be None, a jdeq solver or one of.*'gmres'"):
        jdeq.Implicit(solver="lu")


def test_implicit_bad_options():
    with pytest.raises(ValueError, match="`tol` must be (None or )?a number > 0"):
        jdeq.Implicit(tol=0.0)
    with pytest.raises(ValueError, match="`maxiter` must be None or an int >= 1"):
        jdeq.Implicit(maxiter=0)
    with pytest.raises(ValueError, match=r"`stop_mode` must be None or one of \('abs', 'rel'\)"):
        jdeq.Implicit(stop_mode="inf")
    with pytest.raises(TypeError, match="`callback` must be None or callable"):
        jdeq.Implicit(callback="print")
    with pytest.raises(TypeError, match="unexpected keyword argument 'damping'"):
        jdeq.Implicit(damping=0.5)


def test_jacobian_free_and_unrolled_take_no_options():
    with pytest.raises(TypeError):
        jdeq.JacobianFree(steps=2)
    with pytest.raises(TypeError):
        jdeq.Unrolled(maxiter=5)


# ----------------------------------------------------------------------------- unroll baseline


def test_unroll_depth_and_stop_mode():
    with pytest.raises(ValueError, match="`depth` must be an int >= 1"):
        jdeq.unroll(good, Z0, A, depth=0)
    with pytest.raises(ValueError, match=r"`stop_mode` must be one of \('abs', 'rel'\)"):
        jdeq.unroll(good, Z0, A, depth=3, stop_mode="max")
    with pytest.raises(ValueError, match="changed the shape"):
        jdeq.unroll(lambda z, a: z[:, :2], Z0, A, depth=3)


# ----------------------------------------------------------------------------- messages in full


def test_tracing_failure_notes_the_call_with_short_shape_descriptions():
    """An error raised while tracing f keeps f's own message and gets a note naming the call and
    the shapes it was given: each tree described in at most 200 characters, cut with "..."."""
    def broken(z, a):
        raise TypeError("f's own message")

    # arrays as dtype[shape], other leaves (here one JAX cannot trace) by their type name
    with pytest.raises(TypeError, match="as an abstract array") as e:
        _fp(good, Z0, {"w": A, "name": "tanh"})
    (note,) = [n for n in e.value.__notes__ if "raised while tracing" in n]
    assert note == ("(raised while tracing `f(z, args)` with z0 float32[2, 3] and args "
                    "{'name': 'str', 'w': 'float32[2, 3]'})")
    big = {f"leaf{i:02d}": jnp.zeros((2, 3)) for i in range(40)}
    with pytest.raises(TypeError, match="f's own message") as e:
        _fp(broken, big)
    (note,) = [n for n in e.value.__notes__ if "raised while tracing" in n]
    described = note.removeprefix("(raised while tracing `f(z, args)` with z0 ").split(" and args ")[0]
    assert len(described) == 200 and described.endswith("...") and described.startswith("{'leaf00': 'float32[2, 3]'")
    # exactly 200 characters: shown in full (7 entries of 25 characters, 6 separators of 2,
    # the braces, and 11 more in the last key)
    exact = {**{f"leaf{i:02d}": jnp.zeros((2, 3)) for i in range(6)}, "leaf06_padded_key": jnp.zeros((2, 3))}
    with pytest.raises(TypeError, match="f's own message") as e:
        _fp(broken, exact)
    (note,) = [n for n in e.value.__notes__ if "raised while tracing" in n]
    described = note.removeprefix("(raised while tracing `f(z, args)` with z0 ").split(" and args ")[0]
    assert len(described) == 200 and described.endswith("'leaf06_padded_key': 'float32[2, 3]'}"), described


def test_throw_message_counts_the_non_finite_examples_and_names_the_first():
    a = jnp.ones((4, 3)).at[2, 0].set(jnp.nan).at[3, 1].set(jnp.inf)
    with pytest.raises(RuntimeError) as e:
        _fp(z0=jnp.zeros((4, 3)), args=a, throw=True)
    assert str(e.value) == (
        "jdeq.fixed_point(throw=True): non-finite residual in 2 of 4 examples (first: example 2): "
        "the solve diverged or f produced NaN/inf (in f(z), an iterate or its residual). The "
        "returned value is each example's lowest-residual finite iterate.")


def test_throw_message_gives_the_worst_residuals_of_the_examples_that_did_not_converge():
    """Example 0 converges (relative residual below tol) with a large absolute residual, example
    1 does not: the message counts one example and quotes example 1's residuals only."""
    f = lambda z, a: a["s"] * z + a["b"]  # noqa: E731
    args = {"s": jnp.array([[0.5], [0.99]]), "b": jnp.array([[1e8] * 3, [1.0] * 3])}
    solver = jdeq.FixedPointIteration(tol=0.2, maxiter=4)
    stats = _fp(f, args=args, solver=solver).stats
    assert stats.converged.tolist() == [True, False] and float(stats.abs_residual[0]) > 1e6
    want = (f"1 of 2 examples did not converge (all values finite); worst abs residual "
            f"{float(stats.abs_residual[1]):.3e}, rel {float(stats.rel_residual[1]):.3e}. Raise `maxiter`")
    with pytest.raises(Exception, match=re.escape(want)):
        _fp(f, args=args, solver=solver, throw=True)


def test_batched_scalar_problems_message_says_how_many():
    with pytest.raises(ValueError, match=r"`z0` has no axis beyond its leading one \(first leaf of shape "
                                         r"\(5,\)\): with batched=True \(the default\) that axis is the batch, "
                                         r"so this would solve 5 separate scalar problems"):
        _fp(z0=jnp.zeros(5), args=jnp.ones(5))
