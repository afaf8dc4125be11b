import sys, time, json, os
import numpy as np, optax, jax
from flax import nnx
import jdeq
from jdeq import train as T
from jdeq.data import arithmetic as A
from jdeq.experiments.arith_models import SequenceClassifier

GRAD = jdeq.Implicit() if "impl" in sys.argv[1] else (jdeq.JacobianFree() if "jfb" in sys.argv[1] else jdeq.Phantom(steps=5))
kind, steps, feat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kernel = int(sys.argv[4]); RO = sys.argv[8] if len(sys.argv) > 8 else "mean"; maxiter = int(sys.argv[5]); lr = float(sys.argv[6]); trainmax = int(sys.argv[7])
data = A.generate(int(sys.argv[9]) if len(sys.argv) > 9 else 12000, operands=int(os.environ.get("OPS", 7)), max_depth=int(os.environ.get("MAXD", 5)), seed=1)
train, test = A.train_test_split(data, 2000, seed=0)
train = train.take(train.depth <= trainmax)
C = data.num_classes; L = data.length
m = SequenceClassifier(16, C, length=L, features=feat, kernel=kernel, readout=RO, solver=(jdeq.FixedPointIteration if os.environ.get("FPI") else jdeq.Anderson)(tol=1e-3, maxiter=maxiter), gradient=GRAD, rngs=nnx.Rngs(0))
sched = optax.warmup_cosine_decay_schedule(0.0, lr, steps // 20, steps, lr / 20)
opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-4))
import functools
loss = functools.partial(T.classification_loss, depth=maxiter) if kind == "unrolled" else T.classification_loss
t = time.time()
h = T.fit(m, opt, train.arrays(), steps=steps, batch_size=128, progress=False, log_every=100, loss_fn=loss)
sec = time.time() - t
out = {}
for k in (maxiter, 2 * maxiter, 4 * maxiter):
    if kind == "unrolled":
        logits, st = T.predict(m, test.tokens, batch_size=1000, depth=k) if False else (None, None)
        f = jax.jit(lambda tok, k=k: m(tok, depth=k)[0]); logits = np.asarray(f(test.tokens)); nst = k
    else:
        logits, st = T.predict(m, test.tokens, batch_size=1000, maxiter=k); nst = float(np.mean(st.nsteps))
    ok = logits.argmax(-1) == test.labels
    out[k] = dict(acc=round(float(ok[test.depth <= trainmax].mean()), 3), per_depth=[round(float(ok[test.depth == d].mean()), 3) for d in range(int(os.environ.get("MAXD", 5)) + 1)], nsteps=nst,
                  res=None if st is None else float(np.mean(st.rel_residual)))
print(json.dumps(dict(kind=kind, steps=steps, feat=feat, kernel=kernel, maxiter=maxiter, lr=lr, trainmax=trainmax, params=T.count_params(m), sec=round(sec), loss=round(h.train[-1]["loss"], 3), eval=out)), flush=True)
