"""jdeq's default training step against its peers, at equal gradient accuracy, side by side.

Run: ``python -m benchmarks.vs_peers`` (``--quick`` for a tiny size). The peers come from the
``peers`` extra (``pip install -e ".[peers]"``: optimistix + lineax, TorchDEQ with CPU PyTorch;
jaxopt is a jdeq dependency). banax needs Python >= 3.12: when a ``python3.12``/``3.13`` from
pyenv runs, the benchmark builds ``.cache/peers312/`` (a venv with the same jax and banax) and
drives banax in a subprocess on the same weights and data (saved to ``.npz``). A peer that cannot
be imported or installed is skipped with a printed reason.

**Problem.** Loss = softmax cross entropy of ``z* @ H`` (``H`` fixed), ``z*`` the fixed point of

- ``mlp-disk``: ``tanh(z W + x U + b)``, width 256, batch 64, inputs of 64 features, ``W`` a
  Gaussian matrix scaled so its spectrum fills a disk of radius ``--radius`` (0.95);
- ``mlp-slow``: the same cell with ``W = Q diag(lam) Q^T``: most eigenvalues in [-0.3, 0.3], four
  between 0.9 and 0.98 (a few slow modes, as trained DEQs have);
- ``conv``: ``tanh(conv3x3(z, K) + x + b)`` on 12 x 12 x 16 maps, batch 32, ``K`` scaled to be
  about 0.9-contractive (jdeq: ``jdeq.models.conv_same``; JAX peers: ``lax.conv_general_dilated``;
  TorchDEQ: ``torch.nn.functional.conv2d`` on NCHW copies of the same arrays).

The gradient is taken w.r.t. the cell's parameters (``W, U, b`` / ``K, b``), jitted (loss +
grad, no optimizer). **Reference:** autodiff through 600 plain iterations in float64. Each
configuration's error is ``||g - g_ref|| / ||g_ref||`` over those parameters.

**Equal accuracy.** jdeq's default (``Anderson()`` + ``Implicit()``, as shipped) sets the
target error ``e0``. Every other configuration gets the loosest tolerance from a sweep (1e-2 ..
1e-7, factors of ~3) whose error is <= ``1.25 e0`` (its backward linear solve, where it has a
tolerance, gets the same one), and a generous ``maxiter`` (500) so the tolerance, not the
budget, stops it. A configuration that never reaches ``1.25 e0`` is timed at its tightest
tolerance and marked.

**Timing.** All configurations are timed in interleaved rounds (``--rounds`` x ``--steps``
calls each, in turn), banax's through its subprocess (the main process waits meanwhile), and
each ratio jdeq / peer is taken per round, then the median. PyTorch runs on 1 thread (see
``vs_torchdeq``); JAX keeps its default threading (both printed).

**jdeq's levers** (its extra rows, ``--no-levers`` drops them): the same default with the
tolerance swept like the peers'; ``FixedPointIteration``; a BiCGSTAB backward;
``stop_fraction=0.9`` (the tail cut); alternating Anderson (:class:`AlternatingAnderson`, mixing
every 2nd or 3rd step); ``Implicit(shine="refine")`` (the backward started from the forward's
inverse-Jacobian estimate); and the batch solved as one problem (one global norm).

**Stopping semantics differ** (printed per row): jdeq stops each example on its own residual
(per example); jaxopt and optimistix-on-the-batch use one global norm over the whole batch;
``optimistix, vmapped`` is a per-example solve under ``jax.vmap`` (the batched while loop runs
until every example has stopped); TorchDEQ uses its own batch rule.

Also measured: solver overhead = step time / (cell cost x evaluations) of jdeq's
FixedPointIteration, Anderson and Broyden on ``mlp-disk`` (training: ``n_eval t_eval + n_vjp
t_vjp``, inference ``n_eval t_eval``, ``t_*`` the per-iteration time of a jitted loop of cell
evaluations / VJPs); beside it each solver's floor from the traffic over its history, ``1 +
passes * t_pass / t_eval`` (``t_pass``: one ``"nmd,nd->nm"`` contraction over a history of its
shape; passes: Anderson 2, Broyden 4); and the compile time of the jdeq MLP training step.

Writes ``results/vs_peers/vs_peers.json`` and ``results/vs_peers/vs_peers.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import jdeq
from benchmarks import _common as C
from jdeq._solvers import anderson_record

TOLS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7)
SLACK = 1.25  # "matches" = error <= SLACK x jdeq default's error
PEER_MAXITER = 500
REF_ITERS = 600
ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / ".cache" / "peers312"


# ----------------------------------------------------------------------------- problems


def make_problem(kind: str, *, quick: bool, radius: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Weights and data (numpy float32) of one cell: ``kind`` in mlp-disk, mlp-slow, conv."""
    rng = np.random.default_rng(seed)
    if kind.startswith("mlp"):
        d, batch, nin = (32, 8, 8) if quick else (256, 64, 64)
        if kind == "mlp-disk":
            w = radius * rng.standard_normal((d, d)) / np.sqrt(d)
        elif kind == "mlp-slow":
            q, _ = np.linalg.qr(rng.standard_normal((d, d)))
            lam = rng.uniform(-0.3, 0.3, d)
            lam[:4] = [0.98, 0.96, 0.93, 0.9]
            w = (q * lam) @ q.T
        else:
            raise ValueError(kind)
        u = rng.standard_normal((nin, d)) / np.sqrt(nin)
        b = 0.1 * rng.standard_normal(d)
        x = rng.standard_normal((batch, nin))
        h = rng.standard_normal((d, 10)) / np.sqrt(d)
        y = rng.integers(0, 10, batch)
        params = {"w": w, "u": u, "b": b}
        desc = f"tanh(zW + xU + b), width {d}, batch {batch}"
    elif kind == "conv":
        c, s, batch = (4, 6, 4) if quick else (16, 12, 32)
        k = rng.standard_normal((3, 3, c, c))
        # scale the kernel so the (periodic) operator norm is ~0.9: max over frequencies
        freq = np.fft.fft2(np.pad(k, ((0, s - 3), (0, s - 3), (0, 0), (0, 0))), axes=(0, 1))
        norm = max(np.linalg.norm(freq[i, j], 2) for i in range(s) for j in range(s))
        k = 0.9 * k / norm
        params = {"k": k, "b": 0.1 * rng.standard_normal(c)}
        x = rng.standard_normal((batch, s, s, c))
        h = rng.standard_normal((c, 10)) / np.sqrt(c)
        y = rng.integers(0, 10, batch)
        desc = f"tanh(conv3x3(z) + x + b) on {s}x{s}x{c}, batch {batch}"
    else:
        raise ValueError(f"unknown cell {kind!r}")
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return {"kind": kind, "params": {k: f32(v) for k, v in params.items()}, "x": f32(x), "h": f32(h),
            "y": np.asarray(y, np.int32), "description": desc}


def _conv(z, k):
    return jax.lax.conv_general_dilated(z, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def cell_fn(kind: str, *, jdeq_conv: bool = True) -> Callable:
    """``f(z, (params, x)) -> z`` in JAX for ``kind`` (batched: leading batch axis)."""
    if kind.startswith("mlp"):
        def f(z, args):
            p, x = args
            return jnp.tanh(z @ p["w"] + x @ p["u"] + p["b"])
    else:
        conv = jdeq.models.conv_same if jdeq_conv else _conv

        def f(z, args):
            p, x = args
            return jnp.tanh(conv(z, p["k"]) + x + p["b"])
    return f


def _loss_from_z(z, h, y):
    if z.ndim > 2:
        z = z.mean(axis=tuple(range(1, z.ndim - 1)))
    logits = z @ h
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def reference_grad(prob) -> dict[str, np.ndarray]:
    """Autodiff through ``REF_ITERS`` plain iterations, in float64."""
    with jax.enable_x64(True):
        f = cell_fn(prob["kind"], jdeq_conv=False)
        p64 = {k: jnp.asarray(v, jnp.float64) for k, v in prob["params"].items()}
        x, h, y = (jnp.asarray(prob["x"], jnp.float64), jnp.asarray(prob["h"], jnp.float64), jnp.asarray(prob["y"]))
        zshape = (x.shape[0], h.shape[0]) if prob["kind"].startswith("mlp") else x.shape

        def loss(p):
            z = jax.lax.fori_loop(0, REF_ITERS, lambda i, z: f(z, (p, x)), jnp.zeros(zshape, jnp.float64))
            return _loss_from_z(z, h, y)

        g = jax.jit(jax.grad(loss))(p64)
        return {k: np.asarray(v) for k, v in g.items()}


def grad_error(g, ref) -> float:
    num = sum(float(np.sum((np.asarray(g[k], np.float64) - ref[k]) ** 2)) for k in ref)
    den = sum(float(np.sum(ref[k] ** 2)) for k in ref)
    return float(np.sqrt(num / den))


# ----------------------------------------------------------------------------- configurations


class Config:
    """One library x solver x backward. ``build(tol)`` -> (grads as numpy, forward iterations);
    ``time(steps)`` -> seconds per call of the built step."""

    name: str
    library: str
    stopping: str
    backward: str
    calibrate = True

    def build(self, tol: float | None):  # pragma: no cover - interface
        raise NotImplementedError

    def time(self, steps: int) -> list[float]:
        return C.time_calls(self._call, steps=steps, warmup=0)

    def close(self):
        pass


class JaxConfig(Config):
    """A JAX configuration: ``make(tol) -> loss(params) -> (loss, fwd_iters)``, jitted."""

    def __init__(self, name, library, stopping, backward, make, prob, *, calibrate=True):
        self.name, self.library, self.stopping, self.backward = name, library, stopping, backward
        self.make, self.prob, self.calibrate = make, prob, calibrate
        self.params = {k: jnp.asarray(v) for k, v in prob["params"].items()}

    def build(self, tol):
        loss = self.make(tol)
        fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
        t0 = time.perf_counter()
        self._fn = fn.lower(self.params).compile()
        self.compile_s = time.perf_counter() - t0
        (_, iters), g = jax.block_until_ready(self._fn(self.params))
        self._call = lambda: self._fn(self.params)
        return {k: np.asarray(v) for k, v in g.items()}, float(iters)


def _z0(prob):
    x, h = prob["x"], prob["h"]
    return jnp.zeros((x.shape[0], h.shape[0]) if prob["kind"].startswith("mlp") else x.shape, jnp.float32)


def jdeq_make(prob, solver_fn, gradient_fn):
    f = cell_fn(prob["kind"])
    x, h, y = (jnp.asarray(prob[k]) for k in ("x", "h", "y"))
    z0 = _z0(prob)

    def make(tol):
        solver = solver_fn(tol)

        def loss(p):
            sol = jdeq.fixed_point(f, z0, (p, x), solver=solver, gradient=gradient_fn(tol))
            return _loss_from_z(sol.value, h, y), jnp.mean(sol.stats.nsteps.astype(jnp.float32))
        return loss
    return make


def jaxopt_make(prob, cls, linsolve, **opts):
    import jaxopt

    f = cell_fn(prob["kind"], jdeq_conv=False)
    x, h, y = (jnp.asarray(prob[k]) for k in ("x", "h", "y"))
    z0 = _z0(prob)
    cls = getattr(jaxopt, cls)
    lin = getattr(jaxopt.linear_solve, linsolve)

    def make(tol):
        solver = cls(fixed_point_fun=lambda z, p: f(z, (p, x)), tol=tol, maxiter=PEER_MAXITER,
                     implicit_diff_solve=functools.partial(lin, tol=tol), **opts)

        def loss(p):
            z, state = solver.run(z0, p)
            return _loss_from_z(z, h, y), state.iter_num.astype(jnp.float32)
        return loss
    return make


def optimistix_make(prob, *, vmapped: bool, linear: str):
    import lineax as lx
    import optimistix as optx

    f = cell_fn(prob["kind"], jdeq_conv=False)
    x, h, y = (jnp.asarray(prob[k]) for k in ("x", "h", "y"))
    z0 = _z0(prob)

    def make(tol):
        if linear == "dense":
            ls = lx.AutoLinearSolver(well_posed=None)  # ImplicitAdjoint's default: LU of the Jacobian
        elif linear == "gmres":
            ls = lx.GMRES(rtol=tol, atol=tol, max_steps=PEER_MAXITER)
        else:
            ls = lx.BiCGStab(rtol=tol, atol=tol, max_steps=PEER_MAXITER)
        adjoint = optx.ImplicitAdjoint(linear_solver=ls)
        solver = optx.FixedPointIteration(rtol=tol, atol=tol)

        def solve(z0, x, p):
            sol = optx.fixed_point(lambda z, a: f(z, a), solver, z0, (p, x), adjoint=adjoint,
                                   max_steps=PEER_MAXITER, throw=False)
            return sol.value, sol.stats["num_steps"]

        def loss(p):
            if vmapped:
                z, n = jax.vmap(lambda z0_, x_: solve(z0_[None], x_[None], p))(z0, x)
                z = z[:, 0]
            else:
                z, n = solve(z0, x, p)
            return _loss_from_z(z, h, y), jnp.mean(n.astype(jnp.float32))
        return loss
    return make


class TorchConfig(Config):
    library = "torchdeq"

    def __init__(self, name, torch, prob, prob_ref, *, f_solver, b_solver, stopping="batch: max per-ex. abs"):
        from torchdeq import get_deq

        self.torch, self.get_deq, self.prob = torch, get_deq, prob
        self.name, self.stopping, self.backward = name, stopping, f"{b_solver} on the adjoint (IFT)"
        self.f_solver, self.b_solver = f_solver, b_solver
        t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
        if prob["kind"].startswith("mlp"):
            self.p = {k: t(v).requires_grad_() for k, v in prob["params"].items()}
            self.x = t(prob["x"])
        else:  # NCHW; conv2d is a correlation with an (O, I, kh, kw) kernel, as lax's
            self.p = {"k": t(prob["params"]["k"].transpose(3, 2, 0, 1)).requires_grad_(),
                      "b": t(prob["params"]["b"]).requires_grad_()}
            self.x = t(prob["x"].transpose(0, 3, 1, 2))
        self.h, self.y = t(prob["h"]), torch.tensor(prob["y"].astype(np.int64))

    def build(self, tol):
        self.deq = self.get_deq(core="sliced", ift=True, f_solver=self.f_solver, b_solver=self.b_solver,
                                f_max_iter=PEER_MAXITER, b_max_iter=PEER_MAXITER, f_tol=tol, b_tol=tol,
                                f_stop_mode="abs", b_stop_mode="abs")
        self._call = self._step
        self._step()
        g = {k: v.grad.detach().numpy().copy() for k, v in self.p.items()}
        if "k" in g:
            g["k"] = g["k"].transpose(2, 3, 1, 0)
        return g, self._iters

    def _step(self):
        torch, p = self.torch, self.p
        F = torch.nn.functional
        for v in p.values():
            v.grad = None
        if "w" in p:
            inj = self.x @ p["u"] + p["b"]
            f = lambda z: torch.tanh(z @ p["w"] + inj)  # noqa: E731
            z0 = torch.zeros(self.x.shape[0], p["w"].shape[0])
        else:
            inj = self.x + p["b"][None, :, None, None]
            f = lambda z: torch.tanh(F.conv2d(z, p["k"], padding=1) + inj)  # noqa: E731
            z0 = torch.zeros_like(self.x)
        z_out, info = self.deq(f, z0)
        z = z_out[-1]
        if z.ndim > 2:
            z = z.mean(dim=(2, 3))
        loss = F.cross_entropy(z @ self.h, self.y)
        loss.backward()
        self._iters = float(np.mean(np.asarray(info["nstep"]))) if "nstep" in info else float("nan")
        return loss


class BanaxConfig(Config):
    """banax in its own Python >= 3.12 venv, driven over a pipe: ``build tol`` / ``time n``."""

    library = "banax"
    stopping = "see banax"

    def __init__(self, name, python, npz, solver, backward):
        self.name, self.backward = name, backward
        self.proc = subprocess.Popen(
            [str(python), "-c", BANAX_WORKER, str(npz), solver], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, cwd=str(ROOT))
        hello = self._ask(None)
        self.stopping = hello["stopping"]

    def _ask(self, cmd):
        if cmd is not None:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"banax worker exited ({self.proc.poll()})")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def build(self, tol):
        out = self._ask(f"build {tol!r}")
        return {k: np.asarray(v, np.float32) for k, v in out["grads"].items()}, out["iters"]

    def time(self, steps):
        return self._ask(f"time {steps}")["times"]

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            self.proc.kill()


BANAX_WORKER = r'''
import json, sys, time
import numpy as np, jax, jax.numpy as jnp
import banax

npz, solver_name = sys.argv[1], sys.argv[2]
d = dict(np.load(npz))
kind = str(d.pop("kind"))
x, h, y = jnp.asarray(d.pop("x")), jnp.asarray(d.pop("h")), jnp.asarray(d.pop("y"))
params = {k[2:]: jnp.asarray(v) for k, v in d.items() if k.startswith("p_")}

def conv(z, k):
    return jax.lax.conv_general_dilated(z, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

def f(z, args):
    p, x = args
    if kind.startswith("mlp"):
        return jnp.tanh(z @ p["w"] + x @ p["u"] + p["b"])
    return jnp.tanh(conv(z, p["k"]) + x + p["b"])

z0 = jnp.zeros((x.shape[0], h.shape[0]) if kind.startswith("mlp") else x.shape, jnp.float32)

def loss_of(z):
    if z.ndim > 2:
        z = z.mean(axis=tuple(range(1, z.ndim - 1)))
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z @ h), y[:, None], axis=1))


import banax.solver as bs
import banax.adjoint as ba
STOPPING = "batch: global rel"

def make(tol):
    S = {"picard": bs.Picard, "anderson": bs.Anderson}[solver_name]
    adj = ba.Implicit(solver=S(rtol=tol, max_steps=500), b_solver=bs.Picard(rtol=tol, max_steps=500))
    def loss(p):
        sol = adj((f, ((p, x),)), z0)
        return loss_of(sol.value), sol.stats.steps.astype(jnp.float32)
    return loss

def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()

say({"stopping": STOPPING})
fn = None
for line in sys.stdin:
    cmd, arg = line.split()
    try:
        if cmd == "build":
            fn = jax.jit(jax.value_and_grad(make(float(arg)), has_aux=True)).lower(params).compile()
            (l, it), g = jax.block_until_ready(fn(params))
            say({"grads": {k: np.asarray(v).tolist() for k, v in g.items()}, "iters": float(it)})
        elif cmd == "time":
            ts = []
            for _ in range(int(arg)):
                t0 = time.perf_counter(); jax.block_until_ready(fn(params)); ts.append(time.perf_counter() - t0)
            say({"times": ts})
    except Exception as e:
        say({"error": f"{type(e).__name__}: {e}"})
'''


# ----------------------------------------------------------------------------- peers available


def _python312_candidates() -> list[Path]:
    """Interpreters >= 3.12 to try, pyenv's real binaries first (its shims may fail)."""
    out: list[Path] = []
    for v in ("3.12", "3.13"):
        out += sorted((Path.home() / ".pyenv" / "versions").glob(f"{v}*/bin/python{v}"))
        out.append(Path(f"/usr/bin/python{v}"))
    return out


def _banax_python() -> tuple[Path | None, str]:
    """The python of a venv with banax (built on first use), or (None, why not)."""
    py = PEER_VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import banax"], capture_output=True).returncode == 0:
        return py, f"banax venv {PEER_VENV.relative_to(ROOT)}"
    base = next((c for c in _python312_candidates()
                 if c.exists() and subprocess.run([str(c), "--version"], capture_output=True).returncode == 0), None)
    if base is None:
        return None, "banax needs Python >= 3.12 and no working python3.12/3.13 was found (pyenv or /usr/bin)"
    try:
        subprocess.run([str(base), "-m", "venv", str(PEER_VENV)], check=True, capture_output=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"jax=={jax.__version__}", "banax"], check=True,
                       capture_output=True, timeout=900)
    except Exception as e:  # noqa: BLE001
        return None, f"could not build the banax venv with {base}: {e}"
    return py, f"banax venv built with {base}"


def available_peers(wanted: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(handles, skipped)``: what imports, and a reason for each peer that does not."""
    have, skipped = {}, {}
    if "jaxopt" in wanted:
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import jaxopt  # noqa: F401
            have["jaxopt"] = C._version("jaxopt")
        except ImportError as e:
            skipped["jaxopt"] = f"not importable ({e})"
    if "optimistix" in wanted:
        try:
            import lineax  # noqa: F401
            import optimistix  # noqa: F401

            have["optimistix"] = f"{C._version('optimistix')} + lineax {C._version('lineax')}"
        except ImportError as e:
            skipped["optimistix"] = f'not installed ({e}); pip install -e ".[peers]"'
    if "torchdeq" in wanted:
        try:
            import torch
            import torchdeq  # noqa: F401

            have["torchdeq"] = torch
        except ImportError as e:
            skipped["torchdeq"] = f'not installed ({e}); pip install -e ".[peers]"'
    if "banax" in wanted:
        py, why = _banax_python()
        if py is None:
            skipped["banax"] = why
        else:
            have["banax"] = py
    return have, skipped


# ----------------------------------------------------------------------------- configurations per cell


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlternatingAnderson(jdeq.Anderson):
    """A lever measured here, not shipped (it did not win side by side): Anderson that mixes
    only on every ``mix_every``-th iteration and takes plain steps in between (the history
    still records every iterate), so that the skipped iterations do not pay for the small
    solve and the mixing. "Alternating" Anderson: Pratapa, Suryanarayana & Pask, J. Comput.
    Phys. 2016; Suryanarayana, Pratapa & Pask, Comput. Phys. Commun. 2019. Built on jdeq's
    solver interface (``init``/``update``) and ``jdeq.Anderson``'s own steps."""

    mix_every: int = 2

    def update(self, state, k, z, fz):
        fs, gs, gram, valid = anderson_record(*state, k, fz, fz - z)  # every step records
        mixed = lambda _: self._mix(fs, gs, gram, valid)  # noqa: E731
        plain = lambda _: z + self.damping * (fz - z)  # noqa: E731
        return jax.lax.cond(k % self.mix_every == 0, mixed, plain, None), (fs, gs, gram)


def jdeq_configs(prob, *, levers: bool) -> list[Config]:
    per = "per example"
    out = [JaxConfig("jdeq Anderson + Implicit (default)", "jdeq", per, "Anderson on the adjoint",
                     jdeq_make(prob, lambda t: jdeq.Anderson(), lambda t: jdeq.Implicit()), prob, calibrate=False)]
    if levers:
        out += [
            JaxConfig("jdeq Anderson + Implicit, tol swept", "jdeq", per, "Anderson on the adjoint",
                      jdeq_make(prob, lambda t: jdeq.Anderson(tol=t, maxiter=PEER_MAXITER), lambda t: jdeq.Implicit()), prob),
            JaxConfig("jdeq FixedPointIteration + Implicit", "jdeq", per, "FPI on the adjoint",
                      jdeq_make(prob, lambda t: jdeq.FixedPointIteration(tol=t, maxiter=PEER_MAXITER),
                                lambda t: jdeq.Implicit()), prob),
            JaxConfig("jdeq Anderson + Implicit(bicgstab)", "jdeq", per, "jaxopt BiCGSTAB (whole batch)",
                      jdeq_make(prob, lambda t: jdeq.Anderson(tol=t, maxiter=PEER_MAXITER),
                                lambda t: jdeq.Implicit(solver="bicgstab", tol=t)), prob),
            JaxConfig("jdeq Anderson + Implicit, stop_fraction 0.9", "jdeq", "90% of examples",
                      "Anderson on the adjoint",
                      jdeq_make(prob, lambda t: jdeq.Anderson(tol=t, maxiter=PEER_MAXITER, stop_fraction=0.9),
                                lambda t: jdeq.Implicit()), prob),
            JaxConfig("jdeq alternating Anderson (mixes every 2nd step) + Implicit", "jdeq", per, "the same on the adjoint",
                      jdeq_make(prob, lambda t: AlternatingAnderson(tol=t, maxiter=PEER_MAXITER, mix_every=2),
                                lambda t: jdeq.Implicit()), prob),
            JaxConfig("jdeq alternating Anderson (mixes every 3rd step) + Implicit", "jdeq", per, "the same on the adjoint",
                      jdeq_make(prob, lambda t: AlternatingAnderson(tol=t, maxiter=PEER_MAXITER, mix_every=3),
                                lambda t: jdeq.Implicit()), prob),
            JaxConfig("jdeq Anderson + Implicit(shine='refine')", "jdeq", per,
                      "Anderson on the adjoint, started from the forward's estimate",
                      jdeq_make(prob, lambda t: jdeq.Anderson(tol=t, maxiter=PEER_MAXITER),
                                lambda t: jdeq.Implicit(shine="refine")), prob),
            JaxConfig("jdeq Anderson, whole batch as one problem", "jdeq", "batch: global rel",
                      "Anderson on the adjoint", _jdeq_whole_batch(prob), prob),
        ]
    return out


def _jdeq_whole_batch(prob):
    f = cell_fn(prob["kind"])
    x, h, y = (jnp.asarray(prob[k]) for k in ("x", "h", "y"))
    z0 = _z0(prob)[None]

    def make(tol):
        solver = jdeq.Anderson(tol=tol, maxiter=PEER_MAXITER)

        def loss(p):
            sol = jdeq.fixed_point(lambda z, a: f(z[0], a)[None], z0, (p, x), solver=solver, gradient=jdeq.Implicit())
            return _loss_from_z(sol.value[0], h, y), jnp.mean(sol.stats.nsteps.astype(jnp.float32))
        return loss
    return make


def peer_configs(prob, have, npz) -> tuple[list[Config], dict[str, str]]:
    out: list[Config] = []
    failed: dict[str, str] = {}
    batch = "batch: global"
    if "jaxopt" in have:
        out += [
            JaxConfig("jaxopt FixedPointIteration + bicgstab", "jaxopt", batch + " abs", "BiCGSTAB (whole batch)",
                      jaxopt_make(prob, "FixedPointIteration", "solve_bicgstab"), prob),
            JaxConfig("jaxopt AndersonAcceleration + bicgstab", "jaxopt", batch + " abs", "BiCGSTAB (whole batch)",
                      jaxopt_make(prob, "AndersonAcceleration", "solve_bicgstab", history_size=5, ridge=1e-5), prob),
            JaxConfig("jaxopt FixedPointIteration + normal_cg (default)", "jaxopt", batch + " abs",
                      "normal-CG (whole batch)", jaxopt_make(prob, "FixedPointIteration", "solve_normal_cg"), prob),
        ]
    if "optimistix" in have:
        out += [
            JaxConfig("optimistix FPI, vmapped + ImplicitAdjoint (dense LU)", "optimistix",
                      "per example (vmap)", "dense LU per example (lineax default)",
                      optimistix_make(prob, vmapped=True, linear="dense"), prob),
            JaxConfig("optimistix FPI + ImplicitAdjoint(lineax GMRES)", "optimistix", batch + " max-norm",
                      "lineax GMRES (whole batch)", optimistix_make(prob, vmapped=False, linear="gmres"), prob),
            JaxConfig("optimistix FPI + ImplicitAdjoint(lineax BiCGStab)", "optimistix", batch + " max-norm",
                      "lineax BiCGStab (whole batch)", optimistix_make(prob, vmapped=False, linear="bicgstab"), prob),
        ]
        if prob["kind"] == "conv":  # a dense Jacobian per example is (s*s*c)^2: still small here
            pass
    if "torchdeq" in have:
        torch = have["torchdeq"]
        for fs in ("anderson", "fixed_point_iter"):
            try:
                out.append(TorchConfig(f"TorchDEQ {fs} + IFT ({fs})", torch, prob, None, f_solver=fs, b_solver=fs))
            except Exception as e:  # noqa: BLE001
                failed[f"TorchDEQ {fs}"] = f"{type(e).__name__}: {e}"
    if "banax" in have:
        for s in ("picard", "anderson"):
            name = f"banax {s.capitalize()} + Implicit (Picard adjoint)"
            try:
                out.append(BanaxConfig(name, have["banax"], npz, s, "Picard on the adjoint (whole batch)"))
            except Exception as e:  # noqa: BLE001
                failed[name] = f"{type(e).__name__}: {e}"
    return out, failed


def _short(e: Exception) -> str:
    """The informative line of an exception (runtime errors from callbacks carry a traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines() if "Error:" in ln and not ln.strip().startswith("File")]
    return f"{type(e).__name__}: " + (lines[-1] if lines else str(e))[:240]


def calibrate(cfg: Config, ref, target: float, tols) -> dict[str, Any]:
    """The loosest ``tol`` of ``tols`` whose gradient error is <= SLACK x target (built, ready to time)."""
    tried = []
    for tol in tols:
        try:
            g, iters = cfg.build(tol)
        except Exception as e:  # noqa: BLE001
            tried.append({"tol": tol, "error": _short(e)})
            continue
        err = grad_error(g, ref)
        tried.append({"tol": tol, "grad_err": err, "fwd_iters": iters})
        if np.isfinite(err) and err <= SLACK * target:
            return {"tol": tol, "grad_err": err, "fwd_iters": iters, "matched": True, "sweep": tried}
    ok = [t for t in tried if "grad_err" in t and np.isfinite(t["grad_err"])]
    if not ok:
        raise RuntimeError(f"no tolerance built ({tried[-1]['error'] if tried else 'none tried'})")
    best = min(ok, key=lambda t: t["grad_err"])
    cfg.build(best["tol"])
    return {**best, "matched": False, "sweep": tried}


# ----------------------------------------------------------------------------- overhead and compile


def _loop_time(body, init, *, n: int, reps: int) -> float:
    fn = jax.jit(lambda z: jax.lax.fori_loop(0, n, lambda i, z: body(z), z))
    jax.block_until_ready(fn(init))
    return min(C.time_calls(lambda: fn(init), steps=reps, warmup=0)) / n


# Passes over a solver's (batch, memory, dim) history that one step needs at least: Anderson's
# new Gram row (over the residuals) and its mix (over the f(z_i)); Broyden's B g and dz^T B, each
# a contraction over one buffer and a combination of the other.
HISTORY_PASSES = {"FixedPointIteration": 0, "Anderson": 2, "Broyden": 4}


def history_pass_time(z, memory: int, *, reps: int) -> float:
    """Seconds for one pass over a ``(batch, memory, dim)`` history: the row contraction
    ``<h_i, z>`` the solvers use (``"nmd,nd->nm"``), net of the loop's own cost."""
    hist = jnp.broadcast_to(z[:, None, :], (z.shape[0], memory, z.shape[1])) * 1.0001
    hi = jax.lax.Precision.HIGHEST
    base = _loop_time(lambda u: u * 0.999 + 1e-3, z, n=50, reps=reps)
    one = _loop_time(lambda u: u * 0.999 + 1e-3 * jnp.einsum("nmd,nd->nm", hist, u, precision=hi)[:, :1],
                     z, n=50, reps=reps)
    return max(one - base, 0.0)


def overhead(prob, *, steps: int, reps: int) -> list[dict[str, Any]]:
    """Step time / cell cost for jdeq's FixedPointIteration, Anderson and Broyden (training and
    inference), and each one's floor from its history traffic: ``1 + passes * t_pass / t_eval``
    (inference), ``t_pass`` the time of one pass over its history (:func:`history_pass_time`)."""
    f = cell_fn(prob["kind"])
    p = {k: jnp.asarray(v) for k, v in prob["params"].items()}
    x, h, y = (jnp.asarray(prob[k]) for k in ("x", "h", "y"))
    z0 = _z0(prob)
    zs = jdeq.fixed_point(f, z0, (p, x), solver=jdeq.Anderson(tol=1e-6, maxiter=200)).value
    g = jnp.ones_like(zs) * 1e-3
    t_eval = _loop_time(lambda z: f(z, (p, x)), zs, n=50, reps=reps)
    t_vjp = _loop_time(lambda u: jax.vjp(lambda z: f(z, (p, x)), zs)[1](u)[0] + g, g, n=50, reps=reps)
    rows = []
    solvers = (("FixedPointIteration", jdeq.FixedPointIteration()), ("Anderson", jdeq.Anderson()),
               ("Broyden", jdeq.Broyden()))
    for name, solver in solvers:
        memory = getattr(solver, "memory", 0)
        t_pass = history_pass_time(zs.reshape(zs.shape[0], -1), memory, reps=reps) if memory else 0.0
        seen: list[float] = []
        cb = lambda s: seen.append(float(np.max(np.asarray(s.nsteps))))  # noqa: E731

        def loss(p, cb=cb, solver=solver):
            sol = jdeq.fixed_point(f, z0, (p, x), solver=solver, gradient=jdeq.Implicit(callback=cb))
            return _loss_from_z(sol.value, h, y), jnp.max(sol.stats.nsteps)

        train = jax.jit(jax.value_and_grad(loss, has_aux=True))
        infer = jax.jit(lambda p, solver=solver: jnp.max(jdeq.fixed_point(f, z0, (p, x), solver=solver).stats.nsteps))
        (_, fwd), _ = jax.block_until_ready(train(p))
        jax.effects_barrier()
        bwd = seen[-1] if seen else float("nan")
        n_inf = float(infer(p))
        times = C.time_alternating({"train": lambda: train(p), "infer": lambda: infer(p)}, rounds=3, steps=steps)
        n_eval, n_vjp = float(fwd) + 1, bwd + 1
        ideal_train = n_eval * t_eval + n_vjp * t_vjp
        rows.append({
            "solver": name, "fwd_iters_batch": float(fwd), "bwd_iters_batch": bwd,
            "train_ms": 1e3 * C.median(times["train"]), "infer_ms": 1e3 * C.median(times["infer"]),
            "t_eval_us": 1e6 * t_eval, "t_vjp_us": 1e6 * t_vjp,
            "overhead_train": C.median(times["train"]) / ideal_train,
            "overhead_infer": C.median(times["infer"]) / (n_inf * t_eval),
            "history_pass_us": 1e6 * t_pass, "history_passes": HISTORY_PASSES[name],
            "floor_infer": 1 + HISTORY_PASSES[name] * t_pass / t_eval,
        })
    return rows


def compile_time(prob) -> float:
    """Seconds to lower + compile jdeq's default MLP training step (loss + grad), fresh."""
    cfg = jdeq_configs(prob, levers=False)[0]
    jax.clear_caches()
    cfg.build(None)
    return cfg.compile_s


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (smoke test)")
    p.add_argument("--cells", default="mlp-disk,mlp-slow,conv")
    p.add_argument("--peers", default="jaxopt,optimistix,torchdeq,banax",
                   help="comma list of peers to try ('' = jdeq alone)")
    p.add_argument("--no-levers", action="store_true", help="skip jdeq's extra configurations")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--radius", type=float, default=0.95)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--no-overhead", action="store_true")
    p.add_argument("--out", default="results/vs_peers")
    return p.parse_args(argv)


COLUMNS = [("config", "configuration", ""), ("stopping", "stopping", ""), ("tol", "tol", ".0e"),
           ("grad_err", "grad err", ".2e"), ("fwd_iters", "fwd it", ".1f"), ("ms", "median ms", ".3f"),
           ("ratio", "jdeq/this", ".2f"), ("note", "", "")]


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 8)
    steps = args.steps or (2 if args.quick else 3)
    tols = TOLS[::2] if args.quick else TOLS
    info = C.machine()
    info["versions"].update({n: C._version(n) for n in ("optimistix", "lineax", "equinox", "torch", "torchdeq")})
    C.flush_print(C.header(info, "vs_peers: jdeq's default training step vs JAX/PyTorch DEQ peers at equal gradient accuracy"))
    threads = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
               "jax_cpu_threads": "XLA default (all cores)", "load_avg": os.getloadavg()}
    wanted = {s for s in args.peers.split(",") if s}
    have, skipped = available_peers(wanted)
    if "torchdeq" in have:
        have["torchdeq"].set_num_threads(args.torch_threads)
        threads["torch_threads"] = have["torchdeq"].get_num_threads()
    info["threads"] = threads
    C.flush_print(f"threads: {threads}")
    C.flush_print("peers: " + ", ".join(f"{k} ({v if isinstance(v, str) else C._version('torch') if k == 'torchdeq' else 'ok'})"
                                        for k, v in have.items()) or "none")
    for k, why in skipped.items():
        C.flush_print(f"skipped {k}: {why}")

    out_dir = Path(args.out)
    cells, tables = {}, []
    for kind in args.cells.split(","):
        prob = make_problem(kind, quick=args.quick, radius=args.radius)
        C.flush_print(f"\n-- cell {kind}: {prob['description']}")
        t0 = time.perf_counter()
        ref = reference_grad(prob)
        C.flush_print(f"reference: {REF_ITERS} plain iterations in float64 ({time.perf_counter() - t0:.1f} s)")
        tmp = tempfile.NamedTemporaryFile(suffix=".npz", delete=False)
        np.savez(tmp.name, kind=kind, x=prob["x"], h=prob["h"], y=prob["y"],
                 **{f"p_{k}": v for k, v in prob["params"].items()})
        cfgs = jdeq_configs(prob, levers=not args.no_levers)
        peers, failed = peer_configs(prob, have, tmp.name)
        cfgs += peers
        base = cfgs[0]
        g, it0 = base.build(None)
        target = grad_error(g, ref)
        C.flush_print(f"target: jdeq default gradient error {target:.2e} ({it0:.1f} mean fwd iterations); "
                      f"peers matched at <= {SLACK} x")
        rows = [{"config": base.name, "library": "jdeq", "stopping": base.stopping, "backward": base.backward,
                 "tol": None, "grad_err": target, "fwd_iters": it0, "matched": True, "note": ""}]
        timed = [base]
        for cfg in cfgs[1:]:
            try:
                cal = calibrate(cfg, ref, target, tols)
            except Exception as e:  # noqa: BLE001
                failed[cfg.name] = _short(e)
                C.flush_print(f"  {cfg.name}: FAILED ({failed[cfg.name]})")
                continue
            C.flush_print(f"  {cfg.name}: tol {cal['tol']:.0e}, grad err {cal['grad_err']:.2e}, "
                          f"fwd iters {cal['fwd_iters']:.1f}{'' if cal['matched'] else '  (never matched the target)'}")
            rows.append({"config": cfg.name, "library": cfg.library, "stopping": cfg.stopping, "backward": cfg.backward,
                         **cal, "note": "" if cal["matched"] else "not matched"})
            timed.append(cfg)
        # interleaved rounds
        per_round = {c.name: [] for c in timed}
        for c in timed:
            c.time(1)  # warm
        for r in range(rounds):
            for c in timed:
                per_round[c.name].append(C.median(c.time(steps)))
        for row in rows:
            ts = per_round[row["config"]]
            row["ms"] = 1e3 * C.median(ts)
            row["ms_rounds"] = [1e3 * t for t in ts]
            ratios = [a / b for a, b in zip(per_round[base.name], ts)]
            row["ratio"] = C.median(ratios)
            row["ratio_spread"] = C.spread(ratios)
        peer_rows = [r for r in rows if r["library"] != "jdeq" and r.get("matched")]
        fastest = min(peer_rows, key=lambda r: r["ms"]) if peer_rows else None
        cells[kind] = {"description": prob["description"], "target_grad_err": target, "rows": rows,
                       "failed": failed, "fastest_peer": fastest and fastest["config"],
                       "ratio_vs_fastest": fastest and fastest["ratio"]}
        for c in timed:
            c.close()
        os.unlink(tmp.name)
        tables.append((kind, prob["description"], rows, fastest, failed))

    over, comp = None, None
    if not args.no_overhead:
        prob = make_problem("mlp-disk", quick=args.quick, radius=args.radius)
        over = overhead(prob, steps=steps, reps=3 if args.quick else 10)
        comp = compile_time(prob)

    result = {"machine": info, "skipped": skipped, "cells": cells, "overhead": over, "compile_s": comp,
              "slack": SLACK, "ref_iters": REF_ITERS, "rounds": rounds, "steps": steps, "quick": args.quick}
    path = C.write_json(out_dir, "vs_peers", result)
    try:
        _plot(out_dir / "vs_peers.png", cells)
    except Exception as e:  # noqa: BLE001 - matplotlib missing: the JSON still stands
        C.flush_print(f"(no PNG: {e})")

    C.flush_print(f"\nwrote {path}")
    for k, why in skipped.items():
        C.flush_print(f"skipped {k}: {why}")
    if over:
        C.flush_print("\nsolver overhead (step / (cell cost x evaluations), mlp-disk, jdeq defaults):")
        C.flush_print(C.format_table(over, [("solver", "solver", ""), ("fwd_iters_batch", "fwd it", ".0f"),
                                            ("bwd_iters_batch", "bwd it", ".0f"), ("train_ms", "train ms", ".2f"),
                                            ("overhead_train", "overhead train", ".2f"), ("infer_ms", "infer ms", ".2f"),
                                            ("overhead_infer", "overhead infer", ".2f"),
                                            ("history_pass_us", "history pass us", ".1f"),
                                            ("floor_infer", "floor infer", ".2f")]))
        C.flush_print("floor infer = 1 + passes over the solver's history per step (FPI 0, Anderson 2, "
                      "Broyden 4) x one pass's time / one cell evaluation's time")
        C.flush_print(f"compile time of jdeq's MLP training step (loss + grad): {comp:.2f} s (target <= 5 s)")
    for kind, desc, rows, fastest, failed in tables:
        C.flush_print(f"\n== {kind}: {desc}; target grad err {rows[0]['grad_err']:.2e}; "
                      f"ratio = jdeq default / this, median of {rounds} interleaved rounds")
        for name, why in failed.items():
            C.flush_print(f"   failed: {name}: {why}")
        C.flush_print(C.format_table(rows, COLUMNS))
        if fastest:
            C.flush_print(f"fastest matched peer: {fastest['config']} ({fastest['ms']:.3f} ms); "
                          f"jdeq / fastest = {fastest['ratio']:.2f} (goal <= 0.5)")
    return result


def _plot(path, cells):
    colors = {"jdeq": "C0", "jaxopt": "C1", "optimistix": "C2", "torchdeq": "C3", "banax": "C4"}
    C.plot_bar_panels(path, {k: c["rows"] for k, c in cells.items()}, value="ms", label="config",
                      color=lambda r: colors.get(r["library"], "C7"), log=True, fontsize=6,
                      xlabel="median ms per loss+grad step (log)",
                      titles={k: f"{k} (grad err ~{c['target_grad_err']:.1e})" for k, c in cells.items()})


if __name__ == "__main__":
    main()
