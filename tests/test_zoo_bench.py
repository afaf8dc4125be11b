"""benchmarks/zoo.py at tiny size: the script runs end to end, and its GRU baseline learns."""

import json

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import zoo
from jdeq.data import mnist1d
from jdeq.train import batch_indices


def test_zoo_script_runs_tiny(tmp_path, capsys):
    zoo.main(["--tasks", "digits", "--only", "mlp,mondeq-dense", "--seeds", "2", "--steps-scale", "0.02",
              "--out", str(tmp_path)])
    data = json.loads((tmp_path / "zoo.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == {"mlp", "mondeq-dense"}
    for r in rows.values():
        assert r["steps"] == 3 and len(r["accs"]) == 2 and 0.0 <= r["acc_mean"] <= 1.0
        assert r["params"] > 0 and r["memory_MiB"] > 0 and r["step_ms"] > 0
    assert rows["mondeq-dense"]["converged"] == 1.0  # the splitting solver converges by construction
    assert (tmp_path / "zoo.png").exists()
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].split()[1] in ("mlp", "mondeq-dense")  # the table comes last


def test_gru_baseline_leaves_the_chance_plateau():
    """The GRU that read only its last state sat at chance (loss ln 10 = 2.30) after 150 steps;
    reading every state, it learns within a few dozen steps."""
    data = mnist1d.load(num_samples=1000)
    x, y = data.train["inputs"], data.train["labels"]
    model = zoo.GRU(1, 16, 10, length=40, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = []
    for k in range(60):
        idx = batch_indices(len(y), 64, k)
        losses.append(float(step(model, opt, jnp.asarray(x[idx]), jnp.asarray(y[idx]))))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 1.8, losses[-10:]


def test_zoo_recipe_rows_run_tiny(tmp_path, monkeypatch):
    """The recipe rows: pre-training switches graphs after its steps (both steps untimed), the
    Jacobian penalty runs inside the step (on a one-scale MDEQ, quick to compile)."""
    import jdeq

    monkeypatch.setattr(zoo, "_mdeq1d", lambda s: jdeq.models.MDEQClassifier(
        1, 10, widths=(4,), spatial_dims=1, solver=jdeq.Anderson(tol=1e-3, maxiter=3), rngs=nnx.Rngs(s)))
    zoo.main(["--tasks", "mnist1d", "--only", "mdeq+pretrain,mdeq+jacreg", "--seeds", "1", "--steps", "5",
              "--out", str(tmp_path)])
    rows = {r["name"]: r for r in json.loads((tmp_path / "zoo.json").read_text())["rows"]}
    assert set(rows) == {"mdeq+pretrain", "mdeq+jacreg"}
    assert rows["mdeq+pretrain"]["timed_steps"] == 3 and rows["mdeq+jacreg"]["timed_steps"] == 4
    for r in rows.values():
        assert np.isfinite(r["final_loss"]) and r["train_ms"] > 0 and 0.0 <= r["acc_mean"] <= 1.0
