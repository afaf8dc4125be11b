"""Interrupted training loses nothing: SIGKILL at random moments, corrupted or partial checkpoints.

``fit`` keeps the last 3 checkpoints (orbax writes each atomically: a temporary directory renamed
once complete) with a CRC-32 of every array in the JSON meta. Each corruption below hits the
newest checkpoint (step 6) of an interrupted run; the resumed run must warn naming step 6, move
it to ``corrupt/``, restart from step 4 and end bitwise equal (parameters, optimizer state,
every logged loss) to the uninterrupted run. The resume tests by exception and Ctrl-C are in
tests/test_train.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import _resume_worker as W
from jdeq import train

# When one read of a damaged checkpoint fails, orbax closes its asyncio loop while other
# tensorstore reads are still pending; their callbacks then raise "Event loop is closed" on
# the closed loop (harmless noise, reported by pytest as unraisable exceptions).
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

STEPS, EVERY = 8, 2
KW = dict(steps=STEPS, batch_size=32, seed=3, log_every=1, checkpoint_every=EVERY, progress=False)


class _Stop(Exception):
    pass


def _stop_at_7(step, metrics):
    if step == 7:
        raise _Stop


def _final(net, ckpt_dir, hist):
    """Model params, the last checkpoint's params + optimizer state, and the losses, on host."""
    _, params, _ = nnx.split(W.Net("mlp"), nnx.Param, ...)
    template = jax.tree_util.tree_leaves((params, W.optimizer().init(params)))
    ckpt = train.restore_checkpoint(ckpt_dir, template, step=train.checkpoint_steps(ckpt_dir)[-1]).tree
    return {
        "model": [np.asarray(x) for x in jax.tree_util.tree_leaves(nnx.state(net, nnx.Param))],
        "ckpt": [np.asarray(x) for x in ckpt],
        "losses": [r["loss"] for r in hist.train],
        "steps": [r["step"] for r in hist.train],
    }


def _assert_bitwise_equal(got, want):
    assert got["steps"] == want["steps"] == list(range(1, STEPS + 1))
    assert got["losses"] == want["losses"]
    for key in ("model", "ckpt"):
        assert len(got[key]) == len(want[key])
        for a, b in zip(got[key], want[key]):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="session")  # once per xdist worker (seconds; directories, not values)
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    net = W.Net("mlp")
    hist = train.fit(net, W.optimizer(), W.data(), checkpoint_dir=d, **KW)
    return _final(net, d, hist)


@pytest.fixture(scope="session")  # once per xdist worker (seconds; directories, not values)
def interrupted(tmp_path_factory):
    """A run stopped at step 7: checkpoints of steps 2, 4 and 6 on disk."""
    d = tmp_path_factory.mktemp("interrupted")
    with pytest.raises(_Stop):
        train.fit(W.Net("mlp"), W.optimizer(), W.data(), checkpoint_dir=d, callback=_stop_at_7, **KW)
    assert sorted(os.listdir(d)) == ["2", "4", "6"]
    return d


def _largest(path: Path) -> Path:
    # The arrays live in the merged OCDBT store state/d/ (the per-process copy under
    # state/ocdbt.process_0/ is not read on restore).
    return max((path / "state" / "d").iterdir(), key=lambda f: f.stat().st_size)


def _truncate(step_dir):
    f = _largest(step_dir)
    os.truncate(f, f.stat().st_size // 2)


def _garble(step_dir):
    f = _largest(step_dir)
    b = bytearray(f.read_bytes())
    for i in range(len(b) // 2, len(b) // 2 + 8):
        b[i] ^= 0x5A
    f.write_bytes(bytes(b))


def _delete(step_dir):
    _largest(step_dir).unlink()


def _no_commit_marker(step_dir):
    (step_dir / "commit_success.txt").unlink()


def _garbled_meta(step_dir):
    f = step_dir / "meta" / "metadata"
    f.write_bytes(f.read_bytes()[:40])


def _arrays_of_another_step(step_dir):
    # A sound checkpoint as far as orbax can tell (it restores without error), holding step 4's
    # arrays: only the checksums in the meta catch it.
    shutil.rmtree(step_dir / "state")
    shutil.copytree(step_dir.parent / "4" / "state", step_dir / "state")


CORRUPTIONS = {
    "truncated_array_file": _truncate,
    "garbled_array_file": _garble,
    "deleted_array_file": _delete,
    "missing_commit_marker": _no_commit_marker,
    "garbled_json_meta": _garbled_meta,
    "arrays_of_another_step": _arrays_of_another_step,
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS) + ["unfinished_write"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(kind, interrupted, reference, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(interrupted, d)
    if kind == "unfinished_write":  # what a kill mid-save leaves: orbax's temporary directory
        os.replace(d / "6", d / "6.orbax-checkpoint-tmp-1795491977028040873")
    else:
        CORRUPTIONS[kind](d / "6")
    net = W.Net("mlp")
    match = "unfinished checkpoint of step 6" if kind == "unfinished_write" else "checkpoint of step 6 is corrupt"
    with pytest.warns(RuntimeWarning, match=match):
        hist = train.fit(net, W.optimizer(), W.data(), checkpoint_dir=d, **KW)
    assert hist.resumed_from == 4
    _assert_bitwise_equal(_final(net, d, hist), reference)
    quarantined = sorted(p.name.split("-")[0] for p in (d / "corrupt").iterdir()) if (d / "corrupt").exists() else []
    assert quarantined == ([] if kind == "unfinished_write" else ["6"])
    assert sorted(p.name for p in d.iterdir() if p.name != "corrupt") == ["4", "6", "8"]  # tmp dir removed


def test_every_checkpoint_corrupt_starts_from_scratch(interrupted, reference, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(interrupted, d)
    for step, corrupt in (("2", _garbled_meta), ("4", _truncate), ("6", _no_commit_marker)):
        corrupt(d / step)
    net = W.Net("mlp")
    with pytest.warns(RuntimeWarning) as record:
        hist = train.fit(net, W.optimizer(), W.data(), checkpoint_dir=d, **KW)
    # jdeq's own warnings (another library's RuntimeWarning, e.g. JAX's os.fork() notice when a
    # busy test worker forks, may be recorded in between)
    messages = [str(w.message) for w in record if "checkpoint" in str(w.message)]
    assert [m.split("checkpoint of step ")[1][0] for m in messages[:3]] == ["6", "4", "2"]
    assert "no usable checkpoint (steps [6, 4, 2] were corrupt)" in messages[3]
    assert hist.resumed_from is None
    _assert_bitwise_equal(_final(net, d, hist), reference)
    assert len(list((d / "corrupt").iterdir())) == 3


def test_checkpoint_of_another_model_is_an_error_not_corruption(interrupted, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(interrupted, d)
    with pytest.raises(ValueError, match="checkpoint_dir.*another model"):
        train.fit(W.Net("deq"), W.optimizer(), W.data(), checkpoint_dir=d, **KW)
    assert sorted(os.listdir(d)) == ["2", "4", "6"]  # nothing moved or deleted


def test_keeps_three_checkpoints_each_with_checksums(interrupted):
    import json

    assert train.checkpoint_steps(interrupted) == [2, 4, 6]
    record = json.loads((interrupted / "6" / "meta" / "metadata").read_text())
    assert record["step"] == 6 and len(record["meta"]["train"]) == 6
    assert all(set(e) == {"shape", "dtype", "crc32"} for e in record["leaves"])


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    """A worker process (tests/_resume_worker.py: a DEQ classifier, a checkpoint every step) is
    SIGKILLed 3 times at random moments after its first step, restarted each time, then run to
    the end: parameters, optimizer state and logged losses equal an uninterrupted run's, bit
    for bit (same CPU backend, same compiled step: nothing may differ)."""
    from benchmarks.kill_resume import run_worker, trial

    steps, every = 16, 1
    ref = run_worker(tmp_path / "ref" / "ckpt", tmp_path / "ref" / "out.npz", steps=steps, every=every)
    result = trial(tmp_path / "chain", tmp_path / "ref" / "out.npz", window=ref["seconds"], kills=3, steps=steps,
                   every=every, rng=np.random.default_rng(0))
    assert result["kills_landed"] >= 1, result
    assert result["equal"], result
    assert result["quarantined"] == 0  # atomic writes: a kill never leaves a corrupt step behind
