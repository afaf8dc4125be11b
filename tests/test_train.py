"""jdeq.train: batches, fit (smoke per model), evaluate/predict, checkpoint resume."""

import functools
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdeq
from jdeq import train as T
from jdeq.train.batches import data_size
from jdeq.data import arithmetic as A
from jdeq.models.transformer import LSTMClassifier, TiedTransformerClassifier, TransformerClassifier

L = 8


@pytest.fixture(scope="module")
def data():
    return A.generate(192, length=L, max_depth=1, seed=0).arrays()


def _deq(**kw):  # plain iteration + one-step gradient: the cheapest DEQ to compile
    return TiedTransformerClassifier(16, 10, length=L, features=8, num_heads=2, rngs=nnx.Rngs(0),
                                     solver=jdeq.FixedPointIteration(tol=1e-3, maxiter=8),
                                     gradient=jdeq.JacobianFree(), **kw)


class _Tiny(nnx.Module):
    """Embedding + linear head: fast to compile, for the tests of the loop itself."""

    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(16, 4, rngs=rngs)
        self.head = nnx.Linear(4 * L, 10, rngs=rngs)

    def __call__(self, tokens):
        return self.head(self.embed(tokens).reshape(tokens.shape[0], -1))


def test_batch_indices_cover_each_epoch_once():
    idx = np.concatenate([T.batch_indices(10, 3, s, seed=1) for s in range(3)])
    assert len(set(idx.tolist())) == 9
    assert (T.batch_indices(10, 3, 4, seed=1) == T.batch_indices(10, 3, 4, seed=1)).all()
    b = next(T.batches({"x": np.arange(10), "y": np.arange(10) * 2}, 4, start_step=2))
    assert (b["y"] == 2 * b["x"]).all()
    with pytest.raises(ValueError, match="batch_size"):
        T.batch_indices(3, 4, 0)


def test_batches_defaults_draw_fits_default_order_from_the_first_step():
    # fit's docstring: a loop of your own over batch_indices/batches reaches fit's result; with
    # every default left alone, that loop sees fit's batches (fit's seed, from step 0 on)
    import inspect

    seed = inspect.signature(T.fit).parameters["seed"].default
    data = {"x": np.arange(10), "y": np.arange(10) * 2}
    it = T.batches(data, 3)
    for step in range(5):  # over an epoch boundary (3 batches per epoch)
        want = T.batch_indices(10, 3, step, seed=seed)
        np.testing.assert_array_equal(T.batch_indices(10, 3, step), want)
        np.testing.assert_array_equal(next(it)["x"], want)
    assert not (T.batch_indices(10, 3, 0, seed=seed + 1) == T.batch_indices(10, 3, 0, seed=seed)).all()


@pytest.mark.parametrize(
    "make",
    [
        _deq,
        lambda: TransformerClassifier(16, 10, length=L, features=8, num_heads=2, num_layers=2, rngs=nnx.Rngs(0)),
        lambda: LSTMClassifier(16, 10, features=8, hidden=8, rngs=nnx.Rngs(0)),
    ],
    ids=["deq", "transformer", "lstm"],  # the unrolled tied net is trained in test_arithmetic_experiment
)
def test_one_epoch_smoke(make, data):
    model = make()
    before = [np.array(x) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))]
    has_stats = isinstance(model, TiedTransformerClassifier)
    # the DEQ also trains with a run-time call option bound into the loss (maxiter=2)
    loss = functools.partial(T.classification_loss, maxiter=2) if has_stats else T.classification_loss
    hist = T.fit(model, optax.adam(1e-2), data, steps=6, batch_size=32, log_every=3, progress=False,
                 loss_fn=loss, eval_data={"test": data} if not has_stats else None)
    after = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    assert any(not np.allclose(a, b) for a, b in zip(after, before))
    assert [r["step"] for r in hist.train] == [3, 6]
    assert np.isfinite(hist.train[-1]["loss"])
    assert ("nsteps" in hist.train[-1]) == has_stats
    if has_stats:
        assert all(0 < r["nsteps"] <= 2 for r in hist.train)
    else:
        assert 0 <= hist.eval[-1]["test"]["accuracy"] <= 1 and hist.eval[-1]["step"] == 6


def test_predict_and_evaluate_agree_and_maxiter_is_runtime(data):
    model = _deq()
    logits, stats = T.predict(model, data["inputs"], batch_size=50, maxiter=2)
    assert logits.shape == (192, 10) and stats.nsteps.shape == (192,) and (stats.nsteps <= 2).all()
    # each row is the model's own output for that input, the rows of the padded last batch included
    direct = T.split_output(model(jnp.asarray(data["inputs"]), maxiter=2))[0]
    np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-5)
    m = T.evaluate(model, data, batch_size=50, maxiter=2)
    np.testing.assert_allclose(m["accuracy"], (logits.argmax(-1) == data["labels"]).mean(), atol=1e-6)
    np.testing.assert_allclose(m["nsteps"], stats.nsteps.mean(), rtol=1e-6)
    # another budget reuses the compiled function (maxiter is traced)
    size = T.evaluation._apply._cache_size()
    T.predict(model, data["inputs"], batch_size=50, maxiter=5)
    assert T.evaluation._apply._cache_size() == size


class _Stop(Exception):
    pass


def _params(model):
    return [np.array(x) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))]


@pytest.mark.parametrize("interrupt", [_Stop, KeyboardInterrupt])
def test_resume_equals_uninterrupted(tmp_path, data, interrupt, monkeypatch):
    kw = dict(steps=6, batch_size=32, seed=3, log_every=1, progress=False)
    full = _Tiny()
    T.fit(full, optax.adam(1e-2), data, **kw)

    def stop_at_4(step, metrics):
        if step == 4:
            raise interrupt()

    first = _Tiny()
    every = 2 if interrupt is _Stop else None  # KeyboardInterrupt saves at the step it stopped at
    # fit's clock, faked: one second per reading from an arbitrary origin (as perf_counter's is)
    ticks = itertools.count(10**6)
    monkeypatch.setattr(T.loop, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    with pytest.raises(interrupt):
        T.fit(first, optax.adam(1e-2), data, checkpoint_dir=tmp_path, checkpoint_every=every, callback=stop_at_4, **kw)
    second = _Tiny()  # a fresh process would start from fresh parameters
    hist = T.fit(second, optax.adam(1e-2), data, checkpoint_dir=tmp_path, **kw)
    seconds = next(ticks) - 10**6  # what the fake clock advanced over both calls
    assert hist.resumed_from == 4
    assert [r["step"] for r in hist.train] == list(range(1, 7))
    # "time": seconds of training so far, carried over the resume (the time saved with the
    # checkpoint, then this run's): increasing, and within what the clock advanced (the clock's
    # origin never enters it)
    times = [r["time"] for r in hist.train]
    assert all(0 < a < b for a, b in zip(times, times[1:])) and times[-1] <= seconds, (times, seconds)
    for a, b in zip(_params(full), _params(second)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_bad_arguments(data):
    model = _Tiny()
    with pytest.raises(ValueError, match="steps"):
        T.fit(model, optax.adam(1e-3), data, steps=0, batch_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        T.fit(model, optax.adam(1e-3), data, steps=1, batch_size=1000)
    with pytest.raises(TypeError, match="optimizer"):
        T.fit(model, "adam", data, steps=1, batch_size=8)
    with pytest.raises(TypeError, match="`optimizer` must be an optax GradientTransformation"):
        T.fit(model, types.SimpleNamespace(init=optax.adam(1e-3).init), data, steps=1, batch_size=8)  # no update
    with pytest.raises(ValueError, match="leading axis"):
        T.fit(model, optax.adam(1e-3), {"inputs": data["inputs"], "labels": data["labels"][:5]}, steps=1, batch_size=4)


# ----------------------------------------------------------------------------- Jacobian regularization


class _TinyDEQ(nnx.Module):
    """MLP-cell DEQ + linear head on vectors: the smallest model with a jdeq.nnx.DEQ."""

    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.deq = jdeq.nnx.DEQ(jdeq.models.MLPCell(4, 8, w_scale=0.9, rngs=rngs),
                                solver=jdeq.FixedPointIteration(tol=1e-4, maxiter=30),
                                gradient=jdeq.JacobianFree())
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        z, stats = self.deq(x)
        return self.head(z), stats


@nnx.jit
def _jac_frob_jit(model, x):
    z, _ = model.deq(x)
    f = lambda z, x: model.deq.cell(z, x)  # noqa: E731
    return jdeq.jacobian_frobenius(f, z, x, jax.random.key(1), num_samples=256).mean()


def _jac_frob(model, x):
    """Batch mean of ||J||_F^2 / dim at z*, with many Hutchinson probes."""
    return float(_jac_frob_jit(model, jax.numpy.asarray(x)))


def test_jac_reg_is_logged_and_changes_the_update(vec_data):
    kw = dict(steps=1, batch_size=32, log_every=1, progress=False)
    plain, reg = _TinyDEQ(), _TinyDEQ()
    T.fit(plain, optax.sgd(0.1), vec_data, **kw)
    hist = T.fit(reg, optax.sgd(0.1), vec_data, jac_reg=T.JacReg(gamma=2.0, num_samples=64), **kw)
    # the logged term is gamma * ||J||_F^2 / dim on the step's batch, before the update
    x = vec_data["inputs"][T.batch_indices(96, 32, 0, seed=0)]
    np.testing.assert_allclose(hist.train[0]["jac_reg"], 2.0 * _jac_frob(_TinyDEQ(), x), rtol=0.25)
    # its gradient reaches the cell's weights (the head's gradient does not depend on it)
    np.testing.assert_array_equal(plain.head.kernel[...], reg.head.kernel[...])
    assert not np.allclose(plain.deq.cell.w.kernel[...], reg.deq.cell.w.kernel[...])


def test_inactive_jac_reg_is_exactly_no_regularization(vec_data):
    jac_reg = T.JacReg(gamma=0.0)  # the off switch (prob=0 is rejected, as by jdeq.jacobian_penalty)
    assert not jac_reg.active
    kw = dict(steps=2, batch_size=32, log_every=1, progress=False)
    plain, reg = _TinyDEQ(), _TinyDEQ()
    T.fit(plain, optax.adam(1e-2), vec_data, **kw)
    hist = T.fit(reg, optax.adam(1e-2), vec_data, jac_reg=jac_reg, **kw)
    assert all(r["jac_reg"] == 0 for r in hist.train)
    for a, b in zip(_params(plain), _params(reg)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_jac_reg_takes_the_losss_dtype(vec_data, gamma):
    """The logged term and the regularized loss keep the loss's dtype (bfloat16 here), whether
    the term is on or off: nothing promotes a low-precision loss to float32."""
    model = _TinyDEQ()
    opt = optax.sgd(0.1)

    def loss_fn(net, batch):
        logits, _ = net(batch["inputs"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        return loss.astype(jnp.bfloat16), {}

    step = jax.jit(T.make_train_step(loss_fn, opt, jac_reg=T.JacReg(gamma=gamma)))
    batch = {"inputs": jnp.asarray(vec_data["inputs"][:8]), "labels": jnp.asarray(vec_data["labels"][:8])}
    state, metrics = step(T.TrainState.create(model, opt), batch)
    assert metrics["jac_reg"].dtype == jnp.bfloat16
    assert (float(metrics["jac_reg"]) > 0) == (gamma > 0) and float(metrics["skipped"]) == 0.0


def test_fit_evaluates_with_its_eval_batch_size_and_data_axis(vec_data):
    """``eval_data`` is evaluated with :func:`evaluate` at ``eval_batch_size`` and on the mesh's
    ``data_axis`` (here a one-device mesh whose data axis is not called "data"): a metric that
    reports its batch's size shows the eval batches."""

    def loss_fn(net, batch):
        logits, _ = net(batch["inputs"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        return loss, {"loss": loss, "batch_rows": jnp.float32(batch["inputs"].shape[0])}

    held_out = {k: v[:48] for k, v in vec_data.items()}
    mesh = jax.make_mesh((1,), ("rows",), axis_types=(jax.sharding.AxisType.Auto,))
    hist = T.fit(_TinyDEQ(), optax.sgd(0.1), vec_data, steps=1, batch_size=32, loss_fn=loss_fn,
                 eval_data={"held_out": held_out}, eval_batch_size=16, mesh=mesh, data_axis="rows",
                 progress=False)
    assert hist.eval[-1]["held_out"]["batch_rows"] == 16.0  # three batches of 16, not one of 48


def test_an_index_field_is_checked_only_against_warm_start_caches(vec_data, capsys):
    """``data["index"]`` is checked only when the model has a FixedPointCache to index: a model
    without one trains on data whose "index" column means something else (floats here). The
    progress bar, when on, is labelled "train"."""
    data = dict(vec_data, index=np.linspace(0.0, 1.0, 96, dtype=np.float32))
    hist = T.fit(_TinyDEQ(), optax.sgd(0.1), data, steps=1, batch_size=32, log_every=1, progress=True)
    assert len(hist.train) == 1
    assert "train:" in capsys.readouterr().err


def test_batches_walk_consecutive_steps_and_data_size_refuses_scalars(vec_data):
    """``batches(..., start_step=s)`` yields the batches of steps s, s + 1, s + 2, ... (those of
    ``batch_indices``), and ``data_size`` refuses a scalar entry with its own error."""
    it = T.batches(vec_data, 16, seed=3, start_step=5)
    for step in range(5, 12):  # past an epoch boundary (6 batches per epoch)
        want = T.batch_indices(96, 16, step, seed=3)
        np.testing.assert_array_equal(next(it)["inputs"], vec_data["inputs"][want])
    with pytest.raises(ValueError, match="the arrays of `data` must share a leading axis"):
        data_size({"inputs": vec_data["inputs"], "scale": np.float32(2.0)})


def test_jac_reg_with_probability_applies_on_a_seeded_fraction_of_steps(vec_data):
    kw = dict(steps=8, batch_size=32, log_every=1, progress=False, seed=5,
              jac_reg=T.JacReg(gamma=1.0, prob=0.5))
    applied = [[r["jac_reg"] > 0 for r in T.fit(_TinyDEQ(), optax.adam(1e-2), vec_data, **kw).train]
               for _ in range(2)]
    assert applied[0] == applied[1]  # deterministic given the seed
    assert 0 < sum(applied[0]) < 8


def test_jac_reg_training_shrinks_the_jacobian(vec_data):
    kw = dict(steps=40, batch_size=32, log_every=40, progress=False)
    plain, reg = _TinyDEQ(), _TinyDEQ()
    h_plain = T.fit(plain, optax.adam(1e-2), vec_data, **kw)
    h_reg = T.fit(reg, optax.adam(1e-2), vec_data, jac_reg=T.JacReg(gamma=1.0), **kw)
    x = vec_data["inputs"]
    assert _jac_frob(reg, x) < 0.5 * _jac_frob(plain, x)  # measured: 0.10 vs 0.34
    assert h_reg.train[-1]["nsteps"] < h_plain.train[-1]["nsteps"]  # and the solves got shorter


def test_jac_reg_bad_arguments(data, vec_data):
    with pytest.raises(ValueError, match="gamma"):
        T.JacReg(gamma=-1.0)
    with pytest.raises(ValueError, match="prob"):
        T.JacReg(gamma=1.0, prob=1.5)
    with pytest.raises(ValueError, match="num_samples"):
        T.JacReg(gamma=1.0, num_samples=0)
    with pytest.raises(ValueError, match="jac_reg"):
        T.fit(_Tiny(), optax.adam(1e-3), data, steps=1, batch_size=8, jac_reg=T.JacReg(gamma=1.0))
    with pytest.raises(TypeError, match="jac_reg"):
        T.fit(_TinyDEQ(), optax.adam(1e-3), vec_data, steps=1, batch_size=8, jac_reg=1.0)


# ----------------------------------------------------------------------------- the pieces: step, checkpoints


@pytest.mark.parametrize("jac_reg", [None, T.JacReg(gamma=1.0, prob=0.5)], ids=["plain", "jac_reg"])
def test_own_loop_over_make_train_step_equals_fit(vec_data, jac_reg):
    """A user's loop over the public step and batch stream reaches fit's parameters bit for bit
    (also with a Jacobian penalty drawn on half the steps: the step's key is fit's)."""
    opt, kw = optax.adam(1e-2), dict(steps=5, batch_size=32, seed=5)
    fitted = _TinyDEQ()
    hist = T.fit(fitted, opt, vec_data, jac_reg=jac_reg, log_every=1, progress=False, **kw)

    model = _TinyDEQ()
    state = T.TrainState.create(model, opt)
    train_step = jax.jit(T.make_train_step(T.classification_loss, opt, jac_reg=jac_reg, key=jax.random.key(5)))
    losses = []
    for k in range(kw["steps"]):
        idx = T.batch_indices(96, kw["batch_size"], k, seed=kw["seed"])
        state, metrics = train_step(state, {name: v[idx] for name, v in vec_data.items()})
        losses.append(float(metrics["loss"]))
    nnx.update(model, state.params)
    assert int(state.step) == 5 and state.step.dtype == jax.numpy.int32  # an exact counter (it keys the draws)
    assert losses == [r["loss"] for r in hist.train]
    for a, b in zip(_params(model), _params(fitted)):
        np.testing.assert_array_equal(a, b)


def test_fit_and_its_step_equal_a_plain_optax_loop_with_a_schedule(vec_data):
    """fit (and so the step) carries the optimizer state: with a warmup schedule from 0 and
    AdamW, its parameters equal a loop written with optax and nnx alone. A step that dropped the
    new optimizer state left the schedule at its first value (lr 0: nothing ever moved) and
    Adam's moments at their first step (sign descent); one that did not pass the parameters to
    ``optimizer.update`` had no weight decay (optax raises)."""
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 5e-2, 2, 6, 1e-3), weight_decay=0.5)
    fitted = _TinyDEQ()
    T.fit(fitted, opt, vec_data, steps=6, batch_size=32, seed=1, progress=False)

    model = _TinyDEQ()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss(p):
            logits, _ = nnx.merge(graphdef, p, rest)(batch["inputs"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for k in range(6):
        idx = T.batch_indices(96, 32, k, seed=1)
        params, opt_state = step(params, opt_state, {name: v[idx] for name, v in vec_data.items()})
    nnx.update(model, params)
    for a, b in zip(_params(model), _params(fitted)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(_params(model), _params(_TinyDEQ()))) > 1e-2


def test_train_step_key_draws_the_penalty(vec_data):
    """make_train_step(key=...): step k draws the penalty (here whether it applies, prob 0.5)
    from fold_in(key, k): the same key repeats the draws, another key draws others."""
    opt, jac_reg = optax.adam(1e-2), T.JacReg(gamma=1.0, prob=0.5)
    batch = {name: v[:32] for name, v in vec_data.items()}

    def applied(key):
        state = T.TrainState.create(_TinyDEQ(), opt)
        step = jax.jit(T.make_train_step(T.classification_loss, opt, jac_reg=jac_reg, key=key))
        out = []
        for _ in range(8):
            state, metrics = step(state, batch)
            out.append(float(metrics["jac_reg"]) > 0)
        return out

    a, b = applied(jax.random.key(1)), applied(jax.random.key(2))
    assert a == applied(jax.random.key(1)) and a != b, (a, b)
    default = applied(None)  # the documented default, jax.random.key(0)
    assert default == applied(jax.random.key(0)) and default not in (a, b), (default, a, b)


def _mse(model, batch):
    loss = jax.numpy.mean((model(batch["x"]) - batch["y"]) ** 2)
    return loss, {"loss": loss}


class _NaNState(optax.GradientTransformation):
    """Passes the gradients through, but its state turns NaN at the first update."""

    def __new__(cls):
        return super().__new__(cls, lambda p: {"s": jax.numpy.zeros(())},
                               lambda g, s, p=None: (g, {"s": s["s"] * jax.numpy.nan}))


class _StatefulNet(nnx.Module):
    """A parameter, a non-parameter statistic and a warm-start cache: TrainState's three kinds."""

    def __init__(self):
        self.lin = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
        self.seen = nnx.BatchStat(jnp.zeros((3,)))
        self.store = jdeq.nnx.FixedPointCache(4, (2,))


def _values(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_step_state_mutable_and_cache_views_and_their_copies():
    net = _StatefulNet()
    state = T.TrainState.create(net, optax.sgd(0.1))
    mutable, cache = state.mutable(), state.cache()
    # mutable: every non-parameter variable; cache: the warm-start cache's entries only
    assert set(mutable) == {"seen", "store"} and set(cache) == {"store"}
    assert set(cache["store"]) == {"values", "filled"}
    ones = jax.tree.map(jnp.ones_like, cache)
    with_cache = state.with_cache(ones)
    assert all((v == 1).all() for v in _values(with_cache.cache()))
    assert all((v == 0).all() for v in _values(with_cache.mutable()["seen"]))  # the rest kept
    assert all((v == 0).all() for v in _values(state.cache()))                  # a copy: the original unchanged
    assert with_cache.params is state.params and with_cache.opt_state is state.opt_state
    filled = with_cache.model().store.filled.get_value()
    assert filled.dtype == bool and filled.all()  # the model merged from the copy holds them
    twos = jax.tree.map(lambda x: jnp.full_like(x, 2), mutable)
    with_mutable = state.with_mutable(twos)
    np.testing.assert_array_equal(with_mutable.mutable()["seen"][...], [2, 2, 2])
    np.testing.assert_array_equal(with_mutable.cache()["store"]["values"][0][...], np.full((4, 2), 2))
    assert with_mutable.params is state.params
    # an empty sub-state (a model without caches) changes nothing
    assert state.with_cache(nnx.State({})).rest is state.rest
    # a snapshot: neither the copies above nor changes of the user's model or of a module
    # merged from the state reach the state (nnx.split and nnx.merge share Variables otherwise)
    net.seen[...] = jnp.full(3, 7.0)
    state.model().seen[...] = jnp.full(3, 8.0)
    nnx.update(net, jax.tree.map(jnp.zeros_like, nnx.state(net, nnx.Param)))
    assert all((v == 0).all() for v in _values(state.mutable()))
    assert all(np.abs(v).sum() > 0 for v in _values(state.params["lin"]["kernel"]))
    assert all((v == 0).all() for v in _values(_StatefulNet().seen)) and (net.seen[...] == 7).all()


def test_step_state_of_a_model_without_parameters():
    """A model with no parameters (all its leaves statistics) has nothing non-finite to refuse:
    it gets a state, and a step that only advances the counter."""
    class Stats(nnx.Module):
        def __init__(self):
            self.seen = nnx.BatchStat(jnp.zeros(()))

        def __call__(self, x):
            return x

    state = T.TrainState.create(Stats(), optax.sgd(0.1))
    assert jax.tree.leaves(state.params) == []
    assert bool(T.all_finite({})) and bool(T.all_finite([])) and not bool(T.all_finite([jnp.ones(2), jnp.inf]))
    state, metrics = jax.jit(T.make_train_step(lambda m, b: (jnp.sum(m(b)), {}), optax.sgd(0.1)))(state, jnp.ones(2))
    assert int(state.step) == 1 and float(metrics["skipped"]) == 0.0


def test_step_state_shardings_split_the_large_weights_and_replicate_the_rest():
    from jax.sharding import AbstractMesh, PartitionSpec as P

    mesh = AbstractMesh((2, 4), ("data", "model"))
    opt = optax.adam(1e-3)
    state = T.TrainState.create(_StatefulNet(), opt)
    sh = state.shardings(opt, mesh, model_axis="model", min_shard_size=8)
    assert sh.graphdef is state.graphdef and isinstance(sh, T.TrainState)
    # the (16, 8) kernel splits its largest dimension, the (8,) bias has 8 >= min_shard_size elements
    assert sh.params["lin"]["kernel"].get_value().spec == P("model")
    assert sh.params["lin"]["bias"].get_value().spec == P("model")
    adam = sh.opt_state[0]
    assert adam.mu["lin"]["kernel"].get_value().spec == P("model") and adam.nu["lin"]["bias"].get_value().spec == P("model")
    assert adam.count.spec == P() and sh.step.spec == P()
    rest = jax.tree.leaves(sh.rest)
    assert len(rest) == len(jax.tree.leaves(state.rest)) == 3  # seen, the cache's values and filled
    assert all(s.spec == P() and s.mesh is mesh for s in rest)
    # the default min_shard_size (jdeq.train.MIN_SHARD_SIZE elements) and no model axis replicate all
    for kw in ({"model_axis": "model"}, {"min_shard_size": 8}):
        specs = {s.spec for s in jax.tree.leaves(state.shardings(opt, mesh, **kw))}
        assert specs == {P()}, kw
    assert T.MIN_SHARD_SIZE > 16 * 8


@pytest.mark.parametrize("bad", ["loss_and_grads", "new_params", "new_opt_state"])
def test_step_skips_a_nonfinite_step_and_keeps_the_state(bad):
    x, y = jax.numpy.ones((4, 2)), jax.numpy.zeros((4, 1))
    opt = {"new_params": optax.sgd(1e38), "new_opt_state": optax.chain(optax.sgd(0.1), _NaNState())}.get(
        bad, optax.sgd(0.1))
    state = T.TrainState.create(nnx.Linear(2, 1, rngs=nnx.Rngs(0)), opt)
    step = jax.jit(T.make_train_step(_mse, opt))
    batch = {"x": x.at[0, 0].set(jax.numpy.nan) if bad == "loss_and_grads" else x * 1e3, "y": y}
    new, metrics = step(state, batch)
    assert float(metrics["skipped"]) == 1.0 and int(new.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves((state.params, state.opt_state)),
                    jax.tree_util.tree_leaves((new.params, new.opt_state))):
        np.testing.assert_array_equal(a, b)
    if bad == "loss_and_grads":  # a finite batch afterwards trains as usual
        new, metrics = step(new, {"x": x, "y": y})
        assert float(metrics["skipped"]) == 0.0 and int(new.step) == 2
        assert not np.array_equal(new.params["kernel"][...], state.params["kernel"][...])


def test_step_bad_arguments():
    with pytest.raises(TypeError, match="loss_fn"):
        T.make_train_step("xent", optax.sgd(0.1))
    with pytest.raises(TypeError, match="optimizer"):
        T.make_train_step(_mse, "sgd")
    with pytest.raises(TypeError, match="jac_reg"):
        T.make_train_step(_mse, optax.sgd(0.1), jac_reg=1.0)
    with pytest.raises(TypeError, match="model"):
        T.TrainState.create("net", optax.sgd(0.1))
    net = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    net.bias[...] = net.bias[...].at[0].set(np.inf)
    with pytest.raises(ValueError, match=r"non-finite \(NaN/inf\) parameters at \['bias'\]"):
        T.TrainState.create(net, optax.sgd(0.1))


def test_checkpoint_errors_carry_their_cause(tmp_path):
    """A damaged array file is reported with the reader's own error (its type and message, so the
    user sees what broke), and a leaf that is not an array (one with a shape but no dtype) is
    refused naming the argument."""
    import os

    tree = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64)}
    T.save_checkpoint(tmp_path, 1, tree)
    store = tmp_path / "1" / "state" / "d"
    biggest = max(store.iterdir(), key=lambda f: f.stat().st_size)
    os.truncate(biggest, biggest.stat().st_size // 2)
    with pytest.raises(T.CheckpointError, match=r"unreadable arrays \((\w+): (?!None\))") as e:
        T.restore_checkpoint(tmp_path, tree, step=1)
    # the reader's message in full, up to 200 characters (tensorstore's names the file: longer)
    cause = e.value.__cause__
    assert str(e.value) == f"unreadable arrays ({type(cause).__name__}: {str(cause)[:200]})"

    class ShapeOnly:  # e.g. a lazy placeholder: a shape, but no dtype
        shape = (2,)

    with pytest.raises(TypeError, match="`like` must be a pytree of arrays"):
        T.restore_checkpoint(tmp_path, {"w": ShapeOnly()}, step=1)


def test_checkpoint_round_trip_keep_and_errors(tmp_path):
    jnp = jax.numpy
    tree = {"f32": jnp.linspace(0, 1, 6).reshape(2, 3), "bf16": jnp.arange(4, dtype=jnp.bfloat16) / 3,
            "i32": jnp.int32(-7), "u8": jnp.arange(5, dtype=jnp.uint8), "flag": jnp.array([True, False])}
    like = jax.tree.map(jnp.zeros_like, tree)
    assert T.checkpoint_steps(tmp_path / "none") == [] and T.restore_checkpoint(tmp_path / "none", like) is None
    def at(step):  # the tree's values at a step, of the same dtypes
        return jax.tree.map(lambda a: a ^ (step % 2 == 1) if a.dtype == bool else a + step, tree)

    for step in (1, 2, 3):
        assert T.save_checkpoint(tmp_path, step, at(step), meta={"step": step}, keep=2)
    assert not T.save_checkpoint(tmp_path, 3, tree, keep=2)  # an existing step is left as is
    assert T.checkpoint_steps(tmp_path) == [2, 3]
    got = T.restore_checkpoint(tmp_path, like)
    assert got.step == 3 and got.meta == {"step": 3}
    for a, b in zip(jax.tree_util.tree_leaves(got.tree), jax.tree_util.tree_leaves(at(3))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert T.restore_checkpoint(tmp_path, like, step=2).meta == {"step": 2}
    with pytest.raises(FileNotFoundError, match="`step`=1"):
        T.restore_checkpoint(tmp_path, like, step=1)
    with pytest.raises(ValueError, match="another model"):
        T.restore_checkpoint(tmp_path, {**like, "f32": jnp.zeros((3, 2))})
    # a given step that fails its checksum raises and is not moved
    (tmp_path / "3" / "meta" / "metadata").write_text("{")
    with pytest.raises(T.CheckpointError, match="unreadable meta"):
        T.restore_checkpoint(tmp_path, like, step=3)
    assert T.checkpoint_steps(tmp_path) == [2, 3]
    with pytest.warns(RuntimeWarning, match="checkpoint of step 3 is corrupt"):
        assert T.restore_checkpoint(tmp_path, like).step == 2
    assert [p.name for p in (tmp_path / "corrupt").iterdir()] == ["3-0"]
    with pytest.raises(TypeError, match="directory"):
        T.save_checkpoint(3, 1, tree)
    with pytest.raises(ValueError, match="step"):
        T.save_checkpoint(tmp_path, -1, tree)
    with pytest.raises(TypeError, match="meta"):
        T.save_checkpoint(tmp_path, 5, tree, meta=[1])
    with pytest.raises(TypeError, match="tree"):
        T.save_checkpoint(tmp_path, 5, {"a": "text"})


def test_classification_loss_with_a_label_per_position():
    """Per-position classes (logits ``(batch, positions, classes)``): the loss and accuracy are
    means over every label, and labels of another shape are refused naming the logits' shape
    without their class axis."""
    logits = jax.random.normal(jax.random.key(0), (2, 5, 3))
    labels = jnp.asarray(np.arange(10).reshape(2, 5) % 3, jnp.int32)
    loss, metrics = T.classification_loss(lambda x: x, {"inputs": logits, "labels": labels})
    np.testing.assert_allclose(loss, optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
                               rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(np.argmax(logits, -1) == labels))
    with pytest.raises(ValueError) as e:
        T.classification_loss(lambda x: x, {"inputs": logits, "labels": labels[:, 0]})
    assert str(e.value) == ("`labels` must have shape (2, 5) (one class id per row of the logits (2, 5, 3)), "
                            "got (2,).")


def test_save_checkpoint_of_a_step_below_the_latest_is_written(tmp_path):
    """``save_checkpoint`` returns False only for a step the directory holds: an earlier step than
    the latest is written too (orbax's manager alone skips it, and would still report nothing)."""
    assert T.save_checkpoint(tmp_path, 5, [jnp.zeros(3)])
    assert T.save_checkpoint(tmp_path, 3, [jnp.arange(3.0)])
    assert T.checkpoint_steps(tmp_path) == [3, 5]
    got = T.restore_checkpoint(tmp_path, [jnp.zeros(3)], step=3)
    np.testing.assert_array_equal(np.asarray(got.tree[0]), [0.0, 1.0, 2.0])
    assert T.restore_checkpoint(tmp_path, [jnp.zeros(3)]).step == 5


def test_split_array_checksum_depends_on_values_and_positions(x64):
    from jdeq.train import _checksum

    jnp = jax.numpy
    x = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4)
    h = _checksum._device_hashes([x, x.T.T, x.reshape(4, 3), x.at[1, 2].add(1e-6), jnp.flip(x, 1)])
    # the same values in the same (C) order hash alike, whatever the shape (the fingerprint
    # checks shapes on their own); one changed ulp or swapped entries do not
    assert h[0] == h[1] == h[2] and len(set(h[2:])) == 3
    wide = [jnp.arange(1, 4).astype(d) for d in (jnp.float64, jnp.bfloat16, jnp.int8)] + [jnp.array([True, False])]
    assert len(set(_checksum._device_hashes(wide))) == 4  # 8-, 2- and 1-byte types hash too
    # and a checkpoint stores crc32 for arrays readable here (hash32 is for split ones)
    assert set(_checksum.fingerprint([x])[0]) == {"shape", "dtype", "crc32"}
    assert _checksum.mismatch([x], _checksum.fingerprint([x])) is None
    assert _checksum.mismatch([x + 1], _checksum.fingerprint([x])) == 0


def test_import_jdeq_train_does_not_load_orbax():
    import subprocess
    import sys

    code = "import sys, jdeq.train; print(sorted(m for m in sys.modules if m.split('.')[0] == 'orbax'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
