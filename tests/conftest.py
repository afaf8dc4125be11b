"""Shared fixtures: float64 on request, a few Adam steps on a classifier, results computed once
per test run (shared by the xdist workers)."""

import json
import os
import pickle
import sys

import jax
import optax
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (also when loaded by path: test_once)
import _strict_nan  # noqa: E402

# a comparison of two NaNs fails (tests/_strict_nan.py): no test passes on NaN alone
_strict_nan.install()


def pytest_configure(config):
    """Under mutation testing (``make mutation``, ``.ci/mutation.py``), each mutant's test run is
    forked from a server that collected the tests; that is sound only if nothing there started
    JAX's backend (XLA's threads would be forked, and compiled unmutated code reused)."""
    if "__mutmut_" in os.environ.get("MUTANT_UNDER_TEST", ""):  # a mutant's run, not mutmut's own
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            raise pytest.UsageError("JAX's backend was started before this mutant's tests ran (a test module "
                                    "computes at import?): the mutant could reuse unmutated compiled code")
        jax.clear_caches()


def _durations_file() -> str | None:
    """Where mutation testing keeps the unmutated run's test durations: ``JDEQ_TEST_DURATIONS``
    (``.ci/mutation.py --sample``) or mutmut's own stats (its runs start in its mutated copy)."""
    return os.environ.get("JDEQ_TEST_DURATIONS") or ("mutmut-stats.json" if os.path.isfile("mutmut-stats.json") else None)


def _mutant_run() -> bool:
    return "__mutmut_" in os.environ.get("MUTANT_UNDER_TEST", "")


def pytest_collection_modifyitems(config, items):
    """Under mutation testing, a mutant's tests run shortest first (durations of the unmutated
    run): a mutant stops at its first failing test (``-x``), so a cheap test that catches it
    saves running the expensive ones (the verdicts do not change)."""
    path = _durations_file()
    if _mutant_run() and path and os.path.isfile(path):
        with open(path) as fh:
            data = json.load(fh)
        seconds = data.get("duration_by_test", data)  # mutmut's stats, or {node id: seconds}
        items.sort(key=lambda item: seconds.get(item.nodeid, float("inf")))


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs_when_mappings_run_low():
    """Drops JAX's compiled programs after a test module once this process holds over 30,000
    memory mappings. One xdist worker runs hundreds of modules; every XLA:CPU executable it keeps
    holds about 3 mappings (300 small programs: 433 -> 1401 lines of /proc/self/maps), and a
    worker that reached the kernel's limit (vm.max_map_count, 65530 here) died of a segfault
    inside XLA's compiler late in the run. Clearing after every module instead cost much
    recompilation. (Linux only: elsewhere there is no /proc/self/maps to count.)"""
    yield
    try:
        with open("/proc/self/maps") as fh:
            mappings = sum(1 for _ in fh)
    except OSError:
        return
    if mappings > 30_000:
        jax.clear_caches()


@pytest.fixture(autouse=True)
def _trace_afresh_for_mutmut_stats():
    """mutmut maps each function to the tests that call it (its "stats" run) and later runs a
    mutant against those tests only. A test that reuses a program JAX compiled for an earlier
    test (a jitted helper with the same static arguments and shapes) never calls the traced
    Python functions, so it would be left out of the map and never face their mutants: in that
    run, every test traces afresh."""
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        jax.clear_caches()
    yield


_DURATIONS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    if os.environ.get("JDEQ_TEST_DURATIONS") and not _mutant_run():  # the unmutated run records them
        _DURATIONS[report.nodeid] = _DURATIONS.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    path = os.environ.get("JDEQ_TEST_DURATIONS")
    if path and not _mutant_run() and _DURATIONS:
        with open(path, "w") as fh:
            json.dump(_DURATIONS, fh)


@pytest.fixture(scope="module")
def vec_data():
    """96 vectors of 4 features labelled by a random linear map into 3 classes (float32)."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4)).astype(np.float32)
    return {"inputs": x, "labels": np.argmax(x @ rng.normal(size=(4, 3)), -1)}


@pytest.fixture
def x64():
    """Runs the test with float64 enabled (restored afterwards)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def adam_losses():
    """``adam_losses(model, x, y, steps, lr=1e-2)``: the cross-entropy loss at each of ``steps``
    jitted Adam steps on one batch (the model returns ``(logits, stats)``); trains ``model``."""

    def run(model, x, y, steps, lr=1e-2):
        opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

        @nnx.jit
        def step(model, opt):
            def loss_fn(model):
                logits, _ = model(x)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            opt.update(model, grads)
            return loss

        return [float(step(model, opt)) for _ in range(steps)]

    return run


@pytest.fixture(scope="session")
def once(tmp_path_factory):
    """``once(name, compute)``: ``compute()``'s value, computed by one process of this test run.

    For the expensive subprocess checks (8 simulated devices, two ``jax.distributed`` processes):
    under pytest-xdist every worker that draws one of their tests would otherwise run them again.
    The first caller computes and pickles the value into the run's shared temporary directory
    (the parent of the workers' own ones) under a file lock; the others wait for it and read it.
    A failure is shared too: the other workers fail with its message instead of repeating it.
    (``--dist loadgroup`` with ``xdist_group`` marks would pin such tests to one worker, but
    pytest 9.2 ignores the node-id suffix that xdist 3.8 relies on: pytest-xdist issue #1386.)
    """
    from filelock import FileLock  # the floors job's venv does not need it

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by every worker of this run
    memo = {}

    def get(name, compute):
        if name in memo:
            return memo[name]
        path = root / f"once-{name}.pkl"
        with FileLock(f"{path}.lock"):
            if path.exists():
                ok, value = pickle.loads(path.read_bytes())
                if not ok:
                    pytest.fail(f"{name} failed in another xdist worker:\n{value}")
            else:
                try:
                    value = compute()
                except BaseException as e:
                    path.write_bytes(pickle.dumps((False, f"{type(e).__name__}: {e}")))
                    raise
                path.write_bytes(pickle.dumps((True, value)))
        memo[name] = value
        return value

    return get
