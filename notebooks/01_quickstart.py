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
# # jdeq quickstart: a deep equilibrium model in JAX
#
# A deep equilibrium model (DEQ, Bai, Kolter & Koltun 2019) replaces a stack of layers by **one
# cell** `f` and outputs its **fixed point** `z* = f(z*, x)`, found by a root solver (Anderson,
# Broyden, plain iteration). The backward pass differentiates through `z*` with the implicit
# function theorem, so training memory does not grow with the number of solver iterations.
#
# This notebook: build a cell in Flax (nnx), solve it, look at the solver's convergence, train on
# a small regression task with optax, and compare jdeq's gradient modes.
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
# JAX picks the accelerator it finds (TPU, GPU, else CPU). The sizes below follow it;
# `JDEQ_QUICK=1` in the environment selects the smallest size (used by the test suite).

# %%
import functools

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import jdeq

BACKEND = jax.default_backend().upper()  # "TPU", "GPU" or "CPU"
QUICK = os.environ.get("JDEQ_QUICK") == "1"
SIZE = "quick" if QUICK else ("cpu" if BACKEND == "CPU" else "accelerator")
CFG = {
    "quick": dict(width=32, batch=64, steps=60),
    "cpu": dict(width=64, batch=256, steps=300),
    "accelerator": dict(width=256, batch=1024, steps=1000),
}[SIZE]
print(f"backend: {BACKEND} ({jax.devices()[0].device_kind}), jax {jax.__version__}, jdeq {jdeq.__version__}")
print(f"size: {SIZE} -> {CFG}")

# %% [markdown]
# ## A cell and its fixed point
# `jdeq.models.MLPCell` is `f(z, x) = tanh(W z + U x + b)`; `w_scale` sets about the spectral
# radius of `W` (below 1: the cell is a contraction and the fixed point exists and is unique).
# `jdeq.nnx.DEQ` wraps it: `z, stats = deq(x)` returns `z*` and per-example solver statistics.

# %%
IN = 3
x = jax.random.normal(jax.random.key(0), (CFG["batch"], IN))
y = jnp.sin(x.sum(axis=1, keepdims=True))  # the regression target used below

cell = jdeq.models.MLPCell(IN, CFG["width"], w_scale=0.9, rngs=nnx.Rngs(0))
deq = jdeq.nnx.DEQ(cell, solver=jdeq.Anderson(tol=1e-5, maxiter=60))
z, stats = deq(x)
print("z* shape:", z.shape)
print("iterations per example: mean", float(stats.nsteps.mean()), "max", int(stats.nsteps.max()))
print("relative residual ||f(z)-z||/||f(z)||: max", float(stats.rel_residual.max()))
print("all converged:", bool(stats.converged.all()))
print("check z* = f(z*, x):", float(jnp.abs(cell(z, x) - z).max()))

# %% [markdown]
# ## Convergence of the solvers
# With `trace=True` a solver records the residual of every iteration (per example). Anderson
# acceleration mixes the last few iterates and reaches the tolerance in fewer steps than
# plain fixed-point iteration. (Each curve covers the examples still iterating: once an example
# converges it is frozen and leaves the statistics.)

# %%
solvers = {
    "fixed-point iteration": jdeq.FixedPointIteration(tol=1e-5, maxiter=60, trace=True),
    "Anderson (memory 5)": jdeq.Anderson(tol=1e-5, maxiter=60, trace=True),
    "Broyden": jdeq.Broyden(tol=1e-5, maxiter=60, trace=True),
}
fig, ax = plt.subplots(figsize=(6, 4))
for (name, solver), color in zip(solvers.items(), ["C0", "C1", "C2"]):
    _, st = jdeq.nnx.DEQ(cell, solver=solver)(x)
    trace = np.asarray(st.trace)  # (batch, maxiter); NaN after an example has converged
    trace = trace[:, : int(st.nsteps.max())]  # drop the iterations no example ran
    steps = np.arange(1, trace.shape[1] + 1)
    ax.plot(steps, np.nanmedian(trace, axis=0), color=color, label=f"{name} (median; band: min-max)")
    ax.fill_between(steps, np.nanmin(trace, 0), np.nanmax(trace, 0), color=color, alpha=0.15)
    print(f"{name:22s} mean iterations {float(st.nsteps.mean()):5.1f}")
ax.axhline(1e-5, color="k", ls=":", label="tolerance")
ax.set(yscale="log", xlabel="solver iteration", ylabel="relative residual ||f(z)-z|| / ||f(z)||",
       title=f"Forward solve of an MLP cell (width {CFG['width']}, batch {CFG['batch']}, {BACKEND})")
ax.legend()
plt.show()

# %% [markdown]
# ## Train with optax
# A DEQ layer followed by a linear head, trained with Adam through the implicit gradient.
# `nnx.jit` compiles the whole step (solve, backward solve, update).

# %%
class Model(nnx.Module):
    def __init__(self, gradient, rngs):
        cell = jdeq.models.MLPCell(IN, CFG["width"], w_scale=0.5, rngs=rngs)
        self.deq = jdeq.nnx.DEQ(cell, solver=jdeq.Anderson(tol=1e-4), gradient=gradient)
        self.head = nnx.Linear(CFG["width"], 1, rngs=rngs)

    def __call__(self, x):
        z, stats = self.deq(x)
        return self.head(z), stats


def loss_fn(model, x, y):
    pred, stats = model(x)
    return jnp.mean((pred - y) ** 2), stats


@nnx.jit
def train_step(model, opt, x, y):
    (loss, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, x, y)
    opt.update(model, grads)
    return loss, stats.nsteps.mean()


model = Model(jdeq.Implicit(), nnx.Rngs(1))
opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
losses, iters = [], []
for _ in range(CFG["steps"]):
    loss, it = train_step(model, opt, x, y)
    losses.append(float(loss)); iters.append(float(it))
print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; forward iterations {iters[0]:.1f} -> {iters[-1]:.1f}")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(losses, label="training MSE")
ax.set(yscale="log", xlabel="optimizer step", ylabel="mean squared error", title="DEQ training (Implicit gradient)")
ax2 = ax.twinx()
ax2.plot(iters, color="C1", alpha=0.7, label="forward iterations")
ax2.set_ylabel("mean solver iterations per example")
fig.legend(loc="upper right", bbox_to_anchor=(0.88, 0.88))
plt.show()

# %% [markdown]
# ## Gradient modes
# Every mode returns the same `z*`; only the backward pass differs:
# `Implicit` (implicit function theorem, exact at convergence, O(1) memory), `Phantom(steps=k)`
# (backprop through k damped steps from `z*`), `JacobianFree` (one step) and `Unrolled`
# (backprop through every solver iteration, the reference that costs O(iterations) memory).
# Below: the gradient of the trained model's loss with each mode (forward solve to tol 1e-4),
# compared with the implicit gradient of a tight solve (tol 1e-6; cosine similarity and relative
# error).

# %%
graphdef, params, rest = nnx.split(model, nnx.Param, ...)


@functools.partial(jax.jit, static_argnums=(0, 1))  # solvers and gradient modes are hashable configs
def grads_with(gradient, solver, params):
    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        deq = jdeq.nnx.DEQ(m.deq.cell, solver=solver, gradient=gradient)  # same cell, other configs
        z, _ = deq(x)
        return jnp.mean((m.head(z) - y) ** 2)

    g = jax.grad(loss)(params)
    return jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(g)])


tight = jdeq.Anderson(tol=1e-6, maxiter=100)
reference = grads_with(jdeq.Implicit(tol=1e-7, maxiter=200), tight, params)
modes = {
    "Phantom(5)": jdeq.Phantom(steps=5),
    "JacobianFree": jdeq.JacobianFree(),
    "Unrolled": jdeq.Unrolled(),
}
cos, err = {}, {}
for name, gradient in modes.items():
    solver = jdeq.Anderson(tol=1e-4, maxiter=40)
    g = grads_with(gradient, solver, params)
    cos[name] = float(g @ reference / (jnp.linalg.norm(g) * jnp.linalg.norm(reference)))
    err[name] = float(jnp.linalg.norm(g - reference) / jnp.linalg.norm(reference))
    print(f"{name:13s} cosine {cos[name]:.4f}   relative error {err[name]:.2e}")

fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
axes[0].bar(list(cos), list(cos.values()), color="C0")
axes[0].set(ylabel="cosine similarity to reference", ylim=(min(cos.values()) - 0.05, 1.0),
            title="Direction of the gradient")
axes[1].bar(list(err), list(err.values()), color="C3")
axes[1].set(ylabel="relative error (log scale)", yscale="log", title="Size of the error")
for a in axes:
    a.tick_params(axis="x", rotation=20)
fig.suptitle("Gradient modes vs a tight implicit gradient (forward tol 1e-4)")
fig.tight_layout()
plt.show()

# %% [markdown]
# Next: `02_memory_vs_depth` measures the memory claim, `03_arithmetic_depth` the depth study,
# `04_stabilization` Jacobian regularization and the hypersolver.
