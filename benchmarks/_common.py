"""What every jdeq benchmark shares: the machine header, the models and data, the jitted
training step, compiled-memory and timing helpers, and JSON / PNG / table writers.

The models are small classifiers around one DEQ (or unrolled) core:

- ``mlp``: ``jdeq.models.MLPCell`` (``z' = tanh(W z + U x + b)``, width 256 by default) on
  ``(batch, 64)`` inputs, a linear head on ``z``;
- ``conv``: :class:`ConvCell` on ``16 x 16 x 32`` maps (``z' = tanh(conv3x3(z) + x)``, the
  injection ``x`` made once by a 3x3 stem conv outside the solve), a linear head on the
  spatially pooled ``z``.

Data are fixed random inputs and labels (nothing is downloaded); the loss is softmax cross
entropy, the optimizer ``optax.adam``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jdeq
from jdeq.models import conv_general_dilated

__all__ = [
    "Classifier",
    "ConvCell",
    "Setting",
    "TrainStep",
    "compile_with_memory",
    "format_table",
    "header",
    "machine",
    "make_setting",
    "make_train_step",
    "peak_bytes",
    "plot_lines",
    "spread",
    "time_alternating",
    "time_calls",
    "write_json",
]

MiB = 2.0**20


# ----------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - a missing package is reported as None
        return None


def machine() -> dict[str, Any]:
    """A description of where the benchmark runs: CPU, cores, JAX backend/devices, versions."""
    devices = jax.devices()
    return {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
        "versions": {n: _version(n) for n in ("jax", "jaxlib", "flax", "optax", "jaxopt", "jdeq", "numpy")},
    }


def header(info: dict[str, Any], title: str) -> str:
    """The lines printed first by every benchmark: what ran, where."""
    v = info["versions"]
    dev = info["devices"][0] + (f" (x{len(info['devices'])})" if len(info["devices"]) > 1 else "")
    return "\n".join(
        [
            f"== {title}",
            f"machine: {info['cpu']}, {info['cpu_cores']} cores; {info['platform']}; python {info['python']}",
            f"backend: {info['backend']} [{dev}]; jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, "
            f"optax {v['optax']}, jdeq {v['jdeq']}",
        ]
    )


# ----------------------------------------------------------------------------- models and data


class ConvCell(nnx.Module):
    """A convolutional DEQ cell on feature maps: ``f(z, x) = tanh(conv3x3(z) + x)``.

    ``x`` is the input injection, already at the state's shape ``(batch, H, W, channels)`` (made
    once outside the solve, so each iteration costs one convolution). The kernel starts with
    standard deviation ``w_scale / sqrt(9 * channels)``, so the cell starts about
    ``w_scale``-contractive.

    Args:
      channels: channels of the state (and of the injection).
      w_scale: initial scale of the kernel.
      dtype: parameter and state dtype.
      rngs: ``nnx.Rngs``.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> cell = ConvCell(8, rngs=nnx.Rngs(0))
      >>> z, stats = jdeq.nnx.DEQ(cell)(jnp.ones((2, 16, 16, 8)))
    """

    def __init__(self, channels: int, *, w_scale: float = 0.5, dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.variance_scaling(w_scale**2, "fan_in", "normal")
        self.conv = nnx.Conv(
            channels, channels, (3, 3), padding="SAME", use_bias=False, kernel_init=init,
            dtype=dtype, param_dtype=dtype, rngs=rngs,
            conv_general_dilated=conv_general_dilated,  # jdeq's: a VJP XLA:CPU runs fast in loops
        )
        self.dtype = dtype

    def __call__(self, z, x):
        return jnp.tanh(self.conv(z) + x)

    def init_z(self, x):
        """Zeros of the state shape (that of the injection ``x``)."""
        return jnp.zeros(x.shape, self.dtype)


class Classifier(nnx.Module):
    """``head(pool(core(stem(x))))``: a DEQ or unrolled ``core`` inside a small classifier.

    ``stem`` (optional) maps inputs to the injection; ``pool`` averages every axis of the state
    but the first and last (identity on ``(batch, features)`` states). Returns ``(logits, stats)``.
    """

    def __init__(self, core: nnx.Module, features: int, classes: int, *, stem=None, rngs: nnx.Rngs):
        self.stem = stem
        self.core = core
        self.head = nnx.Linear(features, classes, rngs=rngs)

    def __call__(self, x, *, maxiter=None):
        if self.stem is not None:
            x = self.stem(x)
        if maxiter is None:
            z, stats = self.core(x)
        else:
            z, stats = self.core(x, maxiter=maxiter)
        if z.ndim > 2:
            z = z.mean(axis=tuple(range(1, z.ndim - 1)))
        return self.head(z), stats


@dataclasses.dataclass(frozen=True)
class Setting:
    """One benchmark model family: how to build its cell (and stem) and its data."""

    name: str
    features: int  # width of the head's input
    x: jax.Array
    y: jax.Array
    make_cell: Callable[[], nnx.Module]
    make_stem: Callable[[], nnx.Module | None]
    classes: int = 10
    description: str = ""

    def model(self, wrap: Callable[[nnx.Module], nnx.Module], seed: int = 1) -> Classifier:
        """The classifier whose core is ``wrap(cell)``; same initial weights for every ``wrap``."""
        return Classifier(wrap(self.make_cell()), self.features, self.classes, stem=self.make_stem(), rngs=nnx.Rngs(seed))


def make_setting(
    name: str, *, batch: int = 64, width: int = 256, in_features: int = 64, channels: int = 32,
    size: int = 16, seed: int = 0,
) -> Setting:
    """``"mlp"`` (width ``width``, inputs ``(batch, in_features)``) or ``"conv"`` (``size x size
    x channels`` maps, inputs ``(batch, size, size, 3)``); fixed random data from ``seed``."""
    kx, ky = jax.random.split(jax.random.key(seed))
    if name == "mlp":
        x = jax.random.normal(kx, (batch, in_features), jnp.float32)
        y = jax.random.randint(ky, (batch,), 0, 10)
        return Setting(
            name="mlp", features=width, x=x, y=y,
            make_cell=lambda: jdeq.models.MLPCell(in_features, width, rngs=nnx.Rngs(seed)),
            make_stem=lambda: None,
            description=f"MLPCell tanh(Wz+Ux+b), width {width}, input {in_features}, batch {batch}",
        )
    if name == "conv":
        x = jax.random.normal(kx, (batch, size, size, 3), jnp.float32)
        y = jax.random.randint(ky, (batch,), 0, 10)
        return Setting(
            name="conv", features=channels, x=x, y=y,
            make_cell=lambda: ConvCell(channels, rngs=nnx.Rngs(seed)),
            make_stem=lambda: nnx.Conv(3, channels, (3, 3), padding="SAME", rngs=nnx.Rngs(seed + 1)),
            description=f"ConvCell tanh(conv3x3(z)+x) on {size}x{size}x{channels}, batch {batch}",
        )
    raise ValueError(f"`name` must be 'mlp' or 'conv', got {name!r}.")


# ----------------------------------------------------------------------------- training step


@dataclasses.dataclass
class TrainStep:
    """A pure training step and its starting state.

    ``step(params, opt_state, x, y) -> (params, opt_state, aux)`` with ``aux`` holding the loss
    and the forward solver's mean iterations / residual; ``infer(params, x) -> (logits, aux)``.
    """

    step: Callable
    infer: Callable
    params: Any
    opt_state: Any
    loss_fn: Callable  # loss_fn(params, x, y) -> (loss, stats)
    graphdef: Any  # nnx.merge(graphdef, params) is the model


def _aux(loss, stats) -> dict[str, jax.Array]:
    return {
        "loss": loss,
        "fwd_iters": jnp.mean(stats.nsteps.astype(jnp.float32)),
        "fwd_iters_max": jnp.max(stats.nsteps),
        "abs_residual": jnp.mean(stats.abs_residual),
        "rel_residual": jnp.mean(stats.rel_residual),
        "converged": jnp.mean(stats.converged.astype(jnp.float32)),
    }


def make_train_step(model: nnx.Module, *, learning_rate: float = 1e-3) -> TrainStep:
    """Loss + grad + optax (Adam) update of ``model`` as one pure function (jit it yourself)."""
    graphdef, params = nnx.split(model)
    tx = optax.adam(learning_rate)

    def loss_fn(params, x, y):
        logits, stats = nnx.merge(graphdef, params)(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, stats

    def step(params, opt_state, x, y):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, _aux(loss, stats)

    def infer(params, x):
        logits, stats = nnx.merge(graphdef, params)(x)
        return logits, _aux(jnp.zeros((), logits.dtype), stats)

    return TrainStep(step=step, infer=infer, params=params, opt_state=tx.init(params), loss_fn=loss_fn,
                     graphdef=graphdef)


# ----------------------------------------------------------------------------- measuring


def compile_with_memory(fn: Callable, *args, **jit_kwargs):
    """Compiles ``jax.jit(fn)`` for ``args``; returns ``(compiled, memory, compile_seconds)``.

    ``memory`` holds XLA's ``memory_analysis()`` in bytes (``temp``, ``argument``, ``output``,
    ``alias``, ``code``), or Nones where the backend reports none.
    """
    t0 = time.perf_counter()
    compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    keys = {"temp": "temp_size_in_bytes", "argument": "argument_size_in_bytes",
            "output": "output_size_in_bytes", "alias": "alias_size_in_bytes",
            "code": "generated_code_size_in_bytes"}
    memory = {k: (int(getattr(ma, a)) if ma is not None and hasattr(ma, a) else None) for k, a in keys.items()}
    return compiled, memory, seconds


def peak_bytes() -> int | None:
    """``peak_bytes_in_use`` of the first device since the process started (None on CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def time_calls(call: Callable[[], Any], *, steps: int, warmup: int = 2) -> list[float]:
    """Seconds per call of ``call()`` (blocked until ready), ``warmup`` calls discarded."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return times


def time_alternating(
    calls: dict[str, Callable[[], Any]], *, rounds: int, steps: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each ``calls[name]()``, timed in alternation: ``rounds`` rounds of
    ``steps`` calls of each, so a busy machine slows every variant alike (compare per round)."""
    for call in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(call())
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            out[name] += time_calls(call, steps=steps, warmup=0)
    return out


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min and max of ``values``."""
    q = np.percentile(np.asarray(values, float), [0, 25, 50, 75, 100])
    return {"min": float(q[0]), "q1": float(q[1]), "median": float(q[2]), "q3": float(q[3]), "max": float(q[4]),
            "n": len(values)}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ----------------------------------------------------------------------------- output


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, jax.Array)):
        return _jsonable(np.asarray(obj).tolist())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json(out_dir: str | os.PathLike, name: str, data: dict) -> Path:
    """Writes ``data`` to ``out_dir/name.json`` (non-finite floats as null); returns the path."""
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    return path


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, plt) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_lines(
    path: str | os.PathLike,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    loglog: bool = True,
    styles: dict[str, str] | None = None,
) -> Path:
    """One line per entry of ``series`` (``label -> (xs, ys)``), saved as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, (xs, ys) in series.items():
        style = (styles or {}).get(label, "o-")
        ax.plot(xs, ys, style, label=label, markersize=4)
    if loglog:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, plt)


def plot_bar_panels(
    path: str | os.PathLike,
    panels: dict[str, Sequence[dict]],
    *,
    value: str,
    label: str,
    color: Callable[[dict], str],
    xlabel: str,
    titles: dict[str, str] | None = None,
    log: bool = False,
    fontsize: int = 7,
) -> Path:
    """One panel of horizontal bars per entry of ``panels`` (``title -> rows``): each row's
    ``row[value]`` labelled ``row[label]``, coloured ``color(row)`` and annotated with its
    ``row["ratio"]``; saved as a PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), dpi=110, squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels.items()):
        ax.barh(range(len(rows)), [r[value] for r in rows], color=[color(r) for r in rows])
        ax.set_yticks(range(len(rows)), [r[label] for r in rows], fontsize=fontsize)
        if log:
            ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_title((titles or {}).get(name, name), fontsize=9)
        for i, r in enumerate(rows):
            ax.text(r[value], i, f" {r['ratio']:.2f}", va="center", fontsize=fontsize)
    return _save(fig, path, plt)


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not np.isfinite(value):
        return "nan"
    return format(value, spec) if spec else str(value)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table. ``columns``: ``(key, title, format spec)``; missing -> ``-``."""
    cells = [[title for _, title, _ in columns]]
    for row in rows:
        cells.append([_fmt(row.get(key), spec) for key, _, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if n else c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def out_dir_arg(parser) -> None:
    """Adds ``--out DIR`` (default ``results``) to an argparse parser."""
    parser.add_argument("--out", default="results", help="folder for the JSON and PNG (default: results)")


def flush_print(*args) -> None:
    print(*args, flush=True)
    sys.stdout.flush()
