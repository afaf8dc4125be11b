"""Mutation testing of jdeq (``make mutation``; not part of ``make test``).

mutmut (3.x) plants one small change at a time (a flipped comparison, a dropped argument, a
changed constant) in a module and runs that module's tests against it; a mutant that leaves
every test green "survived": a behaviour nobody checks. This script runs mutmut once per
covered module, each in its own copy of the working tree under ``.cache/mutation/`` with the
module's own test selection (``MODULES`` below), so a module's mutants run only the tests
meant for it; mutmut narrows further to the tests that executed the mutated function.

JAX note: mutmut's default ``fork`` isolation forks every mutant from a process that has
already run the tests, so every jitted function is compiled and cached there unmutated, and a
mutant inside a traced function is never traced: it "survives" whatever the tests say. This
script configures the ``forkserver`` isolation: each mutant is forked from a server that has
only collected the tests (imported jax, flax, jdeq and the test modules) and computed nothing,
so every mutant traces and compiles afresh. Collecting first halves the time per mutant against
no warm-up at all (31 vs 62 mutants of ``_checksum.py`` in the same 7 minutes, side by side,
same verdicts on the mutants both reached). ``tests/conftest.py`` guards the premise: a mutant
run fails if JAX's backend was already started in the server (a test module computing at
import), since then XLA's threads would be forked and compiled code reused.

Two more JAX pitfalls, handled in ``tests/conftest.py``: mutmut runs a mutant only against the
tests its "stats" run saw calling the mutated function, and a test that reuses a program JAX
compiled for an earlier test never calls the traced Python code (18 of the 93 selected tests
were missing from ``_loop.run_loop``'s map), so the stats run clears JAX's caches before each
test. And a mutant's tests run shortest first, so a cheap test that catches it stops the run.

Two modes. *Complete* (default): every mutant, through ``mutmut run`` (hours per core
module; ``--resume`` goes on after a stopped run). *Sampled* (``--sample K``, ``make
mutation``): K mutants per module drawn at random with a fixed seed, run by this script
against the module's whole selection; the score is an estimate with its 95% interval, and
every covered module fits in about an hour. ``--recheck-only`` reruns the survivors of the
last run against the current tests.

Results go to ``docs/mutation.md`` (score per module, every surviving mutant as a diff, the
equivalent mutants with their reasons) and ``docs/mutation.json``. A module not run this time
keeps its last recorded results (with the commit they were measured at). Equivalent mutants
(no observable behaviour changes) are listed with the reason and their diff in
``.ci/mutation_equivalent.toml`` (an entry holds only while the mutant of that name has that diff)
and are left out of the score: ``killed / (mutants - equivalent)``.

Usage::

    python .ci/mutation.py --sample 10           # every module in MODULES, 10 mutants each
    python .ci/mutation.py                       # every mutant of every module (hours)
    python .ci/mutation.py jdeq/train/_checksum.py --max-children 2
    python .ci/mutation.py jdeq/_loop.py --resume  # go on after a stopped run
    python .ci/mutation.py jdeq/_loop.py --recheck-only  # the survivors, with today's tests
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "mutation"
DOC_MD = ROOT / "docs" / "mutation.md"
DOC_JSON = ROOT / "docs" / "mutation.json"
EQUIVALENT = ROOT / ".ci" / "mutation_equivalent.toml"

# module -> the tests that hold its promises (pytest node ids or files; "-k" expressions allowed
# as a trailing ["-k", "expr"]). Keep each selection fast: every mutant runs (part of) it.
MODULES: dict[str, list[str]] = {
    "jdeq/train/_checksum.py": [
        "tests/test_train.py::test_split_array_checksum_depends_on_values_and_positions",
        "tests/test_promises.py", "-k", "checksum or crc32 or hash32",
    ],
    "jdeq/_cells.py": [
        "tests/test_protocols.py", "tests/test_divergence.py", "tests/test_flax.py", "-k", "nan or nonfinite or init_z",
    ],
    # the shared per-example loop: residuals, freezing, best iterate, budgets, stop rules, vmap rule
    "jdeq/_loop.py": [
        "tests/test_solvers.py", "tests/test_stop_fraction.py", "tests/test_divergence.py",
        "tests/test_vmap.py", "-k", "not scan and not nnx and not fit and not resume",
    ],
    # fixed_point / unroll: argument checks and their messages (docs/errors.md holds every
    # message of the bad-input table in full), throw=True, batched=False, stats
    "jdeq/_fixed_point.py": [
        "tests/test_errors.py", "tests/test_promises_core.py", "tests/test_divergence.py",
        "tests/test_bad_input.py", "tests/test_solvers.py", "tests/test_promises.py",
        # batched=False: one example per call, with and without jax.vmap
        "tests/test_vmap.py::test_unbatched_single_example_without_vmap_and_scalar_state",
        "tests/test_vmap.py::test_the_reported_bug_vmap_of_1d_state_was_d_scalar_problems",
        "-k", "not test_bad_input or fixed_point or unroll or errors_md",
    ],
    # the solvers' numerics: Picard damping, Anderson (weights, ring buffer, ridge), Broyden
    "jdeq/_solvers.py": [
        "tests/test_solvers.py", "tests/test_promises_core.py", "tests/test_errors.py",
        "tests/test_shine.py", "tests/test_promises.py",
        "-k", "not fit and not checksum and not crc32 and not hash32 and not resume and not dropout",
    ],
    # the gradient modes: implicit (and SHINE), phantom, Jacobian-free, unrolled; their backward
    "jdeq/_gradients.py": [
        "tests/test_gradients.py", "tests/test_promises_core.py", "tests/test_shine.py", "tests/test_divergence.py",
        "tests/test_bad_input.py",  # (its 200-odd cases take ~15 s: the gradient modes' messages)
        # a static-budget forward solver (jaxopt's Broyden): the run-time budget reaches the backward
        "tests/test_jaxopt_solver.py::test_run_time_maxiter_bounds_the_backward_of_a_static_budget_solver",
    ],
    # pytree <-> (batch, dim) rows, dtypes and batch checks
    "jdeq/_flatten.py": ["tests/test_solvers.py", "tests/test_errors.py", "tests/test_protocols.py",
        "tests/test_bad_input.py::test_docs_errors_md_is_current"],
    # the Solver and Gradient base classes: options, validation, the shared solve
    "jdeq/_protocols.py": [
        "tests/test_protocols.py", "tests/test_errors.py", "tests/test_solvers.py", "tests/test_promises_core.py",
        "tests/test_bad_input.py::test_docs_errors_md_is_current",
    ],
    "jdeq/_jaxopt.py": ["tests/test_jaxopt_solver.py", "tests/test_bad_input.py", "-k", "jaxopt or Jaxopt or errors_md"],
    "jdeq/_reversible.py": ["tests/test_reversible.py", "tests/test_promises_core.py", "tests/test_bad_input.py",
                            "-k", "reversible or errors_md"],
    "jdeq/_correction.py": ["tests/test_correction.py", "tests/test_promises_core.py", "tests/test_bad_input.py",
                            "-k", "correction or states or errors_md"],
    "jdeq/_regularizers.py": ["tests/test_regularizers.py", "tests/test_promises_core.py", "tests/test_bad_input.py",
                              "-k", "jacobian or regulariz or spectral"],
    "jdeq/_hypersolver.py": ["tests/test_hypersolver.py", "tests/test_promises_core.py", "tests/test_bad_input.py",
                             "-k", "hyper or errors_md"],
    "jdeq/_splitting.py": ["tests/test_mondeq.py", "tests/test_promises_core.py", "-k", "mondeq or forward_backward or peaceman"],
    "jdeq/_path_independence.py": ["tests/test_path_independence.py"],
    # (not test_import_is_stdlib_only: mutmut's trampolines import more than the standard library)
    "jdeq/_validate.py": ["tests/test_validate.py", "tests/test_errors.py",
        "tests/test_bad_input.py::test_docs_errors_md_is_current", "-k", "not stdlib_only"],
    # the Flax adapters
    "jdeq/nnx.py": ["tests/test_flax.py", "tests/test_promises_flax.py", "tests/test_norm_dropout.py",
                    "tests/test_promises.py", "tests/test_warm_start.py", "tests/test_hypersolver.py",
                    "tests/test_regularizers.py", "tests/test_train.py",
                    # the non-finite input guard, per example (the layer's batch; batched=False)
                    "tests/test_protocols.py::test_nan_guard_reads_every_input_leaf_and_reports_nan_residuals",
                    "tests/test_protocols.py::test_nan_guard_of_a_per_example_layer_under_vmap",
                    # DEQ.solver_loss: the learned solver trained through the layer
                    "tests/test_protocols.py::test_hyper_anderson_trains_as_layer_state",
                    # DEQ.unrolled_depth (unrolled pre-training), per-example layers too
                    "tests/test_pretrain.py",
                    # the bad-input table's rows for jdeq.nnx (messages naming the argument)
                    "tests/test_bad_input.py",
                    "-k", "not linen and not checksum and not crc32 and not hash32 and not data_mesh "
                          "and not import and not resume and not errors_md "
                          "and (not test_bad_input[ or test_bad_input[jdeq.nnx)"],
    "jdeq/linen.py": ["tests/test_flax.py", "tests/test_promises_flax.py", "tests/test_promises.py",
                      "tests/test_protocols.py", "tests/test_norm_dropout.py", "tests/test_bad_input.py",
                      "-k", "linen or jacobian_penalty"],
    # the training loop
    "jdeq/train/step.py": ["tests/test_train.py", "tests/test_promises_train.py", "tests/test_warm_start.py",
                           "tests/test_bad_input.py::test_docs_errors_md_is_current",
                           "-k", "step or jac_reg or skip or errors_md"],
    "jdeq/train/loop.py": ["tests/test_train.py", "tests/test_promises_train.py", "tests/test_resume.py",
                           "tests/test_warm_start.py::test_bad_input_names_the_argument",
                           "tests/test_pretrain.py",  # fit(pretrain=...): its phases, resume, mesh branch
                           # a resume carries the model's other state (dropout's RNG counters, a
                           # warm-start cache indexed from 0) and the skip counts
                           "tests/test_promises.py::test_resume_with_dropout_equals_uninterrupted",
                           "tests/test_warm_start.py::test_resume_equals_uninterrupted_with_cache",
                           "tests/test_divergence.py::test_skip_counts_survive_a_resume",
                           # the bad-input table's rows for jdeq.train (fit's checks, in full)
                           "tests/test_bad_input.py",
                           "-k", "not checksum and not import and not errors_md "
                                 "and (not test_bad_input[ or test_bad_input[jdeq.train)"],
    # meshes, layouts and per-host data: the rules run in process (abstract meshes, one device
    # repeated); the 8-device subprocess is left to RECHECK
    "jdeq/train/sharding.py": ["tests/test_sharding.py", "tests/test_train.py", "tests/test_bad_input.py",
                               "-k", "not on_8_devices and not collectives_per_solver_iteration "
                                     "and (not test_bad_input[ or test_bad_input[jdeq.train)"],
    "jdeq/train/checkpoint.py": ["tests/test_train.py", "tests/test_promises_train.py", "tests/test_resume.py",
                                 "-k", "checkpoint or resume"],
    "jdeq/train/evaluation.py": ["tests/test_train.py", "tests/test_promises_train.py", "tests/test_bad_input.py",
                                 "-k", "predict or evaluate or smoke"],
    "jdeq/train/losses.py": ["tests/test_train.py", "tests/test_promises_train.py", "tests/test_correction.py",
                             "tests/test_bad_input.py",
                             # the losses' own rows and fit's (which calls classification_loss)
                             "-k", "(loss or smoke) or test_bad_input[jdeq.train"],
    "jdeq/train/batches.py": ["tests/test_train.py", "tests/test_promises_train.py", "tests/test_bad_input.py",
                              "-k", "batch or epoch or smoke or data_size or run_options"],
    # unrolled pre-training: the phase's graph, the step it ends at, its checks
    "jdeq/train/pretrain.py": ["tests/test_pretrain.py", "tests/test_bad_input.py", "-k", "pretrain or Pretrain or errors_md"],
    # fit's Jacobian penalty option (JacReg): gamma, probability, probes, its checks
    "jdeq/train/jacobian.py": ["tests/test_train.py", "tests/test_promises_train.py", "tests/test_bad_input.py",
                               "-k", "jac or JacReg or errors_md"],
    # the amortized warm-start cache's gather and scatter (FixedPointCache's core)
    "jdeq/_warm_start.py": ["tests/test_warm_start.py", "tests/test_bad_input.py",
                            # (test_bad_input[...]: the table's rows; test_bad_input_names_the_argument is this file's own)
                            "-k", "not data_mesh and (not test_bad_input[ or cache or Cache or errors_md)"],
}
# Survivors in the listed functions are run again against more tests (module -> (functions,
# tests)); a failure there kills them. For tests that exercise a function only in subprocesses
# (two ``jax.distributed`` processes, 8 simulated devices): mutmut cannot see those calls, so it
# never runs them for the function's mutants. And for options of a shared function that only a
# few callers use (the loop's snapshots and kept solver state): their tests run for its
# survivors only, instead of for every mutant of it.
RECHECK: dict[str, list[tuple[tuple[str, ...], list[str]]]] = {
    "jdeq/train/_checksum.py": [(("_device_hashes", "_readable", "mismatch"),
                                ["tests/test_multiprocess.py", "tests/test_sharding.py"])],
    # snapshots (jdeq.correction_states) and the kept solver state (SHINE) through the vmap rule
    # and the unrolled loop's length (the Unrolled gradient's forward: test_gradients); the tie
    # rule's test, for runs whose tests predate it (a resumed run: mutmut never selects it)
    "jdeq/_loop.py": [(("run_loop", "solve_rows", "_rows_call"),
                       ["tests/test_correction.py", "tests/test_shine.py",
                        "tests/test_gradients.py::test_unrolled_equals_autodiff_of_the_handwritten_loop",
                        "tests/test_solvers.py::test_lowest_residual_ties_keep_the_first_iterate"]),
                      # the stop test's boolean all-reduce under a data mesh (8 devices, in a subprocess)
                      (("keep_going",), ["tests/test_sharding.py::test_on_8_devices"])],
    # TrainState.shardings, evaluate/predict on a mesh: only sharded runs (8 simulated devices,
    # in a subprocess) take those paths
    "jdeq/train/step.py": [(("shardings",), ["tests/test_sharding.py"])],
    "jdeq/train/evaluation.py": [(("evaluate", "predict", "_place_state"), ["tests/test_sharding.py"])],
    # fit's checks of a batch split over processes: only the two-process run takes that path
    "jdeq/train/loop.py": [(("_check_fit_args", "fit"), ["tests/test_multiprocess.py", "tests/test_sharding.py"])],
    "jdeq/train/checkpoint.py": [(("_agree", "_sync", "_read", "_quarantine"), ["tests/test_multiprocess.py"])],
    # host_value of an array split over processes (and, on 8 devices, of one split over this
    # process's devices: evaluate's outputs), shard_batch's and check_mesh's process count
    "jdeq/train/sharding.py": [(("host_value", "shard_batch", "check_mesh"),
                               ["tests/test_multiprocess.py", "tests/test_sharding.py::test_on_8_devices"])],
    # layouts under Explicit mesh axes: only the 8-device subprocess sees them (last: the
    # groups before it are quick). Before it, tests newer than the complete run (151a0e6) for
    # its survivors: the inverse estimate of a partial history and its ridge, the precision of
    # HyperAnderson's history products (anderson_mix), Broyden's skipped updates
    "jdeq/_solvers.py": [(("anderson_inverse_estimate",), ["tests/test_shine.py", "-k", "partial_history or ridge_is_relative"]),
                         (("anderson_mix",), ["tests/test_solvers.py", "-k", "hyper_anderson_history"]),
                         (("update",), ["tests/test_solvers.py", "-k", "denominator_is_not_above"]),
                         (("explicit_sharding", "row_sharding", "zeros_history", "zeros_rows", "anderson_record", "_row_dot",
                          "update"),
                         ["tests/test_explicit_sharding.py"])],
    "jdeq/_gradients.py": [(("linear_solve",), ["tests/test_explicit_sharding.py"])],
    # leaf_field runs at import (class bodies): the forkserver imported jdeq and the tests before
    # any mutant was chosen, so only a fresh process sees its mutants. Gradient.solve's run-time
    # budget and forward stats reach the backward: their tests live with the gradient modes
    "jdeq/_protocols.py": [(("leaf_field",),
                            # (a file and -k, not a node id: a mutant that breaks the test
                            # module's class definitions fails its collection, exit 2, not 4)
                            ["tests/test_protocols.py", "-k", "leaf_field_is_a_trainable_leaf"]),
                           (("solve",),
                            ["tests/test_promises.py::test_runtime_maxiter_override_reaches_the_implicit_backward",
                             "tests/test_gradients.py::test_an_example_the_solver_flags_non_finite_adds_nothing_whatever_the_flags_dtype",
                             "tests/test_protocols.py::test_solver_solve_unrolled_returns_the_snapshots_and_state_the_loop_returns"]),
                           (("check_maxiter",), ["tests/test_protocols.py::test_a_bad_eval_maxiter_is_refused_by_name"]),
                           (("inverse_estimate",), ["tests/test_protocols.py::test_a_solver_without_an_inverse_estimate_says_so"])],
    # tests newer than the complete run of jdeq/nnx.py (3138f86) for its survivors: the cache's
    # default dtype and bad shapes, the layer's jacobian_penalty options, z0 of solver_loss and
    # of Unrolled
    "jdeq/nnx.py": [(("__init__", "check"), ["tests/test_warm_start.py", "-k", "bad_input_names or float32_by_default"]),
                    (("jacobian_penalty", "solver_loss", "__call__"),
                     ["tests/test_promises_flax.py", "-k", "given_z0 or nnx_jacobian_penalty"])],
    # the warm-start cache's gathers and scatters under Explicit axes (4 devices, in a subprocess)
    "jdeq/_warm_start.py": [(("_gather", "_scatter"),
                            ["tests/test_warm_start.py::test_data_mesh_equals_one_device"])],
}
# pytest's exit code 2 under -x, when the unmutated selection passes: the mutant broke the test
# modules' import (an error during collection), which is a failure the tests report
COLLECTION = "killed (the tests could not be collected)"
KILLED = {"killed", "timeout", "segfault", "caught by type check", "killed by a recheck", COLLECTION}
# mutmut reports a mutant whose test run raised (its runner gives exit code -1, i.e. 255) as
# "timeout". That is no verdict: pytest could not run the tests at all, e.g. exit code 4 when
# tests/conftest.py refuses a forked run in which a test module started JAX's backend at import.
NOT_RUN = "not run (pytest failed to start: mutmut exit code 255)"
# mutants a recheck may answer: survivors, and mutants of functions that no selected test ran
# in-process ("no tests": e.g. a function only a subprocess calls). A "no tests" mutant left
# alive by the recheck counts as survived; one not rechecked stays unchecked (not killed).
UNANSWERED = ("survived", "no tests")


def tracked_files() -> list[str]:
    """The files of the working tree that git would commit (tracked or new, not ignored)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         check=True, capture_output=True).stdout
    return [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]


def _workdir(module: str, sampled: bool = False) -> Path:
    """The module's copy of the tree (a sampled run has its own, so a stopped complete run
    can still be resumed)."""
    return WORK / ("sample" if sampled else "") / re.sub(r"[^A-Za-z0-9]+", "_", module).strip("_")


def prepare(module: str, tests: list[str], sampled: bool = False) -> Path:
    """A fresh copy of the working tree for ``module``, with its [tool.mutmut] section."""
    work = _workdir(module, sampled)
    if work.exists():
        shutil.rmtree(work)
    for f in tracked_files():
        dst = work / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst)
    pyproject = (work / "pyproject.toml").read_text()
    pyproject = re.sub(r"\n\[tool\.mutmut\][^\[]*", "\n", pyproject)
    section = {
        "source_paths": ["jdeq/"],
        "only_mutate": [module],
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-x", "-q"],
        # tests/test_bad_input.py compares docs/errors.md with the messages, benchmarks/ included
        "also_copy": ["docs/", "benchmarks/"],
        "process_isolation": "forkserver",
        "forkserver_warmup": "collect",
    }
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in section.items()]
    (work / "pyproject.toml").write_text(pyproject.rstrip() + "\n" + "\n".join(lines) + "\n")
    return work


def _env(**extra: str) -> dict[str, str]:
    """This process's environment, compiling cheaply as `make test` does (without LLVM
    optimization, with XLA:CPU's elemental emitters: see the Makefile; values differ only in
    rounding)."""
    flags = f"--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false {os.environ.get('XLA_FLAGS', '')}".strip()
    return {**os.environ, "XLA_FLAGS": flags, **extra}


def _run_group(cmd: list[str], cwd: Path, env: dict, timeout: float | None) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``cmd`` run in its own process group; past ``timeout``
    the whole group (forkservers, pytest's subprocesses) is killed and TimeoutExpired raised."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, out, err


def mutmut(work: Path, *args: str, timeout: float | None = None) -> str:
    """Runs ``python -m mutmut *args`` in ``work`` (see :func:`_run_group` for ``timeout``)."""
    code, out, err = _run_group([sys.executable, "-m", "mutmut", *args], work, _env(), timeout)
    if code not in (0, 1):
        raise RuntimeError(f"mutmut {' '.join(args)} failed ({code}):\n{out[-3000:]}\n{err[-3000:]}")
    return out


def _pytest_cmd(tests: list[str]) -> list[str]:
    """pytest on ``tests``, stopping at the first failure (a mutant's verdict needs no more)."""
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]


def _current_tests(work: Path) -> None:
    """Today's tests in a mutated copy (tests are never mutated), and the table of error
    messages that tests/test_bad_input.py holds each row to."""
    for tree in (work, work / "mutants"):  # (mutmut run copies the first into the second)
        shutil.copytree(ROOT / "tests", tree / "tests", dirs_exist_ok=True)
        shutil.copy2(ROOT / "docs" / "errors.md", tree / "docs" / "errors.md")


def run_module(module: str, tests: list[str], max_children: int, timeout: float, resume: bool = False,
               equivalent: dict | None = None, previous: dict | None = None) -> dict:
    """mutmut on a fresh copy of the tree; with ``resume``, on the last run's copy, where mutmut
    keeps every verdict it reached and runs only the mutants without one (a stopped run goes on).
    Survivors listed in ``equivalent`` (with their diff) are not rechecked, nor, on a resumed
    run, those ``previous`` (the recorded result of the same copy) records killed by a recheck."""
    work = _workdir(module)
    run_file = work / "jdeq-run.json"  # the commit the copy was made from and the seconds spent on it
    if resume and run_file.exists():
        run = json.loads(run_file.read_text())
        if run["tests"] != tests:
            raise RuntimeError(f"{module}: the test selection changed since the last run; run it afresh")
        _current_tests(work)  # the mutants not yet run, and the rechecks, meet today's tests
        run["resumed_with_tests"] = _commit()
    else:
        prepare(module, tests)
        run = {"commit": _commit(), "seconds": 0, "tests": tests}
        run_file.write_text(json.dumps(run))
    start = time.perf_counter()
    try:
        out = mutmut(work, "run", "--max-children", str(max_children), timeout=timeout)
        if "failed to collect stats" in out:  # the selection fails on the unmutated tree
            raise RuntimeError(f"{module}: its tests fail without any mutant; run them in {work / 'mutants'}")
    except subprocess.TimeoutExpired:
        print(f"{module}: stopped after {timeout:.0f} s; unchecked mutants are reported as such "
              "(--resume goes on)", flush=True)
    run["seconds"] += round(time.perf_counter() - start)
    run_file.write_text(json.dumps(run))
    status = {}
    for line in mutmut(work, "results", "--all", "true").splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m:
            status[m.group(1)] = m.group(2).strip()
    status.update(not_run(work))
    diffs = {name: _diff(mutmut(work, "show", name)) for name, s in status.items() if s in UNANSWERED}
    if resume and previous and previous.get("commit") == run["commit"]:  # verdicts reached on this copy
        status.update({n: st for n, st in previous["status"].items() if st == "killed by a recheck"})
    if module in RECHECK:
        listed = equivalents({"status": {n: "survived" for n in diffs}, "survivors": diffs}, equivalent or {})
        todo = [n for n, st in status.items() if st in UNANSWERED and n not in listed]
        status.update(recheck(work, todo, RECHECK[module]))
    diffs = {name: diffs.get(name) or _diff(mutmut(work, "show", name)) for name, s in status.items() if s == "survived"}
    out = {"module": module, "tests": tests, "seconds": run["seconds"], "status": status, "survivors": diffs,
           "commit": run["commit"], "recheck": RECHECK.get(module)}
    return {**out, "resumed_with_tests": run["resumed_with_tests"]} if run.get("resumed_with_tests") else out


def not_run(work: Path) -> dict[str, str]:
    """The mutants of the copy ``work`` whose tests never ran (exit code 255, see NOT_RUN)."""
    out = {}
    for meta in (work / "mutants").rglob("*.py.meta"):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        out.update({name: NOT_RUN for name, code in codes.items() if code == 255})
    return out


def _pytest(work: Path, tests: list[str], mutant: str) -> int:
    return _run_group(_pytest_cmd(tests), work / "mutants", _env(MUTANT_UNDER_TEST=mutant), None)[0]


def recheck(work: Path, names: list[str], groups: list[tuple[tuple[str, ...] | None, list[str]]]) -> dict:
    """Runs each group's tests once per mutant of ``names`` in the group's functions (None: any
    function), in mutmut's mutated tree with the mutant switched on through the environment
    (which subprocesses inherit); a failure kills it."""
    def in_group(name, functions):  # mutmut's name: <module>.x_<function>__mutmut_<n>, or
        # <module>.xǁ<Class>ǁ<method>__mutmut_<n>
        return functions is None or any(f"x_{f}__mutmut_" in name or f"ǁ{f}__mutmut_" in name for f in functions)

    out = {}
    for functions, tests in groups:
        todo = [n for n in names if in_group(n, functions) and out.get(n) != "killed by a recheck"]
        if not todo:
            continue
        if _pytest(work, tests, "") != 0:
            raise RuntimeError(f"{tests} fail without any mutant in {work / 'mutants'}")
        for name in todo:
            code = _pytest(work, tests, name)
            out[name] = {0: "survived", 1: "killed by a recheck", 2: COLLECTION}.get(
                code, f"recheck error (pytest exit {code})")
            print(f"  recheck {name}: {out[name]}", flush=True)
    return out


def _diff(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if ln.startswith(("-", "+")) and not ln.startswith(("---", "+++")))


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


NOT_SAMPLED = "not sampled"
SAMPLE_KEY = "sample:"  # results of a sampled run are kept under "sample:<module>", beside a complete run

# mutmut generates the mutated copy as the first step of `mutmut run`; the sampled mode needs
# only that step (it runs the sampled mutants itself), so it calls mutmut's own functions.
_GENERATE = """
import os
from mutmut.mutation.trampoline import set_mutant_under_test
from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir
from mutmut.__main__ import create_mutants
set_mutant_under_test("mutant_generation")
os.makedirs("mutants", exist_ok=True)
copy_src_dir()
copy_also_copy_files()
create_mutants(1)
"""


def sample_module(module: str, tests: list[str], k: int, seed: int, max_children: int) -> dict:
    """``k`` mutants of ``module`` drawn at random (``seed``), each run against the module's
    selection shortest test first, stopping at the first failure; the others are "not sampled".
    The score is then an estimate, reported with its 95% interval."""
    start = time.perf_counter()
    work = prepare(module, tests, sampled=True)
    subprocess.run([sys.executable, "-c", _GENERATE], cwd=work, env=_env(), check=True, capture_output=True)
    meta = json.loads((work / "mutants" / (module + ".meta")).read_text())
    names = sorted(meta["exit_code_by_key"])
    durations = work / "durations.json"
    pytest = _pytest_cmd(tests)
    clean_start = time.perf_counter()
    code = subprocess.run(pytest, cwd=work / "mutants", env=_env(MUTANT_UNDER_TEST="", JDEQ_TEST_DURATIONS=str(durations)),
                          capture_output=True, text=True)
    if code.returncode != 0:
        raise RuntimeError(f"{module}: its tests fail without any mutant:\n{code.stdout[-3000:]}")
    timeout = 2 * (time.perf_counter() - clean_start) + 60
    chosen = random.Random(f"{module}:{seed}").sample(names, min(k, len(names)))

    def verdict(name: str) -> tuple[str, str]:
        env = _env(MUTANT_UNDER_TEST=name, JDEQ_TEST_DURATIONS=str(durations))
        try:
            rc = _run_group(pytest, work / "mutants", env, timeout)[0]
        except subprocess.TimeoutExpired:
            rc = None
        return name, {None: "timeout", 0: "survived", 1: "killed", 2: COLLECTION, -signal.SIGSEGV: "segfault"}.get(
            rc, f"suspicious (pytest exit {rc})")

    status = dict.fromkeys(names, NOT_SAMPLED)
    with ThreadPoolExecutor(max_children) as pool:
        for name, st in pool.map(verdict, chosen):
            status[name] = st
            print(f"  {name}: {st}", flush=True)
    if module in RECHECK:
        status.update(recheck(work, [n for n, st in status.items() if st == "survived"], RECHECK[module]))
    diffs = {name: _diff(mutmut(work, "show", name)) for name, st in status.items() if st == "survived"}
    status = {n: st for n, st in status.items() if st != NOT_SAMPLED}  # the mutants run (of `population`)
    return {"module": module, "tests": tests, "seconds": round(time.perf_counter() - start), "status": status,
            "survivors": diffs, "commit": _commit(), "recheck": RECHECK.get(module), "sample": len(chosen),
            "seed": seed, "population": len(names)}


def wilson(killed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (a sampled kill rate)."""
    if n == 0:
        return 0.0, 1.0
    p = killed / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def equivalents(result: dict, equivalent: dict) -> dict[str, str]:
    """The survivors of ``result`` listed equivalent, with their reasons. An entry of the toml,
    ``{reason, diff}``, holds only while the recorded mutant of that name has that diff: mutmut
    numbers a function's mutants afresh when its code changes, so a name alone can come to mean
    another mutant (nine entries of ``_loop.py`` had, and would have hidden real survivors)."""
    out = {}
    for name, st in result["status"].items():
        entry = equivalent.get(name)
        if st == "survived" and entry is not None and _diff(entry["diff"]) == _diff(result["survivors"].get(name, "")):
            out[name] = entry["reason"]
    return out


def score(result: dict, equivalent: dict) -> dict:
    st = {n: s for n, s in result["status"].items() if s != NOT_SAMPLED}  # the mutants that were run
    eqs = equivalents(result, equivalent)
    eq = [n for n, s in st.items() if n in eqs]
    killed = sum(s in KILLED for s in st.values())
    survived = [n for n, s in st.items() if s == "survived" and n not in eqs]
    other = {s for s in st.values() if s not in KILLED and s != "survived"}
    unchecked = sum(s not in KILLED and s != "survived" for s in st.values())
    denominator = len(st) - len(eq)
    return {"mutants": len(st), "of": result.get("population", len(result["status"])), "killed": killed, "survived": len(survived),
            "equivalent": len(eq), "unchecked": unchecked, "unchecked_kinds": sorted(other),
            "score": killed / denominator if denominator else 1.0,
            "interval": wilson(killed, denominator) if result.get("sample") else None}


def write_docs(results: dict[str, dict], equivalent: dict) -> None:
    DOC_JSON.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    lines = [
        "# Mutation score",
        "",
        "Written by `make mutation` (`.ci/mutation.py`, mutmut 3): each module's mutants run against its",
        "own test selection. Score = killed / (mutants - equivalent); *unchecked* counts mutants that",
        "did not run to a verdict (no test reached them, the run was stopped, or pytest could not",
        "start: mutmut exit code 255, which mutmut itself labels \"timeout\"); they count as not",
        "killed. Equivalent mutants and their reasons: `.ci/mutation_equivalent.toml`. Survivors in",
        "some functions (and their mutants no in-process test reached) are rechecked against more",
        "tests (`RECHECK` in the script), each mutant in a fresh pytest process: tests that run the",
        "function only in subprocesses, which mutmut cannot see (two `jax.distributed` processes, 8",
        "simulated devices), code that runs at import (mutmut's forkserver imported it before any",
        "mutant was chosen), and tests of options that few callers use; a failure there counts as",
        "killed, a mutant left alive as survived.",
        "",
        "A *sampled* module (`--sample K`) ran K of its mutants drawn at random: its score is an",
        "estimate, given with its 95% (Wilson) interval; a complete run checks every mutant.",
        "",
        "| module | mutants run | killed | survived | equivalent | unchecked | score | commit | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in sorted(results.items()):
        module = r["module"]
        s = score(r, equivalent)
        run = f"{s['mutants']} (sample of {s['of']}, seed {r['seed']})" if r.get("sample") else f"{s['mutants']} (all)"
        est = f"{s['score']:.0%}" + (f" ({s['interval'][0]:.0%}-{s['interval'][1]:.0%})" if s["interval"] else "")
        lines.append(f"| `{module}` | {run} | {s['killed']} | {s['survived']} | {s['equivalent']} | "
                     f"{s['unchecked']} | {est} | {r['commit']} | {r['seconds'] / 60:.0f} |")
    sampled = [score(r, equivalent) for r in results.values() if r.get("sample")]
    if sampled:  # every module's sample together: each module weighs the same (K mutants each)
        k, n = sum(s["killed"] for s in sampled), sum(s["mutants"] - s["equivalent"] for s in sampled)
        lo, hi = wilson(k, n)
        lines += ["", f"All sampled modules together: {k} of {n} non-equivalent mutants killed "
                      f"({k / n:.0%}, 95% interval {lo:.0%}-{hi:.0%}; each module's sample weighs the same)."]
    for _, r in sorted(results.items()):
        module = r["module"]
        eq = equivalents(r, equivalent)
        survivors = {n: d for n, d in r["survivors"].items() if n not in eq}
        kind = f" (sample of {r['sample']}, seed {r['seed']})" if r.get("sample") else ""
        lines += ["", f"## `{module}`{kind}", "", "Tests: " + ", ".join(f"`{t}`" for t in r["tests"]), ""]
        if r.get("tests_commit"):
            lines += [f"Mutants of the code at {r['commit']}; survivors rechecked with the tests at "
                      f"{r['tests_commit']} (`--recheck-only`).", ""]
        if r.get("resumed_with_tests"):
            lines += [f"Mutants of the code at {r['commit']}; resumed (`--resume`) at {r['resumed_with_tests']}, "
                      "whose tests rechecked the survivors (and ran any mutant not yet run).", ""]
        for functions, tests in r.get("recheck") or []:
            lines += ["Rechecked: survivors in " + ", ".join(f"`{f}`" for f in functions) + " against "
                      + ", ".join(f"`{t}`" for t in tests), ""]
        if survivors:
            lines += ["Surviving mutants:", ""]
            for name, diff in sorted(survivors.items()):
                lines += [f"- `{name}`", "", "  ```diff", *("  " + ln for ln in diff.splitlines()), "  ```"]
        else:
            lines.append("No surviving mutant outside the equivalent ones.")
        if eq:
            lines += ["", "Equivalent mutants:", ""] + [f"- `{n}`: {why}" for n, why in sorted(eq.items())]
    DOC_MD.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", help="modules to run (default: every module in MODULES)")
    p.add_argument("--max-children", type=int, default=2, help="mutants run in parallel (default 2)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per module before it is stopped")
    p.add_argument("--recheck-only", action="store_true",
                   help="rerun the last run's survivors (not listed equivalent) against the current tests: "
                        "the module's selection, and RECHECK's tests for survivors in its functions")
    p.add_argument("--groups-only", action="store_true",
                   help="with --recheck-only: RECHECK's tests only, not the module's whole selection")
    p.add_argument("--resume", action="store_true",
                   help="go on with the last run's mutated copy (mutants that have a verdict keep it)")
    p.add_argument("--sample", type=int, metavar="K",
                   help="run K mutants per module drawn at random (an estimate of the score, in about an "
                        "hour for every module) instead of every mutant")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample's draw (default 0)")
    p.add_argument("--docs-only", action="store_true", help="rewrite docs/mutation.md from docs/mutation.json")
    args = p.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        p.error(f"not in MODULES: {unknown}; known: {sorted(MODULES)}")
    equivalent = tomllib.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    results = json.loads(DOC_JSON.read_text()) if DOC_JSON.exists() else {}
    if args.docs_only:
        write_docs(results, equivalent)
        return
    failed: list[str] = []
    for module in args.modules or list(MODULES):
        print(f"mutation: {module} ...", flush=True)
        if args.recheck_only:
            key = (SAMPLE_KEY if args.sample else "") + module
            if key not in results:
                p.error(f"{key}: nothing to recheck (no recorded run)")
            r = results[key]
            work = _workdir(module, sampled=bool(args.sample))
            # the tests are never mutated: recheck with the current ones, the module's selection
            # for every survivor and RECHECK's tests for those in its functions
            _current_tests(work)
            eqs = equivalents(r, equivalent)
            names = [n for n, st in r["status"].items() if st in UNANSWERED and n not in eqs]
            groups = ([] if args.groups_only else [(None, MODULES[module])]) + RECHECK.get(module, [])
            r["status"].update(recheck(work, names, groups))
            r["recheck"] = RECHECK.get(module)
            r["tests_commit"] = _commit() + (" (RECHECK's tests only)" if args.groups_only else "")
            r["survivors"] = {n: r["survivors"].get(n) or _diff(mutmut(work, "show", n))
                              for n, st in r["status"].items() if st == "survived"}
        else:
            key = (SAMPLE_KEY if args.sample else "") + module
            try:
                if args.sample:
                    results[key] = sample_module(module, MODULES[module], args.sample, args.seed, args.max_children)
                else:
                    results[key] = run_module(module, MODULES[module], args.max_children, args.timeout, args.resume,
                                              equivalent, results.get(key))
            except RuntimeError as e:  # e.g. its selection fails unmutated: say so, go on with the others
                failed.append(module)
                print(f"  {module} not measured: {e}", flush=True)
                continue
        write_docs(results, equivalent)  # after every module: a stopped run keeps what it measured
        s = score(results[key], equivalent)
        print(f"  {s['killed']}/{s['mutants'] - s['equivalent']} killed ({s['score']:.0%}), "
              f"{s['survived']} survived, {s['unchecked']} unchecked", flush=True)
    print(f"wrote {DOC_MD.relative_to(ROOT)} and {DOC_JSON.relative_to(ROOT)}")
    if failed:
        raise SystemExit(f"not measured: {failed}")


if __name__ == "__main__":
    main()
