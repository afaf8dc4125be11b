"""jdeq against TorchDEQ (PyTorch, CPU) on the same MLP DEQ: agreement first, then speed.

Run: ``python -m benchmarks.vs_torchdeq`` (needs ``pip install -e ".[compare]"``: PyTorch CPU
and torchdeq; without them it says so and exits cleanly).

Both libraries get the same model, weights and data: the cell ``z' = tanh(W z + U x + b)``
(``jdeq.models.MLPCell``, width 256, inputs of 64 features, batch 64), a linear head, softmax
cross entropy, Adam(1e-3); both solve with Anderson (m = 5, tol 1e-4 on the absolute residual,
at most 50 iterations) forward and backward, with implicit (IFT) gradients. Each library keeps
its own Anderson regularization default (TorchDEQ: ``lam=1e-4`` absolute; jdeq: ``ridge=1e-5``
relative to each stored residual). In PyTorch the injection ``U x + b`` is computed once per
forward, as a TorchDEQ user would write it.

It first prints the relative differences of the fixed points and of every parameter's gradient,
then times training steps (forward + backward + Adam update) of the two in alternation, in
rounds of ``--steps`` steps each, and prints the per-round ratio jdeq / TorchDEQ (median and
spread). PyTorch runs on one thread by default (``--torch-threads``): for these 64 x 256 matrices
it was no faster with two here (14.4 vs 14.2 ms per step on an idle moment), and on a busy
machine its OpenMP threads stall (median 190-360 ms per step with two threads vs 27 ms with
one, measured side by side here). JAX keeps its default threading.
Writes ``results/vs_torchdeq.json`` and ``results/vs_torchdeq.png``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

import jdeq
from jdeq import argtypes as T
from benchmarks import _common as C

HOW_TO_GET = (
    "vs_torchdeq needs PyTorch (CPU) and torchdeq: install them with\n"
    '    pip install -e ".[compare]"\n'
    "(the extra pins torch==2.13.0; on a machine without a local CPU wheel use\n"
    "    pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install torchdeq)."
)
TOL, MAXITER, MEMORY = 1e-4, 50, 5
TIGHT = {"tol": 1e-6, "stop_mode": "rel", "maxiter": 300}


def _import_torch():
    """``(torch, torchdeq)`` or None when either is missing."""
    try:
        import torch
        import torchdeq
        from torchdeq.solver import anderson_solver, register_solver
    except ImportError:
        return None
    # TorchDEQ passes only (max_iter, tol, stop_mode) to its backward solver, so the memory
    # m = 5 is set by registering Anderson with m bound (its public register_solver hook).
    register_solver("anderson_m5", functools.partial(anderson_solver, m=MEMORY))
    return torch, torchdeq


def build_jdeq_step(setting: C.Setting, *, tol=TOL, maxiter=MAXITER, stop_mode="abs") -> C.TrainStep:
    """The jdeq classifier's training step (Anderson forward and backward, implicit gradient)."""
    solver = jdeq.Anderson(memory=MEMORY, tol=tol, maxiter=maxiter, stop_mode=stop_mode)
    return C.make_train_step(setting.model(lambda cell: jdeq.nnx.DEQ(cell, solver=solver, gradient=jdeq.Implicit())))


def build_torch_model(torch, torchdeq, params: dict[str, np.ndarray], *, tol=TOL, maxiter=MAXITER, stop_mode="abs"):
    """The PyTorch twin of the jdeq classifier, with the given weights (numpy, jdeq layout)."""
    nn = torch.nn

    class TorchDEQNet(nn.Module):
        def __init__(self):
            super().__init__()
            width = params["w"].shape[0]
            self.w = nn.Linear(width, width, bias=False)
            self.u = nn.Linear(params["u"].shape[0], width)
            self.head = nn.Linear(width, params["head"].shape[1])
            with torch.no_grad():
                self.w.weight.copy_(torch.from_numpy(params["w"].T.copy()))
                self.u.weight.copy_(torch.from_numpy(params["u"].T.copy()))
                self.u.bias.copy_(torch.from_numpy(params["u_bias"].copy()))
                self.head.weight.copy_(torch.from_numpy(params["head"].T.copy()))
                self.head.bias.copy_(torch.from_numpy(params["head_bias"].copy()))
            self.deq = torchdeq.get_deq(
                f_solver="anderson_m5", b_solver="anderson_m5", f_max_iter=maxiter, b_max_iter=maxiter,
                f_tol=tol, b_tol=tol, f_stop_mode=stop_mode, b_stop_mode=stop_mode, ift=True,
            )

        def forward(self, x, backward_writer=None):
            injection = self.u(x)
            f = lambda z: torch.tanh(self.w(z) + injection)  # noqa: E731
            z0 = torch.zeros(x.shape[0], self.w.weight.shape[0], dtype=x.dtype)
            z_out, info = self.deq(f, z0, backward_writer=backward_writer)
            return self.head(z_out[-1]), z_out[-1], info

    return TorchDEQNet()


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _jdeq_arrays(params) -> dict[str, np.ndarray]:
    """jdeq classifier parameters as numpy arrays under stable names."""
    core = params["core"]["cell"]
    return {
        "w": np.asarray(core["w"]["kernel"][...]),
        "u": np.asarray(core["u"]["kernel"][...]),
        "u_bias": np.asarray(core["u"]["bias"][...]),
        "head": np.asarray(params["head"]["kernel"][...]),
        "head_bias": np.asarray(params["head"]["bias"][...]),
    }


def agreement(torch, ts: C.TrainStep, tnet, x, y) -> dict[str, Any]:
    """Fixed points, losses and gradients of the two at the same weights; backward iterations."""
    (loss_j, stats_j), grads_j = jax.jit(jax.value_and_grad(ts.loss_fn, has_aux=True))(ts.params, x, y)
    z_j = np.asarray(jax.jit(lambda p, x: nnx.merge(ts.graphdef, p).core(x)[0])(ts.params, x))
    bwd_jdeq = _backward_iters_jdeq(ts, x, y)

    xt, yt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)).long()
    bwd_torch: list[float] = []
    tnet.zero_grad()
    logits, z_t, info = tnet(xt, backward_writer=lambda i: bwd_torch.append(float(i["nstep"].float().mean())))
    loss_t = torch.nn.functional.cross_entropy(logits, yt)
    loss_t.backward()
    gj = _jdeq_arrays(grads_j)
    gt = {
        "w": tnet.w.weight.grad.numpy().T, "u": tnet.u.weight.grad.numpy().T, "u_bias": tnet.u.bias.grad.numpy(),
        "head": tnet.head.weight.grad.numpy().T, "head_bias": tnet.head.bias.grad.numpy(),
    }
    all_j = np.concatenate([v.ravel() for v in gj.values()])
    all_t = np.concatenate([gt[k].ravel() for k in gj])
    return {
        "fixed_point_rel_diff": _rel(z_j, z_t.detach().numpy()),
        "loss_jdeq": float(loss_j),
        "loss_torchdeq": loss_t.item(),
        "loss_rel_diff": _rel(loss_j, loss_t.item()),
        "grad_rel_diff": {k: _rel(gj[k], gt[k]) for k in gj},
        "grad_rel_diff_all": _rel(all_j, all_t),
        "fwd_iters_jdeq": float(np.mean(np.asarray(stats_j.nsteps))),
        "fwd_iters_torchdeq": float(info["nstep"].float().mean()),
        "bwd_iters_jdeq": bwd_jdeq,
        "bwd_iters_torchdeq": bwd_torch[-1] if bwd_torch else None,
        "fwd_abs_residual_jdeq": float(np.mean(np.asarray(stats_j.abs_residual))),
        "fwd_abs_residual_torchdeq": float(info["abs_lowest"].mean()),
    }


def _backward_iters_jdeq(ts: C.TrainStep, x, y) -> float | None:
    """Mean iterations of jdeq's backward solve (``Implicit``'s callback), same weights."""
    seen: list[float] = []
    model = nnx.merge(ts.graphdef, ts.params)
    core = model.core  # the same cell and solver, with a gradient that reports its backward solve
    model.core = jdeq.nnx.DEQ(core.cell, solver=core.solver, throw=core.throw,
                              gradient=jdeq.Implicit(callback=lambda s: seen.append(float(np.mean(np.asarray(s.nsteps))))))
    graphdef, params = nnx.split(model)

    def loss(p):
        logits, _ = nnx.merge(graphdef, p)(x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    jax.block_until_ready(jax.jit(jax.grad(loss))(params))
    jax.effects_barrier()
    return seen[-1] if seen else None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.vs_torchdeq", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=T.positive_int, default=10, help="alternating rounds (one ratio each)")
    p.add_argument("--steps", type=T.positive_int, default=10, help="timed training steps per library per round")
    p.add_argument("--warmup", type=T.nonneg_int, default=3)
    p.add_argument("--torch-threads", type=T.nonneg_int, default=1,
                   help="torch.set_num_threads (default 1: at this model size PyTorch is no faster with more, "
                        "and its OpenMP threads collapse on a busy machine; 0 = torch's own choice)")
    p.add_argument("--batch", type=T.positive_int, default=64)
    p.add_argument("--width", type=T.positive_int, default=256)
    p.add_argument("--in-features", type=T.positive_int, default=64)
    C.out_dir_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    """Runs the comparison; returns the JSON document it writes (``{"skipped": ...}`` without torch)."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    mods = _import_torch()
    if mods is None:
        print(HOW_TO_GET, flush=True)
        return {"benchmark": "vs_torchdeq", "skipped": True, "reason": "torch/torchdeq not installed"}
    torch, torchdeq = mods
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    t_start = time.perf_counter()
    info = C.machine()
    info["versions"].update({"torch": torch.__version__, "torchdeq": C._version("torchdeq")})
    info["torch_threads"] = torch.get_num_threads()
    C.flush_print(C.header(info, "jdeq vs TorchDEQ: same MLP DEQ, same weights and data, CPU training step"))
    C.flush_print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), torchdeq {C._version('torchdeq')}")

    setting = C.make_setting("mlp", batch=args.batch, width=args.width, in_features=args.in_features)
    x, y = setting.x, setting.y
    C.flush_print(f"setting: {setting.description}; Anderson(m={MEMORY}, tol={TOL:g}, abs, maxiter={MAXITER}), "
                  "implicit gradients (backward Anderson, same options); Adam(1e-3)")

    # Agreement: at the benchmark's tolerance, and tight (both solves to rel 1e-6) to show that
    # the remaining differences are the solvers' tolerances, not different maths.
    agree = {}
    for name, opts in (("benchmark", {}), ("tight", TIGHT)):
        ts_a = build_jdeq_step(setting, **opts)
        tnet_a = build_torch_model(torch, torchdeq, _jdeq_arrays(ts_a.params), **opts)
        a = agree[name] = agreement(torch, ts_a, tnet_a, x, y)
        C.flush_print(
            f"agreement ({name}: {opts or 'tol 1e-4 abs'}): fixed point rel diff {a['fixed_point_rel_diff']:.2e}, "
            f"loss rel diff {a['loss_rel_diff']:.2e}, gradient rel diff (all params) {a['grad_rel_diff_all']:.2e} "
            + "(" + ", ".join(f"{k} {v:.1e}" for k, v in a["grad_rel_diff"].items()) + "); iterations fwd "
            f"jdeq {a['fwd_iters_jdeq']:.1f} / torchdeq {a['fwd_iters_torchdeq']:.1f}, bwd jdeq "
            f"{a['bwd_iters_jdeq']} / torchdeq {a['bwd_iters_torchdeq']}"
        )
    ts = build_jdeq_step(setting)
    tnet = build_torch_model(torch, torchdeq, _jdeq_arrays(ts.params))

    # Timed training steps, in alternation.
    compiled, _, compile_s = C.compile_with_memory(ts.step, ts.params, ts.opt_state, x, y)
    state = [ts.params, ts.opt_state]

    def jdeq_step():
        params, opt_state, aux = compiled(state[0], state[1], x, y)
        state[0], state[1] = params, opt_state
        return aux

    xt, yt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)).long()
    opt = torch.optim.Adam(tnet.parameters(), lr=1e-3)

    def torch_step():
        opt.zero_grad(set_to_none=True)
        logits, _, _ = tnet(xt)
        loss = torch.nn.functional.cross_entropy(logits, yt)
        loss.backward()
        opt.step()
        return loss

    jt_all, tt_all, ratios = [], [], []
    for r in range(args.rounds):
        jt = C.time_calls(jdeq_step, steps=args.steps, warmup=args.warmup if r == 0 else 0)
        tt = C.time_calls(torch_step, steps=args.steps, warmup=args.warmup if r == 0 else 0)
        jt_all += jt
        tt_all += tt
        ratios.append(C.median(jt) / C.median(tt))
    rs, js, tsp = C.spread(ratios), C.spread(jt_all), C.spread(tt_all)
    elapsed = time.perf_counter() - t_start
    doc = {
        "benchmark": "vs_torchdeq",
        "machine": info,
        "config": {"setting": setting.description, "solver": f"Anderson(m={MEMORY}, tol={TOL}, abs, maxiter={MAXITER})",
                   "gradient": "implicit, backward Anderson (same options)", "rounds": args.rounds,
                   "steps_per_round": args.steps, "optimizer": "Adam(1e-3)"},
        "agreement": agree,
        "jdeq_compile_s": compile_s,
        "jdeq_step_ms": {k: (1e3 * v if k != "n" else v) for k, v in js.items()},
        "torchdeq_step_ms": {k: (1e3 * v if k != "n" else v) for k, v in tsp.items()},
        "jdeq_step_s_all": jt_all,
        "torchdeq_step_s_all": tt_all,
        "ratio_per_round": ratios,
        "ratio_of_fastest_steps": js["min"] / tsp["min"],
        "ratio": rs,
        "target_at_most_0.5": rs["median"] <= 0.5,
        "elapsed_s": elapsed,
    }
    json_path = C.write_json(args.out, "vs_torchdeq", doc)
    png_path = C.plot_lines(
        os.path.join(args.out, "vs_torchdeq.png"),
        {"jdeq": (list(range(1, len(jt_all) + 1)), [1e3 * t for t in jt_all]),
         "TorchDEQ": (list(range(1, len(tt_all) + 1)), [1e3 * t for t in tt_all])},
        xlabel="timed training step (alternating rounds)", ylabel="ms per training step", loglog=False,
        styles={"jdeq": ".-", "TorchDEQ": ".-"},
        title=f"jdeq vs TorchDEQ training step, {setting.description}",
    )
    doc["files"] = [str(json_path), str(png_path)]
    C.flush_print(f"wrote {json_path} and {png_path} ({elapsed:.0f} s)")
    C.flush_print(
        f"target: jdeq / TorchDEQ step time <= 0.5: measured {rs['median']:.3f} "
        f"(rounds: min {rs['min']:.3f}, q1 {rs['q1']:.3f}, q3 {rs['q3']:.3f}, max {rs['max']:.3f}) -> "
        f"{'met' if doc['target_at_most_0.5'] else 'NOT met'}; ratio of the fastest steps {doc['ratio_of_fastest_steps']:.3f}"
    )
    rows = [
        {"lib": "jdeq", "median": 1e3 * js["median"], "q1": 1e3 * js["q1"], "q3": 1e3 * js["q3"],
         "fwd": agree["benchmark"]["fwd_iters_jdeq"], "bwd": agree["benchmark"]["bwd_iters_jdeq"], "n": js["n"]},
        {"lib": "TorchDEQ", "median": 1e3 * tsp["median"], "q1": 1e3 * tsp["q1"], "q3": 1e3 * tsp["q3"],
         "fwd": agree["benchmark"]["fwd_iters_torchdeq"], "bwd": agree["benchmark"]["bwd_iters_torchdeq"], "n": tsp["n"]},
        {"lib": "ratio jdeq/TorchDEQ", "median": rs["median"], "q1": rs["q1"], "q3": rs["q3"], "n": rs["n"]},
    ]
    C.flush_print(C.format_table(rows, [
        ("lib", "", ""), ("median", "median (ms | ratio)", ".3f"), ("q1", "q1", ".3f"), ("q3", "q3", ".3f"),
        ("n", "samples", "d"), ("fwd", "fwd iters", ".1f"), ("bwd", "bwd iters", ".1f"),
    ]))
    return doc


if __name__ == "__main__":
    main()
