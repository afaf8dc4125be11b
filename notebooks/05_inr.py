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
# # Implicit neural representations with a DEQ, and amortized warm starts
#
# An implicit neural representation (INR) is a network fit to one signal: here an image, as
# the map from a pixel's coordinates in `[-1, 1]^2` to its RGB. A **DEQ-INR** (Huang, Bai &
# Kolter, NeurIPS 2021, "(Implicit)^2") computes each pixel's features as the fixed point of a
# cell: Gaussian Fourier features of the coordinates are injected into `z* = sin(W z* + x)`,
# and a linear readout gives the color (`jdeq.models.DEQINR`).
#
# The same coordinates come back every epoch, so each pixel's solve can start from its fixed
# point of the previous visit instead of from zero: **amortized warm starts**
# (`jdeq.nnx.FixedPointCache`). The weights moved a little since, so the old `z*` is close and
# the solver needs fewer cell evaluations; the fixed point, and the implicit gradient taken at
# it, do not change (up to the solver's tolerance).
#
# With `jdeq.train.fit`: build the model with `num_examples=` (it then holds the cache), put the
# example indices in the data (`data["index"]`) and pass `batch["index"]` to the model in the
# loss function; `fit` keeps the cache in its training state and in its checkpoints.
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
import functools

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import jdeq
from jdeq.data import image

BACKEND = jax.default_backend().upper()  # "TPU", "GPU" or "CPU"
QUICK = os.environ.get("JDEQ_QUICK") == "1"
SIZE = "quick" if QUICK else ("cpu" if BACKEND == "CPU" else "accelerator")
CFG = {
    "quick": dict(side=16, features=24, frequencies=24, steps=60, batch=64),
    "cpu": dict(side=32, features=64, frequencies=64, steps=800, batch=256),
    "accelerator": dict(side=64, features=128, frequencies=128, steps=3000, batch=1024),
}[SIZE]
print(f"backend: {BACKEND} ({jax.devices()[0].device_kind}), jax {jax.__version__}, jdeq {jdeq.__version__}")
print(f"size: {SIZE} -> {CFG}")

# %% [markdown]
# ## The image
# scikit-learn's `china.jpg` (shipped with it, nothing downloaded), center-cropped and
# area-downsampled (`jdeq.data.image.load`). Each pixel is one example: `coords`, `pixels`, `index`.

# %%
data = image.load(CFG["side"])
n = len(data["index"])
print({k: v.shape for k, v in data.items()})
plt.figure(figsize=(3, 3))
plt.imshow(data["pixels"].reshape(CFG["side"], CFG["side"], 3))
plt.title(f"target, {CFG['side']}x{CFG['side']}")
plt.axis("off")
plt.show()

# %% [markdown]
# ## Models at equal parameter count
# The DEQ-INR with and without the warm-start cache, SIREN (sine layers, `omega_0 = 30`) and a
# ReLU MLP on the same Fourier features; the baselines' widths are chosen to match the DEQ's
# number of trainable parameters.

# %%
H, F = CFG["features"], CFG["frequencies"]
solver = jdeq.Anderson(tol=1e-4, maxiter=30)


def closest_width(count, target):
    return min(range(2, 1024), key=lambda w: abs(count(w) - target))


target = 2 * F * H + H + H * H + 3 * H + 3  # injection, W, readout of the DEQ-INR
w_siren = closest_width(lambda w: 3 * w + 2 * (w * w + w) + 3 * w + 3, target)
w_relu = closest_width(lambda w: 2 * F * w + w + w * w + w + 3 * w + 3, target)
builders = {
    "DEQ-INR, warm start": lambda: jdeq.models.DEQINR(H, num_frequencies=F, num_examples=n, solver=solver,
                                                      rngs=nnx.Rngs(0)),
    "DEQ-INR, cold start": lambda: jdeq.models.DEQINR(H, num_frequencies=F, solver=solver, rngs=nnx.Rngs(0)),
    "SIREN": lambda: jdeq.models.SIREN(w_siren, depth=3, rngs=nnx.Rngs(0)),
    "ReLU MLP + Fourier features": lambda: jdeq.models.FourierMLP(w_relu, num_frequencies=F, rngs=nnx.Rngs(0)),
}
for name, build in builders.items():
    print(f"{name:28s} {jdeq.train.count_params(build()):6d} parameters")

# %% [markdown]
# ## Training with `fit`
# The loss passes `batch["index"]` to the model when warm-starting. `fit` logs the training
# batch's loss (shown as PSNR, `-10 log10(MSE)` for colors in `[0, 1]`) and the forward solver's
# evaluations per pixel; the final PSNR is that of the whole image (`evaluate`, every DEQ solved
# from a cold start).


# %%
def mse_loss(model, batch, *, warm):
    rgb, stats = model(batch["coords"], index=batch["index"] if warm else None)
    loss = jnp.mean((rgb - batch["pixels"]) ** 2)
    return loss, {"loss": loss, **jdeq.train.solver_metrics(stats)}


def eval_loss(model, batch):  # the whole image, every DEQ solved from a cold start
    return mse_loss(model, batch, warm=False)


every = max(1, CFG["steps"] // 10)
models, histories, final_psnr = {}, {}, {}
for name, build in builders.items():
    models[name] = build()
    loss_fn = functools.partial(mse_loss, warm=name.endswith("warm start"))
    histories[name] = jdeq.train.fit(models[name], optax.adam(1e-3), data, steps=CFG["steps"],
                                     batch_size=CFG["batch"], loss_fn=loss_fn, log_every=every, progress=False)
    final_psnr[name] = -10 * np.log10(jdeq.train.evaluate(models[name], data, batch_size=n, loss_fn=eval_loss)["loss"])
    print(f"{name:28s} final PSNR {final_psnr[name]:5.2f} dB" +
          (f", forward NFE per pixel over training {np.mean([r['nsteps'] for r in histories[name].train]):.1f}"
           if "nsteps" in histories[name].train[-1] else ""))

# %% [markdown]
# ## Forward cost and the fits

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for name, h in histories.items():
    steps = [r["step"] for r in h.train]
    axes[0].plot(steps, [-10 * np.log10(r["loss"]) for r in h.train], label=name)
    if "nsteps" in h.train[-1]:
        axes[1].plot(steps, [r["nsteps"] for r in h.train], label=name)
axes[0].set(xlabel="training step", ylabel="PSNR of the training batch (dB)", title="Fit")
axes[1].set(xlabel="training step", ylabel="Anderson evaluations per pixel", title="Forward solver cost")
for a in axes:
    a.legend(fontsize=8)
fig.tight_layout()
plt.show()

fig, axes = plt.subplots(1, len(models) + 1, figsize=(3 * (len(models) + 1), 3))
axes[0].imshow(data["pixels"].reshape(CFG["side"], CFG["side"], 3))
axes[0].set_title("target")
for ax, (name, model) in zip(axes[1:], models.items()):
    rgb, _ = model(jnp.asarray(data["coords"]))
    ax.imshow(np.clip(np.asarray(rgb), 0, 1).reshape(CFG["side"], CFG["side"], 3))
    ax.set_title(f"{name}\n{final_psnr[name]:.1f} dB", fontsize=8)
for ax in axes:
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# The warm-started DEQ reaches the same fit as the cold-started one (same fixed points, same
# gradients) with fewer forward cell evaluations per pixel. `python -m benchmarks.inr` in the
# repository runs this comparison with 3 seeds and also reports PSNR against wall time and the
# training step's memory (numbers in `benchmarks/README.md`).
