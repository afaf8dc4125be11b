"""A real multi-process JAX runtime on one machine: 2 CPU processes x 2 devices, gloo collectives.

Two workers (tests/_multiprocess_worker.py) join one runtime with ``jax.distributed.initialize``
on localhost and train a tiny DEQ with ``jdeq.train.fit``: on a data mesh over the 4 devices
with each process's own rows (``host_shard``), and with weights split along a model axis
(``model_mesh(2)``, ``model_axis="model"``). They save and restore orbax checkpoints together
(the data-mesh run is SIGKILLed in both processes mid-run, restarted and resumed), and check
that a checkpoint whose shard held by one process is wrong is caught by its checksum. Training
is full batch with plain SGD, so the only difference a layout can make is the order of the sum
over the batch: the results are compared with a single-process run of the same settings in
this process (to 1e-6) and, for the resumed run, with an uninterrupted multi-process run (bit
for bit). A worker that hangs (a collective waiting for a dead peer) is killed at a deadline
and fails the test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import _multiprocess_worker as W
from _devices import cpu_devices_env

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 300  # seconds per phase (a loaded 2-core CI box needs ~80): a hung collective fails, not hangs
TOL = 1e-6  # one process vs two: the batch mean summed in another order (measured max 6e-8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(phase: str, workdir: Path, *, kill_when_ready: bool = False) -> list[str]:
    """Runs both workers of ``phase``; returns their stdouts. With ``kill_when_ready``, both are
    SIGKILLed as soon as process 0 prints ``ready``. Fails on a crash or past the deadline."""
    env = cpu_devices_env(2)
    port = _free_port()
    procs, outs = [], [[], []]
    for pid in range(2):
        cmd = [sys.executable, "-m", "tests._multiprocess_worker", phase, str(pid), str(port), str(workdir)]
        err = open(workdir / f"{phase}.{pid}.stderr", "w")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True))
    readers = [threading.Thread(target=lambda p=p, o=o: o.extend(p.stdout), daemon=True)
               for p, o in zip(procs, outs)]
    for r in readers:
        r.start()

    def kill_all():
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()

    def stderr_tails() -> str:
        return "\n".join(f"--- process {pid} stderr ---\n{(workdir / f'{phase}.{pid}.stderr').read_text()[-2500:]}"
                         for pid in range(2))

    end = time.monotonic() + DEADLINE
    try:
        while True:
            if kill_when_ready and "ready\n" in outs[0]:
                kill_all()
                break
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes) or (kill_when_ready and None not in codes):
                kill_all()
                pytest.fail(f"{phase}: a worker exited with {codes} (stdout {outs})\n{stderr_tails()}")
            if codes == [0, 0]:
                break
            if time.monotonic() > end:
                kill_all()
                pytest.fail(f"{phase}: the workers did not finish within {DEADLINE} s (a hung collective?); "
                            f"stdout {outs}\n{stderr_tails()}")
            time.sleep(0.05)
    finally:
        kill_all()
        for r in readers:
            r.join(timeout=5)
    return ["".join(o) for o in outs]


@pytest.fixture(scope="session")
def runs(tmp_path_factory, once):
    """Both phases (the first killed mid-run), then each process's results; computed once per test
    run (shared by xdist workers)."""
    return once("multiprocess_runs", lambda: _runs(tmp_path_factory))


def _runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multiprocess")
    first = _launch("first", workdir, kill_when_ready=True)
    assert "first done" in first[0] and "first done" in first[1]
    assert f"step {W.KILL_AT}" in first[0] and f"step {W.STEPS}" not in first[0]  # killed mid-run
    _launch("second", workdir)
    results = {}
    for phase in ("first", "second"):
        per_process = [dict(np.load(workdir / f"{phase}.{pid}.npz")) for pid in range(2)]
        for key in per_process[0]:  # every process reads the same global values
            np.testing.assert_array_equal(per_process[0][key], per_process[1][key], err_msg=key)
        results.update(per_process[0])
    results["workdir"] = workdir
    return results


@pytest.fixture(scope="session")
def reference(once):
    """The same training on one device, computed once per test run (shared by xdist workers)."""
    return once("multiprocess_reference", _reference)


def _reference():
    from jdeq import train

    model = W.net()
    hist = train.fit(model, W.optimizer(), W.data(), **W.fit_kwargs())
    return {"params": W.params(model), "losses": np.array([r["loss"] for r in hist.train])}


def _params(results, prefix):
    return [results[f"{prefix}_{i}"] for i in range(int(results["model_axis_params_n"]))]


def _assert_close(got, want, what):
    assert len(got) == len(want)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(got, want))
    assert diff <= TOL, f"{what}: max |difference| {diff:.2e} > {TOL}"


def test_data_mesh_fit_equals_one_process(runs, reference):
    _assert_close(_params(runs, "uninterrupted_param"), reference["params"], "data mesh vs one process")
    np.testing.assert_allclose(runs["uninterrupted_losses"], reference["losses"], rtol=1e-6)


def test_model_axis_fit_equals_one_process(runs, reference):
    _assert_close(_params(runs, "model_axis_param"), reference["params"], "model axis vs one process")
    np.testing.assert_allclose(runs["model_axis_losses"], reference["losses"], rtol=1e-6)


def test_split_weights_checkpoint_restores_across_processes(runs):
    # fit called again on the model-axis run's directory restores its final checkpoint (split
    # weights, verified by checksums on both processes) and trains no further
    assert int(runs["model_axis_resumed_from"]) == W.STEPS
    for a, b in zip(_params(runs, "model_axis_restored_param"), _params(runs, "model_axis_param")):
        np.testing.assert_array_equal(a, b)


def test_kill_both_processes_then_resume_equals_uninterrupted(runs):
    assert int(runs["resumed_from"]) == W.KILL_AT
    np.testing.assert_array_equal(runs["resumed_losses"], runs["uninterrupted_losses"])
    for a, b in zip(_params(runs, "resumed_param"), _params(runs, "uninterrupted_param")):
        np.testing.assert_array_equal(a, b)  # bit for bit: the same compiled step on the same devices


def test_checkpoint_api_with_an_array_split_over_processes(runs):
    full = np.arange(32, dtype=np.float32).reshape(8, 4)
    # leaves in key order: "b" replicated (each process reads all of it), "w" split over processes
    assert runs["api_checksum_kinds"].tolist() == ["crc32", "hash32"]
    assert int(runs["api_restored_step"]) == 2
    np.testing.assert_array_equal(runs["api_restored_w"], full + 1)
    np.testing.assert_array_equal(runs["api_relayout_w"], full)  # restored replicated instead of split
    assert str(runs["api_host_value_error"]) == (  # host_value of the split array, on either process
        "`x` is split over several processes: no process holds all of it "
        "(gather it first, e.g. jax.experimental.multihost_utils.process_allgather).")


def test_checkpoint_bad_on_one_process_only_is_set_aside_by_both(runs):
    # step 2 fails its check on process 1 only: process 0 hears of it, both restore step 1
    full = np.arange(32, dtype=np.float32).reshape(8, 4)
    assert int(runs["local_step"]) == 1
    np.testing.assert_array_equal(runs["local_w"], full)
    assert runs["local_quarantined"].tolist() == ["2"]
    assert runs["local_reason_on_each_process"].tolist() == [True]  # each its own reason, one warning


@pytest.mark.parametrize("saved", ["api", "whole"])
def test_corrupted_shard_of_one_process_is_caught(runs, saved):
    # "api": saved split over the processes (hash32); "whole": saved replicated (crc32) and
    # restored split, so each process gathers the array to check it. Step 2's arrays were then
    # replaced by ones whose row 6 (on process 1 only, once split) differs from what was saved:
    # both processes reject it, it is quarantined, and step 1 is restored
    full = np.arange(32, dtype=np.float32).reshape(8, 4)
    kinds = {"api": ["crc32", "hash32"], "whole": ["crc32", "crc32"]}[saved]
    assert runs[f"{saved}_checksum_kinds"].tolist() == kinds
    assert int(runs[f"{saved}_restored_step"]) == 2
    np.testing.assert_array_equal(runs[f"{saved}_restored_w"], full + 1)
    assert int(runs[f"{saved}_fallback_step"]) == 1
    np.testing.assert_array_equal(runs[f"{saved}_fallback_w"], full)
    (message,) = runs[f"{saved}_warnings"].tolist()
    assert "checkpoint of step 2 is corrupt (checksum mismatch in array 1 of 2)" in message
    assert runs[f"{saved}_quarantined"].tolist() == ["2"]
