"""A small checkpointed ``jdeq.train.fit`` run, to be killed and restarted by a parent process.

Used by tests/test_resume.py and benchmarks/kill_resume.py::

    python -m tests._resume_worker CKPT_DIR OUT.npz [--steps 16] [--every 1] [--model deq]

Trains a tiny classifier on fixed random vectors (``--model deq``: a ``jdeq.nnx.DEQ`` of an
``MLPCell`` with plain iteration and the one-step gradient; ``mlp``: no DEQ) with
``optax.adam``, checkpointing into CKPT_DIR every ``--every`` steps and resuming from it when it
holds a checkpoint. It prints ``resumed <step|None>`` once and ``step k`` after every step
(flushed: a parent waits for the first of these before it starts the clock of its kill), and
at the end writes OUT.npz (atomically) with

- ``model_*``: the trained parameters, read from the model;
- ``ckpt_*``: the parameters and optimizer state of the last checkpoint (``fit`` saves at the
  end), read back with jdeq's verified restore: ``fit`` returns no optimizer state, so this is
  how the optimizer state is compared;
- ``losses``: the logged training loss of every step (restored history + new steps).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
import optax
from flax import nnx

import jdeq
from jdeq import train


class Net(nnx.Module):
    """Input (8) -> DEQ of an MLP cell (width 16) or one tanh layer -> 4 logits."""

    def __init__(self, model: str = "deq", seed: int = 0):
        rngs = nnx.Rngs(seed)
        if model == "deq":
            self.core = jdeq.nnx.DEQ(jdeq.models.MLPCell(8, 16, w_scale=0.8, rngs=rngs),
                                     solver=jdeq.FixedPointIteration(tol=1e-4, maxiter=20),
                                     gradient=jdeq.JacobianFree())
        elif model == "mlp":
            self.core = nnx.Linear(8, 16, rngs=rngs)
        else:
            raise ValueError(f"`model` must be 'deq' or 'mlp', got {model!r}.")
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        if isinstance(self.core, jdeq.nnx.DEQ):
            z, stats = self.core(x)
            return self.head(z), stats
        return self.head(jax.numpy.tanh(self.core(x)))


def data(n: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    return {"inputs": x, "labels": np.argmax(x @ rng.normal(size=(8, 4)), -1)}


def optimizer():
    return optax.adam(1e-2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt_dir")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--model", default="deq", choices=["deq", "mlp"])
    p.add_argument("--seed", type=int, default=3)
    a = p.parse_args(argv)

    net = Net(a.model)
    graphdef, params, _ = nnx.split(net, nnx.Param, ...)
    template = jax.tree_util.tree_leaves((params, optimizer().init(params)))

    def report(step, metrics):
        print(f"step {step}", flush=True)

    hist = train.fit(net, optimizer(), data(), steps=a.steps, batch_size=32, seed=a.seed, log_every=1,
                     checkpoint_dir=a.ckpt_dir, checkpoint_every=a.every, progress=False,
                     callback=report)
    print(f"done resumed_from={hist.resumed_from}", flush=True)

    last = train.checkpoint_steps(a.ckpt_dir)[-1]
    ckpt = train.restore_checkpoint(a.ckpt_dir, template, step=last).tree
    arrays = {f"model_{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(nnx.state(net, nnx.Param)))}
    arrays |= {f"ckpt_{i}": np.asarray(x) for i, x in enumerate(ckpt)}
    arrays["losses"] = np.array([r["loss"] for r in hist.train], np.float64)
    arrays["steps"] = np.array([r["step"] for r in hist.train])
    tmp = f"{a.out}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main(sys.argv[1:])
