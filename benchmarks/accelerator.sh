#!/usr/bin/env bash
# The GPU/TPU path of the benchmarks (issue [3 of 5]): one script that runs the main job
# (memory vs depth, as `make bench` does), jdeq against its peers, the solver x gradient speed
# table and the per-iteration solver costs (solver_steps) on whatever accelerator JAX sees, and
# writes their JSON and PNG files to one folder.
#
#   bash benchmarks/accelerator.sh [OUT_DIR]        # default: results/accelerator
#
# It installs nothing: run it in an environment with jdeq[bench] and an accelerator build of JAX
# (e.g. `pip install -e ".[bench,peers]" "jax[cuda12]"`; peers that are missing are skipped by
# vs_peers with a printed reason). It stops if JAX sees only a CPU, so that CPU figures are never
# filed as accelerator ones. Every benchmark prints the machine it ran on and writes it to its
# JSON. Absolute times are meaningful here (one accelerator, nothing else running); on the
# shared CPU boxes only the side-by-side ratios are reported.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/accelerator}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

platform=$("$PY" -c "import jax; print(jax.default_backend())")
if [ "$platform" = "cpu" ]; then
    echo "benchmarks/accelerator.sh: JAX sees no accelerator (default backend: cpu); stopping." >&2
    exit 2
fi
"$PY" -c "import jax; print('devices:', jax.devices())" | tee "$OUT/devices.txt"

"$PY" -m benchmarks.memory_vs_depth --out "$OUT" 2>&1 | tee "$OUT/memory_vs_depth.log"
"$PY" -m benchmarks.vs_peers --out "$OUT/vs_peers" 2>&1 | tee "$OUT/vs_peers.log"
"$PY" -m benchmarks.speed --out "$OUT" 2>&1 | tee "$OUT/speed.log"
"$PY" -m benchmarks.solver_steps --out "$OUT" 2>&1 | tee "$OUT/solver_steps.log"
echo "wrote $(ls "$OUT" | tr '\n' ' ')"
