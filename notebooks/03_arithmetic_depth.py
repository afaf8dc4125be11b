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
# Expressions such as `3-(4+(7-2)-5)+1` are tokenized; the label is their exact value, kept in
# [0, 9]. Every expression has the same digits and operators count; only the nesting depth varies,
# and with `+`/`-` only, the nesting is what makes it hard: a digit's sign is the product of the
# signs in front of the groups around it. Does a DEQ, whose depth is its number of solver
# iterations, use extra iterations where an explicit net of fixed depth cannot? This notebook runs
# a small version of `python -m jdeq.experiments.arithmetic` with the library's pieces: the data
# (`jdeq.data.arithmetic`), the study's models (`jdeq.experiments.arithmetic.build_model`: a
# GRU update reading the left neighbour's state and the token, as a DEQ or unrolled L times) and
# `jdeq.train.fit`.
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
# `JDEQ_QUICK=1` in the environment selects a tiny size (used by the test suite: the models barely
# train, the numbers only show that everything runs). Otherwise the study's own settings
# (`jdeq.experiments.arithmetic.FULL`) with one seed.

# %%
import dataclasses
import functools

import jax
import matplotlib.pyplot as plt
import numpy as np

import jdeq
from jdeq.experiments import arith_measure as M
from jdeq.experiments import arith_study as S
from jdeq.experiments import arithmetic as E

BACKEND = jax.default_backend().upper()  # "TPU", "GPU" or "CPU"
QUICK = os.environ.get("JDEQ_QUICK") == "1"
CFG = dataclasses.replace(E.QUICK, steps=60, n_train=1024, n_test=100) if QUICK else dataclasses.replace(E.FULL, seeds=(0,))
print(f"backend: {BACKEND} ({jax.devices()[0].device_kind}), jax {jax.__version__}, jdeq {jdeq.__version__}")
print(f"{CFG.operands} digits, trained on depth <= {CFG.train_max_depth}, tested up to {CFG.max_depth}; "
      f"{CFG.n_train} train examples, width {CFG.features}, {CFG.steps} steps")

# %% [markdown]
# ## Data

# %%
sets = E.data(CFG)
train, test = sets["train"], sets["test"]
for i in range(0, len(test), len(test) // 4):
    print(f"{test.text[i]:>24s} = {test.labels[i]}, nesting depth {test.depth[i]}")
majority = float(np.mean(test.labels == np.bincount(train.labels).argmax()))
print("majority-class accuracy:", round(majority, 3))

# %% [markdown]
# ## Train a DEQ and the same cell unrolled
# `"deq"` is the cell solved by plain iteration (its equilibrium is a GRU read left to right,
# reached in as many steps as the expression has tokens) with the implicit gradient;
# `f"unrolled-{L}"` applies the same cell L times. Both have the same parameters.

# %%
L = CFG.unrolled_depth
models = {}
for kind in ("deq", f"unrolled-{L}"):
    models[kind] = S.build_model(kind, CFG, seed=0)
    loss = jdeq.train.classification_loss if kind == "deq" else functools.partial(jdeq.train.classification_loss, depth=L)
    hist = jdeq.train.fit(models[kind], S.optimizer(CFG, kind), train.arrays(), steps=CFG.steps,
                          batch_size=CFG.batch_size, loss_fn=loss, log_every=max(1, CFG.steps // 10), progress=False)
    print(f"{kind:12s} {jdeq.train.count_params(models[kind])} parameters, final train loss {hist.train[-1]['loss']:.3f}")

# %% [markdown]
# ## Accuracy per depth, and test-time compute
# The DEQ gets a test-time budget of `k` solver iterations (a run-time value: no recompile); the
# unrolled net is run `k` layers deep (its cell is weight-tied, but it was trained at depth L).

# %%
KS = (1, 2, 4, 8, 16, 32, 64)
depths = np.unique(test.depth)
curves = {}
for kind, model in models.items():
    curves[kind] = []
    for k in KS:
        logits, _ = M.evaluate(model, test.tokens, **({"maxiter": k} if kind == "deq" else {"depth": k}))
        ok = logits.argmax(-1) == test.labels
        curves[kind].append([ok[test.depth == d].mean() for d in depths])
curves = {k: np.array(v) for k, v in curves.items()}

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
for ax, (kind, c) in zip(axes, curves.items()):
    for j, d in enumerate(depths):
        ax.plot(KS, c[:, j], "o-" if d <= CFG.train_max_depth else "s--", label=f"depth {d}")
    ax.axhline(majority, color="k", ls=":", lw=0.8)
    ax.set(xscale="log", xlabel="test-time iterations / layers k", ylabel="accuracy", title=kind)
    ax.legend(fontsize=7)
fig.suptitle("dashed: depths never seen in training")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Path independence and convergence
# The AA score (Anil et al. 2022): solve each input again, starting from another input's fixed
# point; the cosine similarity to its own fixed point is 1 for a path-independent model.

# %%
deq = models["deq"]
aa, same = M.aa_score(deq, test.tokens, maxiter=64)
logits, stats = M.evaluate(deq, test.tokens, maxiter=64)
ok = logits.argmax(-1) == test.labels
for d in depths:
    m = test.depth == d
    print(f"depth {d}: AA {aa[m].mean():.3f}, solver steps {stats.nsteps[m].mean():5.1f}, "
          f"converged {stats.converged[m].mean():.2f}, accuracy {ok[m].mean():.3f}")
print("plain-iteration trajectories:", M.trajectory_kinds(deq, test.tokens[:200], steps=64))

# %% [markdown]
# The whole study (3 seeds, the phantom and JFB gradients, DEQs trained with budgets 2/4/8, an
# untied transformer and an LSTM of matched size) is `python -m jdeq.experiments.arithmetic`; its
# results are in `docs/arithmetic/` and summarized in the repository's README.
