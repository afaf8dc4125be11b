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
# # Stabilizing a DEQ: Jacobian regularization, spectral radius, hypersolver
#
# A DEQ's cell is only guaranteed to have a reachable fixed point while it stays contractive:
# the spectral radius `rho` of its Jacobian `df/dz` at `z*` below 1. Training tends to push
# `rho` up, and the solver then needs more and more iterations. Two tools in jdeq:
#
# * **Jacobian regularization** (Bai, Koltun & Kolter, ICML 2021): add `gamma * ||df/dz||_F^2`
#   at `z*` (Hutchinson estimate) to the loss: `jdeq.train.fit(..., jac_reg=jdeq.train.JacReg(gamma=...))`.
# * **Hypersolver** (Bai, Koltun & Kolter, ICLR 2022): a small learned initializer and learned
#   Anderson mixing, trained on the frozen DEQ to reach `z*` in fewer cell evaluations:
#   `jdeq.models.HyperSolver`.
#
# The spectral radius is measured with `jdeq.spectral_radius` (power method, per example).
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
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax
from flax import nnx

import jdeq
from jdeq.data import digits

BACKEND = jax.default_backend().upper()  # "TPU", "GPU" or "CPU"
QUICK = os.environ.get("JDEQ_QUICK") == "1"
SIZE = "quick" if QUICK else ("cpu" if BACKEND == "CPU" else "accelerator")
CFG = {
    "quick": dict(width=32, steps=80, batch=64, hyper_steps=40),
    "cpu": dict(width=64, steps=600, batch=64, hyper_steps=500),
    "accelerator": dict(width=256, steps=2000, batch=128, hyper_steps=1000),
}[SIZE]
print(f"backend: {BACKEND} ({jax.devices()[0].device_kind}), jax {jax.__version__}, jdeq {jdeq.__version__}")
print(f"size: {SIZE} -> {CFG}")

# %% [markdown]
# ## Data and model
# sklearn's 8x8 digits (shipped with scikit-learn, nothing downloaded), flattened to 64 inputs.
# The cell `tanh(W z + U x + b)` starts near the edge of contraction (`w_scale=1.0`), where the
# effect of training on `rho` shows quickly.

# %%
data = digits.load(flat=True)
IN, CLASSES = 64, digits.NUM_CLASSES
print("train", data.train["inputs"].shape, "test", data.test["inputs"].shape)


class Classifier(nnx.Module):
    def __init__(self, rngs):
        cell = jdeq.models.MLPCell(IN, CFG["width"], w_scale=1.0, rngs=rngs)
        self.deq = jdeq.nnx.DEQ(cell, solver=jdeq.Anderson(tol=1e-3, maxiter=40), gradient=jdeq.Implicit())
        self.head = nnx.Linear(CFG["width"], CLASSES, rngs=rngs)

    def __call__(self, x):
        z, stats = self.deq(x)
        return self.head(z), stats


def loss_with_rho(model, batch):
    """Cross-entropy, plus the spectral radius of df/dz at z* as a logged metric (no gradient)."""
    z, stats = model.deq(batch["inputs"])
    logits = model.head(z)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    rho = jdeq.spectral_radius(lambda z, x: model.deq.cell(z, x), z, batch["inputs"], jax.random.key(0), iters=20)
    metrics = {"loss": loss, "accuracy": jnp.mean(logits.argmax(-1) == batch["labels"]),
               "spectral_radius": jnp.mean(rho), **jdeq.train.solver_metrics(stats)}
    return loss, metrics

# %% [markdown]
# ## Training with and without Jacobian regularization
# Same initialization, same batches; `fit` logs the metrics of `loss_with_rho` (spectral radius,
# forward iterations) every few steps.

# %%
variants = {"baseline": None, "Jacobian reg. (gamma=1)": jdeq.train.JacReg(gamma=1.0)}
models, histories, test_scores = {}, {}, {}
for name, jac_reg in variants.items():
    models[name] = Classifier(nnx.Rngs(0))
    histories[name] = jdeq.train.fit(models[name], optax.adam(3e-3), data.train, steps=CFG["steps"],
                                     batch_size=CFG["batch"], loss_fn=loss_with_rho, jac_reg=jac_reg,
                                     log_every=max(1, CFG["steps"] // 20), progress=False)
    test_scores[name] = jdeq.train.evaluate(models[name], data.test, batch_size=512, loss_fn=loss_with_rho)
    s = test_scores[name]
    print(f"{name:24s} test acc {s['accuracy']:.3f}  forward iterations {s['nsteps']:.1f}  "
          f"spectral radius {s['spectral_radius']:.2f}")

fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for name, h in histories.items():
    steps = [r["step"] for r in h.train]
    axes[0].plot(steps, [r["spectral_radius"] for r in h.train], label=name)
    axes[1].plot(steps, [r["nsteps"] for r in h.train], label=name)
    axes[2].plot(steps, [r["loss"] for r in h.train], label=name)
axes[0].axhline(1.0, color="k", ls=":", label="rho = 1 (edge of contraction)")
axes[0].set(xlabel="training step", ylabel="spectral radius of df/dz at z*", title="Spectral radius (train batch)")
axes[1].set(xlabel="training step", ylabel="Anderson iterations per example", title="Forward solver cost")
axes[2].set(xlabel="training step", ylabel="cross-entropy (task loss)", title="Training loss")
axes[0].set_ylim(0.3, 1.05)
for a in axes:
    a.legend(fontsize=8, loc="lower left" if a is axes[0] else "best")
fig.suptitle(f"DEQ on digits, width {CFG['width']}; backend {BACKEND}")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Hypersolver
# Trained on the frozen baseline DEQ (its weights do not change), then `calibrate` measures the
# mean number of cell evaluations to reach the tolerance on held-out inputs for plain Anderson,
# the learned initializer, the learned mixer and both, and keeps the cheapest.

# %%
deq = models["baseline"].deq
hyper = jdeq.models.HyperSolver(IN, CFG["width"], rngs=nnx.Rngs(1))
x_train, x_test = jnp.asarray(data.train["inputs"]), jnp.asarray(data.test["inputs"])
hyper_losses = hyper.fit(deq, x_train, steps=CFG["hyper_steps"], batch_size=64, unroll=8)
nfe = hyper.calibrate(deq, x_test[:256], tol=1e-3, maxiter=40)
print("mean evaluations to tol 1e-3:", {k: round(v, 2) for k, v in nfe.items()})
print("kept: initializer", hyper.use_init, "| mixer", hyper.use_mixer)

fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
axes[0].plot(hyper_losses, label="hypersolver training loss")
axes[0].set(xlabel="hypersolver step", ylabel="mean log residual + init. regression",
            title="Hypersolver training")
axes[0].legend()
axes[1].bar(list(nfe), list(nfe.values()), color=["C0", "C1", "C2", "C3"])
axes[1].set(ylabel="mean cell evaluations per example", xlabel="solver (learned parts switched on)",
            title="Cost to reach tol 1e-3 (held-out inputs)")
fig.tight_layout()
plt.show()

# %% [markdown]
# At the larger sizes the regularized model keeps `rho` lower and needs fewer iterations, at some
# cost in accuracy; the repository's `python -m benchmarks.stabilization` compares more tools
# (spectral and weight norm, dropout, fixed-point correction) with numbers in the README.
