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
# # Depth study on symbolic arithmetic expressions
#
# Expressions such as `3+(4*(2-7))` are tokenized; the label is their value mod 10. Deeper
# nesting needs more sequential computation, which makes them a test bed for "depth": does a DEQ,
# whose depth is the number of solver iterations, use extra iterations where an explicit network
# of fixed depth cannot? This notebook runs a small version of `python -m
# jdeq.experiments.arithmetic` with the library's own pieces: the data (`jdeq.data.arithmetic`),
# the models (`jdeq.experiments.arithmetic.build_model`: a weight-tied transformer cell as a DEQ or
# unrolled L times) and the training loop (`jdeq.train.fit` / `predict`).
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
# `JDEQ_QUICK=1` in the environment selects the smallest size (used by the test suite; at that
# size the models barely train, so the numbers only show that everything runs). The `cpu` size is
# `jdeq.experiments.arithmetic.QUICK` (minutes on 2 cores), the accelerator size is `FULL`'s task
# and width (32 tokens, nesting depth <= 7) with 20k examples and 3000 steps.

# %%
import dataclasses

import jax
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optax

import jdeq
from jdeq.data import arithmetic as A
from jdeq.experiments import arithmetic as E

BACKEND = jax.default_backend().upper()  # "TPU", "GPU" or "CPU"
QUICK = os.environ.get("JDEQ_QUICK") == "1"
SIZE = "quick" if QUICK else ("cpu" if BACKEND == "CPU" else "accelerator")
CFG = {
    "quick": dataclasses.replace(E.QUICK, n_train=1000, n_test=300, features=16, num_heads=2, steps=150, lr=1e-2,
                                 batch_size=64, deq_maxiter=12, eval_batch_size=300),
    "cpu": E.QUICK,
    # the full study's task and width, with fewer examples and steps (minutes, not hours)
    "accelerator": dataclasses.replace(E.FULL, n_train=20_000, n_test=2000, steps=3000),
}[SIZE]
UNROLLED = 4  # depth of the weight-tied unrolled baseline
BUDGETS = (1, 2, 4, 8, 16, 32) if QUICK else CFG.test_maxiters  # test-time solver budgets
print(f"backend: {BACKEND} ({jax.devices()[0].device_kind}), jax {jax.__version__}, jdeq {jdeq.__version__}")
print(f"size: {SIZE}: {CFG.length} tokens, depth <= {CFG.max_depth}, {CFG.n_train} train / {CFG.n_test} test, "
      f"width {CFG.features}, {CFG.steps} steps")

# %% [markdown]
# ## Data

# %%
data = A.generate(CFG.n_train + CFG.n_test, length=CFG.length, max_depth=CFG.max_depth, seed=CFG.data_seed)
train, test = A.train_test_split(data, CFG.n_test, seed=CFG.data_seed)
for i in range(3):
    print(f"{train.text[i]:>12s} = {train.labels[i]} (mod 10), nesting depth {train.depth[i]}")
majority = float(np.mean(test.labels == np.bincount(train.labels).argmax()))
print("majority-class accuracy:", round(majority, 3))

# %% [markdown]
# ## Train a DEQ and the same cell unrolled
# `"deq"` is the weight-tied transformer cell solved by Anderson (phantom gradient, as in the
# study); `"unrolled-4"` applies the same kind of cell 4 times. Both have the same parameters.

# %%
def optimizer(cfg):
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(1, cfg.steps // 20), cfg.steps, cfg.lr / 20)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))


models, histories = {}, {}
for kind in ("deq", f"unrolled-{UNROLLED}"):
    models[kind] = E.build_model(kind, CFG, seed=0)
    histories[kind] = jdeq.train.fit(models[kind], optimizer(CFG), train.arrays(), steps=CFG.steps,
                                     batch_size=CFG.batch_size, log_every=max(1, CFG.steps // 10), progress=False)
    print(f"{kind:11s} {jdeq.train.count_params(models[kind])} parameters, "
          f"final train loss {histories[kind].train[-1]['loss']:.3f}")

# %% [markdown]
# ## Accuracy per nesting depth, and test-time compute
# `jdeq.train.predict(model, tokens, maxiter=k)` runs the DEQ with a test-time budget of `k`
# iterations (a run-time value: one compilation for every `k`). The unrolled net can be run at
# other depths too (its cell is weight-tied), but it was trained for one.

# %%
def correct_of(model, **kw):
    logits, stats = jdeq.train.predict(model, test.tokens, batch_size=CFG.eval_batch_size, **kw)
    return logits.argmax(-1) == test.labels, stats


depths = np.unique(test.depth)
per_depth = {}
for kind, model in models.items():
    ok, _ = correct_of(model)
    per_depth[kind] = [ok[test.depth == d].mean() for d in depths]
    print(f"{kind:11s} accuracy {ok.mean():.3f}  per depth " + " ".join(f"{a:.3f}" for a in per_depth[kind]))

deq_curve = [correct_of(models["deq"], maxiter=k)[0].mean() for k in BUDGETS]
unrolled = models[f"unrolled-{UNROLLED}"]
unrolled_curve = []
for k in BUDGETS:
    unrolled.core.depth = k  # the same weight-tied cell, applied k times
    unrolled_curve.append(correct_of(unrolled)[0].mean())
unrolled.core.depth = UNROLLED

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
w = 0.8 / len(per_depth)
for i, (kind, accs) in enumerate(per_depth.items()):
    axes[0].bar(depths + (i - (len(per_depth) - 1) / 2) * w, accs, width=w, label=kind)
axes[0].axhline(majority, color="k", ls=":", label="majority class")
axes[0].set(xticks=depths, xlabel="nesting depth of the expression", ylabel="test accuracy",
            title="Accuracy per depth")
axes[1].plot(BUDGETS, deq_curve, "o-", label="DEQ: test-time solver budget")
axes[1].plot(BUDGETS, unrolled_curve, "s--", label=f"unrolled (trained at depth {UNROLLED}) run at depth k")
axes[1].axvline(CFG.deq_maxiter, color="C0", alpha=0.3, label="DEQ training budget")
axes[1].axhline(majority, color="k", ls=":", label="majority class")
axes[1].set(xscale="log", xlabel="iterations / layers at test time (k)", ylabel="test accuracy",
            title="Test-time compute")
for a in axes:
    a.legend(fontsize=8)
fig.suptitle(f"Arithmetic mod 10, {CFG.length} tokens, {CFG.steps} training steps; backend {BACKEND}")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Convergence vs accuracy
# Does a solve that converged (small residual at exit) give a correct answer more often? Left:
# accuracy of the test examples grouped by their relative residual at exit (quantile bins).
# Right: the solver's residual per iteration for a few examples (`trace=True`).

# %%
ok, stats = correct_of(models["deq"])
res = np.asarray(stats.rel_residual)
edges = np.unique(np.quantile(res, np.linspace(0, 1, 5)))
which = np.clip(np.searchsorted(edges, res, side="right") - 1, 0, len(edges) - 2)
centers = [np.sqrt(edges[i] * edges[i + 1]) for i in range(len(edges) - 1)]
bin_acc = [ok[which == i].mean() if (which == i).any() else np.nan for i in range(len(edges) - 1)]
print(f"converged: {np.mean(stats.converged):.2f}; accuracy converged {ok[stats.converged].mean() if stats.converged.any() else float('nan'):.3f}, "
      f"not converged {ok[~stats.converged].mean() if (~stats.converged).any() else float('nan'):.3f}")

deq = models["deq"]
core = deq.core  # the same cell in a DEQ whose solver records its residual trace
deq.core = jdeq.nnx.DEQ(core.cell, solver=dataclasses.replace(core.solver, trace=True, maxiter=32),
                        gradient=core.gradient)
_, traced = jdeq.train.predict(deq, test.tokens[:16], batch_size=16)
deq.core = core

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
axes[0].plot(centers, bin_acc, "o-", label="accuracy in residual bin")
axes[0].axvline(CFG.deq_tol, color="C2", ls="--", label=f"solver tolerance {CFG.deq_tol:g}")
axes[0].axhline(majority, color="k", ls=":", label="majority class")
axes[0].set(xscale="log", xlabel="relative residual at exit ||f(z)-z|| / ||f(z)||", ylabel="test accuracy",
            title="Accuracy vs residual")
for row in np.asarray(traced.trace):
    axes[1].plot(np.arange(1, len(row) + 1), row, color="C0", alpha=0.4)
axes[1].plot([], [], color="C0", label="one test example")
axes[1].axhline(CFG.deq_tol, color="C2", ls="--", label="tolerance")
axes[1].set(yscale="log", xlabel="solver iteration", ylabel="relative residual", title="Solver trajectories")
axes[0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
for a in axes:
    a.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The full study (more seeds, an untied transformer and an LSTM of matched size, depth
# extrapolation, DEQs trained with tiny budgets) is `python -m jdeq.experiments.arithmetic
# --quick` on a CPU and `python -m jdeq.experiments.arithmetic` on an accelerator; its results are
# in the repository's README.
