"""Implicit neural representations: the image data (jdeq.data.image), the INR models
(jdeq.models.inr: DEQINR with its warm-start cache, SIREN, FourierMLP) and benchmarks/inr.py
in --quick mode."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdeq
from jdeq.data import image
from jdeq.models import DEQINR, SIREN, FourierMLP


def test_downsample_is_the_box_mean_of_the_central_square():
    img = np.arange(4 * 6 * 1, dtype=float).reshape(4, 6, 1)
    out = image.downsample(img, 2)
    square = img[:, 1:5, 0]  # central 4x4
    want = square.reshape(2, 2, 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(out[..., 0], want)
    odd = image.downsample(np.ones((5, 5, 3)), 2)  # uneven boxes still average to the value
    np.testing.assert_allclose(odd, 1.0)


def test_load():
    d = image.load(12)
    assert d["coords"].shape == (144, 2) and d["pixels"].shape == (144, 3)
    assert d["pixels"].min() >= 0 and d["pixels"].max() <= 1 and d["pixels"].std() > 0.05
    np.testing.assert_allclose(d["coords"][13], [np.linspace(-1, 1, 12)[1]] * 2, rtol=1e-6)  # row-major
    np.testing.assert_array_equal(d["index"], np.arange(144))
    assert image.psnr(d["pixels"], d["pixels"]) == float("inf")


def test_bad_input():
    with pytest.raises(ValueError, match="`size`"):
        image.load(0)
    with pytest.raises(ValueError, match="`size`=500 exceeds"):
        image.load(500)
    with pytest.raises(ValueError, match="`name`"):
        image.load(8, name="lena.png")
    with pytest.raises(ValueError, match="`coords` must be \\(batch, 2\\)"):
        DEQINR(8, num_frequencies=4, rngs=nnx.Rngs(0))(jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="`depth`"):
        SIREN(8, depth=0, rngs=nnx.Rngs(0))


def test_parameter_counts_and_frozen_features():
    m = DEQINR(16, num_frequencies=8, num_examples=10, rngs=nnx.Rngs(0))
    assert jdeq.train.count_params(m) == 16 * 16 + 16 + 16 * 16 + 16 * 3 + 3  # B and the cache are not Params
    assert jdeq.train.count_params(FourierMLP(10, num_frequencies=8, rngs=nnx.Rngs(0))) == 16 * 10 + 10 + 110 + 33
    s = SIREN(10, depth=2, rngs=nnx.Rngs(0))
    assert jdeq.train.count_params(s) == 30 + 110 + 33
    first, second = (np.asarray(layer.kernel[...]) for layer in s.layers)
    assert np.abs(first).max() <= 1 / 2 and first.min() < 0 < first.max()  # U(-1/in, 1/in)
    assert np.abs(second).max() <= np.sqrt(6 / 10) / 30


def test_deq_inr_warm_start_and_gradient():
    d = image.load(8)
    m = DEQINR(16, num_frequencies=8, num_examples=64, rngs=nnx.Rngs(0))
    idx = jnp.asarray(d["index"][:32])
    rgb_cold, s_cold = m(d["coords"][:32], index=idx)
    rgb_warm, s_warm = m(d["coords"][:32], index=idx)
    assert float(m.deq.cache.fraction_filled()) == 0.5
    assert int(s_warm.nsteps.sum()) < int(s_cold.nsteps.sum())
    np.testing.assert_allclose(rgb_warm, rgb_cold, atol=1e-3)

    def loss(model):
        rgb, _ = model(d["coords"][:32], index=idx)
        return jnp.mean((rgb - d["pixels"][:32]) ** 2)

    grads = nnx.grad(loss)(m)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.abs(grads["deq"]["cell"]["w"]["kernel"][...]).sum()) > 0


def test_benchmark_quick(tmp_path):
    from benchmarks import inr

    result = inr.main(["--quick", "--models", "deq_warm,relu_ff", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "inr.json").read_text())
    assert (tmp_path / "inr.png").stat().st_size > 0
    rows = {r["model"]: r for r in saved["summary"]}
    assert set(rows) == {"deq_warm", "relu_ff"}
    assert abs(rows["relu_ff"]["params"] - rows["deq_warm"]["params"]) < 0.05 * rows["deq_warm"]["params"]
    assert rows["deq_warm"]["nfe"] > 0 and rows["deq_warm"]["memory_mib"] > 0
    assert len(result["records"][0]["curve"]) == 3
