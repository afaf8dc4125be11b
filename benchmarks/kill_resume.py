"""Kill/resume trials: a checkpointed training run is killed with SIGKILL at random moments,
restarted after each kill, and its final parameters, optimizer state and logged losses are
compared bitwise with those of an uninterrupted run.

    python -m benchmarks.kill_resume --trials 20 [--kills 3] [--steps 16] [--every 1]

Each trial runs ``python -m tests._resume_worker`` (a tiny ``jdeq.nnx.DEQ`` classifier trained
by ``jdeq.train.fit`` with a checkpoint every ``--every`` steps) ``--kills`` times, each time
killed (SIGKILL, no chance to clean up) a random delay after its first training step, drawn
uniformly over the time the uninterrupted run took for the steps still to do; then once more
to the end. A kill that lands while a checkpoint is being written leaves orbax's temporary directory
behind (counted as "mid-save"). A trial survives when the final parameters (from the model and
from the last checkpoint), the optimizer state (last checkpoint) and every logged loss equal
the reference's bit for bit. Writes ``results/kill_resume.json`` and ``.png``; prints the table
last.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks._common import flush_print, format_table, header, machine, out_dir_arg, plot_lines, write_json
from jdeq import argtypes as T

__all__ = ["compare", "main", "run_worker", "trial"]

ROOT = Path(__file__).resolve().parent.parent
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's unfinished-write directories (ocp.step.TMP_DIR_SUFFIX)


def run_worker(ckpt_dir, out, *, steps: int, every: int, model: str = "deq", kill_after: float | None = None,
               log=None) -> dict:
    """Runs the worker once; with ``kill_after``, SIGKILLs it that many seconds after its first
    step. Returns ``{"killed", "last_step" (last step it reported), "seconds" (first to last
    reported step), "mid_save" (an unfinished checkpoint was left), "returncode"}``."""
    cmd = [sys.executable, "-m", "tests._resume_worker", str(ckpt_dir), str(out), "--steps", str(steps),
           "--every", str(every), "--model", model]
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    lines: list[tuple[float, str]] = []  # (arrival time, line) of the worker's stdout
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log or err, text=True, env=env)
        reader = threading.Thread(target=lambda: lines.extend((time.perf_counter(), x) for x in proc.stdout),
                                  daemon=True)
        reader.start()
        while not lines and proc.poll() is None:  # until the first step is done (or the process ends)
            time.sleep(0.002)
        killed = False
        if kill_after is not None and lines and lines[0][1].startswith("step"):
            try:
                proc.wait(timeout=max(0.0, lines[0][0] + kill_after - time.perf_counter()))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
        proc.wait()
        reader.join()
        if proc.returncode != 0 and not killed:
            err.seek(0)
            raise RuntimeError(f"worker failed ({proc.returncode}):\n{err.read()[-3000:]}")
    stepped = [(t, int(x.split()[1])) for t, x in lines if x.startswith("step ")]
    mid_save = Path(ckpt_dir).exists() and any(TMP_SUFFIX in p.name for p in Path(ckpt_dir).iterdir())
    return {"killed": killed, "last_step": stepped[-1][1] if stepped else None,
            "seconds": stepped[-1][0] - stepped[0][0] if stepped else 0.0,
            "mid_save": killed and mid_save, "returncode": proc.returncode}


def compare(out, reference) -> dict:
    """Bitwise comparison of two workers' OUT.npz: ``{"equal", "arrays", "max_abs_diff"}``."""
    a, b = np.load(out), np.load(reference)
    if sorted(a.files) != sorted(b.files):
        return {"equal": False, "arrays": len(b.files), "max_abs_diff": None}
    equal, diff = True, 0.0
    for k in b.files:
        x, y = a[k], b[k]
        same = x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes()
        equal &= same
        if not same and x.shape == y.shape:
            diff = max(diff, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)), initial=0.0)))
    return {"equal": bool(equal), "arrays": len(b.files), "max_abs_diff": diff}


def trial(workdir, reference, *, window: float, kills: int, steps: int, every: int, rng, model: str = "deq",
          log=None) -> dict:
    """One kill/resume chain in ``workdir``; compared with the ``reference`` OUT.npz."""
    workdir = Path(workdir)
    ckpt, out = workdir / "ckpt", workdir / "out.npz"
    runs, done = [], 0
    for _ in range(kills):
        # the delay is drawn over the time the steps still to do took in the reference run
        delay = float(rng.uniform(0.0, window * (steps - done) / steps))
        runs.append({"delay": delay, **run_worker(ckpt, out, steps=steps, every=every, model=model,
                                                   kill_after=delay, log=log)})
        done = max(done, (runs[-1]["last_step"] or 1) - 1)  # (its last step may not be saved)
    runs.append({"delay": None, **run_worker(ckpt, out, steps=steps, every=every, model=model, log=log)})
    bad = len(list((ckpt / "corrupt").glob("*"))) if (ckpt / "corrupt").exists() else 0
    return {"runs": runs, "kills_landed": sum(r["killed"] for r in runs),
            "mid_save": sum(r["mid_save"] for r in runs), "quarantined": bad, **compare(out, reference)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=T.positive_int, default=20)
    p.add_argument("--kills", type=T.positive_int, default=3, help="kills per trial (default 3)")
    p.add_argument("--steps", type=T.positive_int, default=16)
    p.add_argument("--every", type=T.positive_int, default=1, help="checkpoint period in steps (default 1)")
    p.add_argument("--model", default="deq", choices=["deq", "mlp"])
    p.add_argument("--seed", type=T.nonneg_int, default=0, help="seed of the kill delays")
    out_dir_arg(p)
    a = p.parse_args(argv)

    info = machine()
    flush_print(header(info, "kill/resume: SIGKILL at random moments, restart, compare bitwise"))
    rng = np.random.default_rng(a.seed)
    rows, t_start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref = run_worker(tmp / "ref" / "ckpt", tmp / "ref" / "out.npz", steps=a.steps, every=a.every, model=a.model)
        window = ref["seconds"]
        flush_print(f"reference run: {a.steps} steps, checkpoint every {a.every}; training phase {window:.2f} s "
                    "(the kill delays are drawn from [0, this x fraction of steps left])")
        for i in range(a.trials):
            r = trial(tmp / f"t{i}", tmp / "ref" / "out.npz", window=window, kills=a.kills, steps=a.steps,
                      every=a.every, rng=rng, model=a.model)
            r["trial"] = i
            r["kill_steps"] = " ".join(f"{x['last_step']}{'*' if x['mid_save'] else ''}"
                                       for x in r["runs"] if x["killed"]) or "-"
            rows.append(r)
            flush_print(f"trial {i}: kills {r['kills_landed']} (mid-save {r['mid_save']}), "
                        f"equal {r['equal']}")
    survived = sum(r["equal"] for r in rows)
    summary = {"trials": len(rows), "survived": survived, "kills": sum(r["kills_landed"] for r in rows),
               "mid_save_kills": sum(r["mid_save"] for r in rows), "seconds": time.perf_counter() - t_start,
               "reference_training_s": window}
    doc = {"machine": info, "args": vars(a), "summary": summary, "rows": rows}
    path = write_json(a.out, "kill_resume", doc)
    between = {"x": [], "y": []}
    during = {"x": [], "y": []}
    for r in rows:
        for x in r["runs"]:
            if x["killed"]:
                d = during if x["mid_save"] else between
                d["x"].append(r["trial"])
                d["y"].append(x["last_step"])
    series = {"killed mid-save": (during["x"], during["y"]), "killed between saves": (between["x"], between["y"])}
    plot_lines(Path(a.out) / "kill_resume.png", {k: v for k, v in series.items() if v[0]},
               xlabel="trial", ylabel="last step reported before the kill",
               title=f"kill/resume: {survived}/{len(rows)} trials bitwise equal to the uninterrupted run",
               loglog=False, styles={"killed mid-save": "rx", "killed between saves": "bo"})
    flush_print(f"wrote {path}")
    flush_print(f"survived with nothing lost: {survived}/{len(rows)} trials; {summary['kills']} SIGKILLs, "
                f"{summary['mid_save_kills']} of them mid-save")
    flush_print("")
    flush_print(format_table(rows, [("trial", "trial", "d"), ("kills_landed", "kills", "d"),
                                    ("mid_save", "mid-save", "d"), ("kill_steps", "killed after step (*mid-save)", ""),
                                    ("quarantined", "quarantined", "d"), ("max_abs_diff", "max |diff|", ".3g"),
                                    ("equal", "bitwise equal", "")]))
    return doc


if __name__ == "__main__":
    main()
