"""What one solver iteration costs beyond the cell: jdeq's Anderson and Broyden against the other
ways of writing the same step that were tried, side by side (issue 15's "fewer kernels per
iteration" and "mix only where it helps" levers).

Run: ``python -m benchmarks.solver_steps`` (``--quick``: tiny sizes, a smoke test).

**Problem.** The forward solve (inference) of ``vs_peers``'s MLP cells, ``tanh(zW + xU + b)``,
width 256, batch 64: ``mlp-disk`` (spectrum of ``W`` filling a disk of radius 0.95, where no
acceleration beats plain iteration much) and ``mlp-slow`` (four slow modes, where Anderson
halves the iterations). Every variant runs at jdeq's defaults (``tol=1e-4`` relative,
``maxiter=50``) and must reach the shipped Anderson's fixed point (the largest difference is printed).

**Variants** (benchmark-local solvers on jdeq's ``init``/``update`` interface):

- ``Anderson`` as shipped: its history keeps ``f(z_i)``, so the mix is one contraction;
- ``Anderson, z history (two contractions)``: the formulation jdeq shipped before (keeps
  ``z_i``; mixes ``sum a_i z_i + sum a_i g_i``);
- ``Anderson, elementwise Gauss-Jordan``: the small solve as ``a - (col - e_i) row`` updates,
  with no indexed writes;
- ``Anderson, unrolled mix``: the mix as ``memory`` elementwise multiply-adds (one fused
  kernel) instead of a batched contraction;
- ``Anderson, slot-major history``: ``(memory, batch, dim)`` ring buffers instead of
  ``(batch, memory, dim)``;
- ``alternating Anderson`` (mixes every 2nd / 3rd step, ``vs_peers.AlternatingAnderson``);
- ``safeguarded Anderson``: an example whose residual grew after a mixed step takes plain steps
  from then on, and iterations where no moving example mixes skip the solve and the mix;
- ``Broyden`` as shipped (two products with its history per step) and ``Broyden, three
  products``, the formulation before (``B dg`` computed from the history);
- ``FixedPointIteration``, the loop's own cost.

**Timing.** Interleaved rounds (``--rounds`` x ``--steps`` calls of each); per round the ratio
*shipped Anderson / variant* (> 1: the variant is faster), median over rounds; also the time
per batch iteration (median time / batch-wide iterations).

Writes ``results/solver_steps.json`` and ``results/solver_steps.png``; the table is printed
last.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jdeq
from benchmarks import _common as C
from benchmarks.vs_peers import AlternatingAnderson, cell_fn, make_problem
from jdeq._solvers import _HI, _spd_solve, anderson_mix, anderson_record, zeros_history, zeros_rows


# ----------------------------------------------------------------------------- the variants


def _weights(gram, valid, ridge, solve):
    """``jdeq._solvers.anderson_weights`` with the small solve swapped for ``solve``."""
    m = gram.shape[-1]
    vf = valid.astype(gram.dtype)
    h = gram * (vf[:, None] * vf[None, :])
    diag = jnp.diagonal(h, axis1=1, axis2=2)
    lam = ridge * diag + jnp.sqrt(jnp.finfo(gram.dtype).tiny)
    h = h + jnp.eye(m, dtype=gram.dtype) * (lam[:, :, None] * vf + (1.0 - vf))
    x = solve(h, jnp.broadcast_to(vf, diag.shape))
    return x / jnp.sum(x, axis=1, keepdims=True)


def _elementwise_gauss_jordan(a, b):
    """Gauss-Jordan on batched SPD systems with no indexed writes: ``a <- a - (col - e_i) row``."""
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    for i in range(a.shape[-1]):
        piv = a[:, i, i]
        row, bi = a[:, i, :] / piv[:, None], b[:, i] / piv
        col = a[:, :, i] - eye[i]
        a = a - col[:, :, None] * row[:, None, :]
        b = b - col * bi[:, None]
    return b


def _unrolled_mix(alpha, hist):
    return sum(alpha[:, i : i + 1] * hist[:, i] for i in range(hist.shape[1]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZHistoryAnderson(jdeq.Anderson):
    """Keeps ``z_i`` (not ``f(z_i)``) and mixes with two contractions (jdeq's earlier form)."""

    def update(self, state, k, z, fz):
        xs, gs, gram, valid = anderson_record(*state, k, z, fz - z)
        return anderson_mix(_weights(gram, valid, self.ridge, _spd_solve), xs, gs, self.damping), (xs, gs, gram)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ElementwiseGJAnderson(jdeq.Anderson):
    def update(self, state, k, z, fz):
        fs, gs, gram, valid = anderson_record(*state, k, fz, fz - z)
        alpha = _weights(gram, valid, self.ridge, _elementwise_gauss_jordan)
        return jnp.einsum("nm,nmd->nd", alpha, fs, precision=_HI), (fs, gs, gram)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnrolledMixAnderson(jdeq.Anderson):
    """The mix as ``memory`` elementwise multiply-adds (one fused kernel) instead of a batched
    contraction."""

    def update(self, state, k, z, fz):
        fs, gs, gram, valid = anderson_record(*state, k, fz, fz - z)
        alpha = _weights(gram, valid, self.ridge, _spd_solve)
        return _unrolled_mix(alpha, fs), (fs, gs, gram)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlotMajorAnderson(jdeq.Anderson):
    """Ring buffers of shape ``(memory, batch, dim)``."""

    def init(self, z):
        h = jnp.broadcast_to(jnp.zeros_like(z)[None], (self.memory,) + z.shape)
        return h, h, zeros_rows(z, (self.memory, self.memory))

    def update(self, state, k, z, fz):
        fs, gs, gram = state
        m, g = self.memory, fz - z
        slot = (k - 1) % m
        fs = jax.lax.dynamic_update_index_in_dim(fs, fz, slot, axis=0)
        gs = jax.lax.dynamic_update_index_in_dim(gs, g, slot, axis=0)
        row = jnp.einsum("mnd,nd->nm", gs, g, precision=_HI)
        gram = jax.lax.dynamic_update_index_in_dim(gram, row, slot, axis=1)
        gram = jax.lax.dynamic_update_index_in_dim(gram, row, slot, axis=2)
        alpha = _weights(gram, jnp.arange(m) < jnp.minimum(k, m), self.ridge, _spd_solve)
        return jnp.einsum("nm,mnd->nd", alpha, fs, precision=_HI), (fs, gs, gram)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SafeguardedAnderson(jdeq.Anderson):
    """Mixes only where it helps: an example whose residual grew after a mixed step falls back
    to plain steps for good, and the batch skips the small solve and the mix (a ``lax.cond``)
    on iterations where no moving example mixes. (A frozen example's residual repeats exactly:
    it does not count as moving.)"""

    def init(self, z):
        col = zeros_rows(z, ())
        return super().init(z) + (col + jnp.inf, col == 0, col != 0)

    def update(self, state, k, z, fz):
        *hist, prev_res, mixing, mixed_last = state
        g = fz - z
        res = jnp.linalg.norm(g, axis=1)
        mixing = mixing & ~(mixed_last & (res > prev_res))
        fs, gs, gram, valid = anderson_record(*hist, k, fz, g)
        plain = z + self.damping * g
        wanted = mixing & (res != prev_res)
        z_next = jax.lax.cond(
            jnp.any(wanted),
            lambda _: jnp.where(mixing[:, None], self._mix(fs, gs, gram, valid), plain),
            lambda _: plain,
            None,
        )
        return z_next, (fs, gs, gram, res, mixing, wanted)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ThreeProductBroyden(jdeq.Broyden):
    """``B dg``, ``dz^T B`` and ``B g`` each from the history (jdeq's earlier form)."""

    def init(self, z):
        hist, zero = zeros_history(z, self.memory), jnp.zeros_like(z)
        return hist, hist, z, zero, zero, zero

    def update(self, state, k, z, fz):
        us, vs, z_prev, g_prev, u_new, v_new = state
        m = self.memory
        us = jax.lax.dynamic_update_index_in_dim(us, u_new, (k - 3) % m, axis=1)
        vs = jax.lax.dynamic_update_index_in_dim(vs, v_new, (k - 3) % m, axis=1)
        g = fz - z

        def apply(left, right, x):
            coef = jnp.einsum("nmd,nd->nm", right, x, precision=_HI)
            return jnp.einsum("nm,nmd->nd", coef, left, precision=_HI) - x

        dz, dg = z - z_prev, g - g_prev
        vt, bdg = apply(vs, us, dz), apply(us, vs, dg)
        denom = jnp.sum(vt * dg, axis=1)
        ok = (k > 1) & (jnp.abs(denom) > jnp.sqrt(jnp.finfo(z.dtype).tiny))
        u = jnp.where(ok[:, None], (dz - bdg) / jnp.where(ok, denom, 1.0)[:, None], 0.0)
        v = jnp.where(ok[:, None], vt, 0.0)
        bg = apply(us, vs, g) + u * jnp.sum(v * g, axis=1, keepdims=True)
        return z - bg, (us, vs, z, g, u, v)


VARIANTS: dict[str, Any] = {
    "Anderson (shipped)": jdeq.Anderson,
    "Anderson, z history (two contractions)": ZHistoryAnderson,
    "Anderson, elementwise Gauss-Jordan": ElementwiseGJAnderson,
    "Anderson, unrolled mix": UnrolledMixAnderson,
    "Anderson, slot-major history": SlotMajorAnderson,
    "alternating Anderson, every 2nd step": lambda: AlternatingAnderson(mix_every=2),
    "alternating Anderson, every 3rd step": lambda: AlternatingAnderson(mix_every=3),
    "safeguarded Anderson (mixes only where it helps)": SafeguardedAnderson,
    "Broyden (shipped)": jdeq.Broyden,
    "Broyden, three products": ThreeProductBroyden,
    "FixedPointIteration": jdeq.FixedPointIteration,
}


# ----------------------------------------------------------------------------- run


def _solve_fn(prob, solver):
    f = cell_fn(prob["kind"])
    p = {k: jnp.asarray(v) for k, v in prob["params"].items()}
    x = jnp.asarray(prob["x"])
    z0 = jnp.zeros((x.shape[0], p["w"].shape[0]), jnp.float32)
    fn = jax.jit(lambda p: jdeq.fixed_point(f, z0, (p, x), solver=solver))
    return lambda: fn(p)


def run_cell(kind: str, *, quick: bool, rounds: int, steps: int) -> dict[str, Any]:
    prob = make_problem(kind, quick=quick)
    calls, rows = {}, []
    values = {}
    for name, make in VARIANTS.items():
        call = _solve_fn(prob, make())
        sol = jax.block_until_ready(call())
        values[name] = np.asarray(sol.value)
        calls[name] = call
        rows.append({"variant": name, "fwd_iters_mean": float(np.mean(sol.stats.nsteps)),
                     "fwd_iters_batch": int(np.max(sol.stats.nsteps)),
                     "converged": bool(np.all(sol.stats.converged))})
    for r in rows:  # every variant solves the same problem
        r["max_abs_diff_to_shipped"] = float(np.max(np.abs(values[r["variant"]] - values["Anderson (shipped)"])))
    times = C.time_alternating(calls, rounds=rounds, steps=steps)
    base = "Anderson (shipped)"
    for r in rows:
        t = np.asarray(times[r["variant"]])
        per_round = np.asarray(times[base]).reshape(rounds, steps).mean(1) / t.reshape(rounds, steps).mean(1)
        r["ms"] = 1e3 * C.median(t)
        r["us_per_batch_iter"] = 1e6 * C.median(t) / r["fwd_iters_batch"]
        r["ratio"] = float(np.median(per_round))
        r["ratio_q1_q3"] = [float(np.quantile(per_round, 0.25)), float(np.quantile(per_round, 0.75))]
    return {"kind": kind, "description": prob["description"], "rows": rows}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (smoke test)")
    p.add_argument("--cells", default="mlp-disk,mlp-slow")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    C.out_dir_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 9)
    steps = args.steps or (2 if args.quick else 10)
    info = C.machine()
    C.flush_print(C.header(info, "solver_steps: one solver iteration's cost, jdeq's form vs the forms tried"))
    cells = {k: run_cell(k, quick=args.quick, rounds=rounds, steps=steps) for k in args.cells.split(",")}
    doc = {"machine": info, "rounds": rounds, "steps": steps, "cells": cells}
    out = C.write_json(args.out, "solver_steps", doc)
    _plot(out.with_suffix(".png"), cells)
    C.flush_print(f"wrote {out} and {out.with_suffix('.png')}")
    cols = [("variant", "variant", ""), ("fwd_iters_mean", "iters mean", ".1f"), ("fwd_iters_batch", "iters batch", "d"),
            ("max_abs_diff_to_shipped", "max |z - z_Anderson|", ".1e"), ("ms", "median ms", ".3f"),
            ("us_per_batch_iter", "us / batch iter", ".1f"), ("ratio", "Anderson / this", ".2f")]
    for kind, cell in cells.items():
        C.flush_print(f"\n== {kind}: {cell['description']}; forward solve, tol 1e-4 rel; ratio = shipped "
                      f"Anderson / variant, median of {rounds} interleaved rounds of {steps}")
        C.flush_print(C.format_table(cell["rows"], cols))
    return doc


def _plot(path, cells):
    C.plot_bar_panels(path, {k: c["rows"] for k, c in cells.items()}, value="us_per_batch_iter", label="variant",
                      color=lambda r: "C0" if "shipped" in r["variant"] else "C7",
                      xlabel="microseconds per batch iteration (median)")


if __name__ == "__main__":
    main()
