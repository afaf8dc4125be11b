"""Import time: ``import jdeq`` after jax + flax.nnx + optax, against those three.

Run: ``python -m benchmarks.import_time`` (``--rounds N``; ``--variant NAME=DIR`` adds another
jdeq source tree, for example an older commit exported with
``git archive REV jdeq | tar -x -C DIR``, measured in the same interleaved rounds).

Each round starts one fresh interpreter per variant (in turn, so a busy machine slows every
variant alike) that times, with ``time.perf_counter``:

1. ``import jax, flax.nnx, optax`` (the base every jdeq user pays anyway);
2. then ``import jdeq`` (jdeq's own cost on top of them),

and lists which heavy optional modules the ``import jdeq`` loaded (jaxopt, orbax, tqdm,
jdeq.train, jdeq.data, jdeq.experiments). The ``current`` variant is the jdeq that this Python
imports (this checkout when run from it). Reports the median of each over the rounds and the
ratio jdeq / base (the issue's aim: at most 0.1). Nothing is asserted.

Writes ``results/import_time.json`` and ``results/import_time.png`` (times per round) and
prints the machine first and the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jdeq import argtypes as T
from benchmarks import _common as C

HEAVY = ["jaxopt", "orbax", "tqdm", "jdeq.train", "jdeq.data", "jdeq.experiments"]

PROBE = """
import sys, time, json
t0 = time.perf_counter()
import jax, flax.nnx, optax
t1 = time.perf_counter()
import jdeq
t2 = time.perf_counter()
heavy = [m for m in %r if any(k == m or k.startswith(m + ".") for k in sys.modules)]
print(json.dumps({"base_s": t1 - t0, "jdeq_s": t2 - t1, "loaded": heavy, "jdeq_file": jdeq.__file__}))
""" % (HEAVY,)


def probe(src: str | None) -> dict[str, Any]:
    """One fresh interpreter: seconds for the base imports and for ``import jdeq`` after them.

    ``src``: a folder holding a ``jdeq`` package to import instead of the installed one."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    # run outside any checkout so that the current directory does not decide which jdeq loads
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd="/",
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.import_time", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=T.positive_int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                   help="another jdeq source tree (DIR holds the jdeq package) to measure alongside")
    C.out_dir_arg(p)
    args = p.parse_args(argv)
    variants: dict[str, str | None] = {"current": None}
    for spec in args.variant:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not (Path(folder) / "jdeq" / "__init__.py").is_file():
            p.error(f"--variant must be NAME=DIR with DIR/jdeq/__init__.py, got {spec!r}")
        variants[name] = str(Path(folder).resolve())
    return args, variants


def main(argv=None) -> dict[str, Any]:
    """Runs the benchmark; returns the JSON document it writes."""
    args, variants = parse_args(list(sys.argv[1:] if argv is None else argv))
    info = C.machine()
    C.flush_print(C.header(info, "import time: import jdeq after jax + flax.nnx + optax"))
    t_start = time.perf_counter()
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, src in variants.items():
            samples[name].append(probe(src))
    rows = []
    for name, runs in samples.items():
        base = C.median([r["base_s"] for r in runs])
        own = C.median([r["jdeq_s"] for r in runs])
        rows.append({
            "variant": name, "jdeq_file": runs[0]["jdeq_file"], "rounds": len(runs),
            "base_ms": 1e3 * base, "jdeq_ms": 1e3 * own, "ratio": own / base,
            "jdeq_ms_spread": {k: 1e3 * v for k, v in C.spread([r["jdeq_s"] for r in runs]).items() if k != "n"},
            "loaded": runs[0]["loaded"],
        })
    elapsed = time.perf_counter() - t_start
    doc = {
        "benchmark": "import_time", "machine": info,
        "config": {"rounds": args.rounds, "variants": {k: v or "installed" for k, v in variants.items()},
                   "base": "import jax, flax.nnx, optax", "heavy_modules_checked": HEAVY},
        "rows": rows, "samples": samples, "elapsed_s": elapsed,
    }
    json_path = C.write_json(args.out, "import_time", doc)
    series = {}
    for name, runs in samples.items():
        n = list(range(1, len(runs) + 1))
        series[f"{name}: import jdeq"] = (n, [1e3 * r["jdeq_s"] for r in runs])
        series[f"{name}: jax+flax.nnx+optax"] = (n, [1e3 * r["base_s"] for r in runs])
    png_path = C.plot_lines(Path(args.out) / "import_time.png", series, xlabel="round (fresh interpreters)",
                            ylabel="import time (ms)", loglog=False,
                            title="import jdeq after jax + flax.nnx + optax, per round")
    doc["files"] = [str(json_path), str(png_path)]
    C.flush_print(f"wrote {json_path} and {png_path} ({elapsed:.0f} s)")
    C.flush_print(f"medians over {args.rounds} interleaved rounds; ratio = import jdeq / (jax + flax.nnx + optax); "
                  "loaded = heavy modules that import jdeq pulled in")
    shown = [{**r, "loaded": ", ".join(r["loaded"]) or "none"} for r in rows]
    C.flush_print(C.format_table(shown, [
        ("variant", "variant", ""), ("base_ms", "jax+nnx+optax ms", ".0f"), ("jdeq_ms", "import jdeq ms", ".0f"),
        ("ratio", "ratio", ".3f"), ("loaded", "loaded", ""),
    ]))
    return doc


if __name__ == "__main__":
    main()
