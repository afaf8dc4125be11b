import sys, time, functools, json
import numpy as np, optax, jax
from flax import nnx
import jdeq
from jdeq import train as T
from jdeq.data import arithmetic as A
from jdeq.models.transformer import LSTMClassifier, TiedTransformerClassifier, TransformerClassifier

target, kind, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
feat = int(sys.argv[4]) if len(sys.argv) > 4 else 32
data = A.generate(12000, operands=7, max_depth=5, seed=1, target=target)
train, test = A.train_test_split(data, 2000, seed=0)
C = data.num_classes; L = data.length
rngs = nnx.Rngs(0)
if kind == "lstm":
    m = LSTMClassifier(16, C, features=feat, hidden=2*feat, rngs=rngs); lr = 1e-2
elif kind.startswith("unrolled"):
    m = TiedTransformerClassifier(16, C, length=L, features=feat, num_heads=4, depth=int(kind[8:]), rngs=rngs); lr = 3e-3
elif kind == "deq":
    m = TiedTransformerClassifier(16, C, length=L, features=feat, num_heads=4, solver=jdeq.Anderson(tol=1e-3, maxiter=12), gradient=jdeq.Phantom(steps=5), rngs=rngs); lr = 3e-3
elif kind == "transformer":
    m = TransformerClassifier(16, C, length=L, features=feat, num_heads=4, num_layers=4, rngs=rngs); lr = 3e-3
sched = optax.warmup_cosine_decay_schedule(0.0, lr, steps // 20, steps, lr / 20)
opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-4))
t = time.time()
T.fit(m, opt, train.arrays(), steps=steps, batch_size=128, progress=False, log_every=100)
sec = time.time() - t
logits, st = T.predict(m, test.tokens, batch_size=1000)
ok = logits.argmax(-1) == test.labels
pd = [round(float(ok[test.depth == d].mean()), 3) for d in range(6)]
print(json.dumps(dict(target=target, kind=kind, steps=steps, feat=feat, params=T.count_params(m), acc=round(float(ok.mean()), 3), per_depth=pd, sec=round(sec), maj=round(float(np.mean(test.labels == np.bincount(train.labels).argmax())), 3))), flush=True)
