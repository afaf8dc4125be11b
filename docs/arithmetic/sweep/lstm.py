import sys, time, json
import numpy as np, optax
from flax import nnx
from jdeq import train as T
from jdeq.data import arithmetic as A
from jdeq.models.transformer import LSTMClassifier
steps, hidden, trainmax, lr, ntrain = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
data = A.generate(ntrain + 3000, operands=7, max_depth=5, seed=1)
train, test = A.train_test_split(data, 3000, seed=0)
train = train.take(train.depth <= trainmax)
m = LSTMClassifier(16, 10, features=32, hidden=hidden, rngs=nnx.Rngs(0))
sched = optax.warmup_cosine_decay_schedule(0.0, lr, steps // 20, steps, lr / 20)
opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-4))
t = time.time(); T.fit(m, opt, train.arrays(), steps=steps, batch_size=128, progress=False, log_every=100); sec = time.time() - t
logits, _ = T.predict(m, test.tokens, batch_size=1000); ok = logits.argmax(-1) == test.labels
print(json.dumps(dict(steps=steps, hidden=hidden, trainmax=trainmax, lr=lr, ntrain=len(train), params=T.count_params(m), sec=round(sec), indist=round(float(ok[test.depth <= trainmax].mean()), 3), per_depth=[round(float(ok[test.depth == d].mean()), 3) for d in range(6)])), flush=True)
