# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Memory and time vs effective depth: DEQ vs unrolled networks
#
# The main claim of deep equilibrium models: a DEQ's training memory does **not** grow with its
# effective depth (the number of solver iterations), while an explicit weight-tied network of
# depth L stores L layers of activations for backprop. Here we measure it live, for one training
# step (loss + gradient + Adam update) of the same MLP cell used as
#
# * `jdeq.nnx.Unrolled(cell, depth=L)`: the explicit network, L applications of the cell;
# * `jdeq.nnx.Unrolled(cell, depth=L, remat=True)`: the same, recomputing each layer in the
#   backward pass (`jax.checkpoint`);
# * `jdeq.nnx.DEQ(cell, solver=Anderson(maxiter=L, tol=1e-12), gradient=...)`: a DEQ whose solver
#   runs exactly L iterations, with the `Implicit` or `Phantom(steps=5)` gradient.
#
# **Running on Colab.** The first code cell is a form: when jdeq is not importable (a fresh
# Colab runtime) it installs `jdeq[notebook]` with pip from the git repository in its `JDEQ_REPO`
# field; anywhere jdeq is installed already (this repository's `.venv`, say) it does nothing. The
# field defaults to the repository URL in jdeq's `pyproject.toml`; point it at a fork or a branch
# (`https://github.com/USER/jdeq@BRANCH`) if needed. The next cell prints the backend.

# %%
#@title Install jdeq (only where it is missing) { display-mode: "form" }
JDEQ_REPO = "https://github.com/jdeq-dev/jdeq"  #@param {type:"string"}
import importlib
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("jdeq") is None:  # a fresh runtime: install jdeq from the repository
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"jdeq[notebook] @ git+{JDEQ_REPO}"],
                   check=True)
    importlib.invalidate_caches()

# %% [markdown]
# ## Backend and sizes
# `JDEQ_QUICK=1` in the environment selects the smallest size (used by the test suite).

# %%
import time

import jax
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import jdeq

BACKEND = jax.default_backend().upper()  # "TPU", "GPU" or "CPU"
QUICK = os.environ.get("JDEQ_QUICK") == "1"
SIZE = "quick" if QUICK else ("cpu" if BACKEND == "CPU" else "accelerator")
CFG = {
    "quick": dict(width=64, batch=32, depths=(2, 32), timed_steps=3),
    "cpu": dict(width=256, batch=64, depths=(1, 8, 32, 128), timed_steps=10),
    "accelerator": dict(width=1024, batch=256, depths=(1, 8, 32, 128, 512), timed_steps=20),
}[SIZE]
print(f"backend: {BACKEND} ({jax.devices()[0].device_kind}), jax {jax.__version__}, jdeq {jdeq.__version__}")
print(f"size: {SIZE} -> {CFG}")

# %% [markdown]
# ## Two ways to measure memory in JAX
#
# **Compiled memory analysis.** `jax.jit(f).lower(*args).compile()` gives XLA's executable, and
# its `memory_analysis()` reports, in bytes, what the compiled program needs: `argument` and
# `output` buffers, `temp` (the scratch space for intermediates, which is where backprop's saved
# activations live) and `generated_code`. It is exact, deterministic and available on every
# backend, CPU included, without running the program: the right tool to compare methods.
#
# **Device peak memory.** On GPU and TPU, `jax.devices()[0].memory_stats()` reports the
# allocator's counters, among them `peak_bytes_in_use` (the high-water mark since the process
# started, all buffers included). It measures what actually ran, but it only grows, so a
# comparison needs a fresh process per method; the CPU backend returns `None`.

# %%
IN, CLASSES = 16, 10
x = jax.random.normal(jax.random.key(0), (CFG["batch"], IN))
labels = jax.random.randint(jax.random.key(1), (CFG["batch"],), 0, CLASSES)


class Net(nnx.Module):
    """Cell -> core (DEQ or unrolled) -> linear classifier head."""

    def __init__(self, make_core, rngs):
        self.core = make_core(jdeq.models.MLPCell(IN, CFG["width"], rngs=rngs))
        self.head = nnx.Linear(CFG["width"], CLASSES, rngs=rngs)

    def __call__(self, x):
        z, stats = self.core(x)
        return self.head(z), stats


EXACT = lambda L: jdeq.Anderson(tol=1e-12, maxiter=L, stop_mode="abs")  # noqa: E731
METHODS = {
    "unrolled": lambda L: lambda c: jdeq.nnx.Unrolled(c, depth=L),
    "unrolled + remat": lambda L: lambda c: jdeq.nnx.Unrolled(c, depth=L, remat=True),
    # tol below float32's reach: the solver always runs its whole budget of L iterations
    "DEQ, Implicit": lambda L: lambda c: jdeq.nnx.DEQ(c, solver=EXACT(L), gradient=jdeq.Implicit(maxiter=L)),
    "DEQ, Phantom(5)": lambda L: lambda c: jdeq.nnx.DEQ(c, solver=EXACT(L), gradient=jdeq.Phantom(steps=5)),
}


def measure(method, L):
    model = Net(METHODS[method](L), nnx.Rngs(0))
    tx = optax.adam(1e-3)
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)

    def step(params, opt_state, x, labels):
        def loss(p):
            logits, _ = nnx.merge(graphdef, p)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    compiled = jax.jit(step).lower(params, opt_state, x, labels).compile()
    mem = compiled.memory_analysis()  # XLA's numbers for this executable, in bytes
    out = compiled(params, opt_state, x, labels)  # warm-up run
    jax.block_until_ready(out)
    times = []
    for _ in range(CFG["timed_steps"]):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, opt_state, x, labels))
        times.append(time.perf_counter() - t0)
    return dict(temp_mib=mem.temp_size_in_bytes / 2**20, ms=1e3 * float(np.median(times)))


rows = {m: [measure(m, L) for L in CFG["depths"]] for m in METHODS}
print(f"{'method':18s}" + "".join(f"{'L=' + str(L):>18s}" for L in CFG["depths"]))
for m, rs in rows.items():
    print(f"{m:18s}" + "".join(f"{r['temp_mib']:9.3f} MiB {r['ms']:5.1f}ms" for r in rs))

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
markers = dict(zip(METHODS, "os^v"))
for m, rs in rows.items():
    axes[0].plot(CFG["depths"], [r["temp_mib"] for r in rs], marker=markers[m], label=m)
    axes[1].plot(CFG["depths"], [r["ms"] for r in rs], marker=markers[m], label=m)
axes[0].set(xscale="log", xlabel="effective depth L (layers / solver iterations)",
            ylabel="compiled temp memory (MiB)", title="Training-step memory (XLA memory_analysis)")
axes[1].set(xscale="log", xlabel="effective depth L (layers / solver iterations)",
            ylabel="median step time (ms)", title="Training-step time")
for a in axes:
    a.set_xticks(CFG["depths"], [str(L) for L in CFG["depths"]])
    a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a.set_ylim(bottom=0)
    a.legend()
fig.suptitle(f"MLP cell, width {CFG['width']}, batch {CFG['batch']}; backend {BACKEND}")
fig.tight_layout()
plt.show()

# %% [markdown]
# The unrolled network's temp memory grows linearly in L (remat divides the slope, it does not
# remove it); the DEQ's stays flat: its backward pass solves a linear fixed-point problem at `z*`
# instead of replaying the forward iterations. At small L the DEQ costs more (it carries
# Anderson's history). Timings at quick size are dominated by fixed overheads; the timing and
# memory ratios that matter are the ones at large L, measured by `python -m benchmarks.memory_vs_depth`.
#
# ## Device peak memory (GPU/TPU)

# %%
stats = jax.devices()[0].memory_stats()
if stats is None:
    print(f"{BACKEND}: memory_stats() is not available on this backend; use memory_analysis() above.")
else:
    print(f"{BACKEND}: peak bytes in use so far in this process: {stats.get('peak_bytes_in_use', 0) / 2**20:.1f} MiB "
          f"(of {stats.get('bytes_limit', 0) / 2**30:.1f} GiB); a fresh process per method isolates each one's peak.")
