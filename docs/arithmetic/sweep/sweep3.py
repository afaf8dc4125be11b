"""Sweep 3: one model of the study under Config overrides (the study's own builders and trainer).

python docs/arithmetic/sweep/sweep3.py KIND key=value ...   e.g.  deq kernel=1 steps=1500
(tuples as JSON lists, model_lr as transformer:0.002,lstm:0.005)
Prints one JSON line: in-distribution and per-depth accuracy, mean solver steps, train seconds.
"""
import dataclasses, json, sys, time

import numpy as np

from jdeq.experiments import arith_study as S
from jdeq.experiments import arith_measure as M
from jdeq.experiments.arithmetic import FULL
from jdeq import train as T

kind, kv = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
conv = {f.name: type(getattr(FULL, f.name)) for f in dataclasses.fields(FULL)}
tup = lambda v: tuple(tup(x) for x in v) if isinstance(v, list) else v
over = {k: (tuple((a, float(b)) for a, b in (p.split(":") for p in v.split(","))) if k == "model_lr" else
            tup(json.loads(v)) if conv[k] is tuple else conv[k](v)) for k, v in kv.items() if k != "seed"}
cfg = dataclasses.replace(FULL, **over)
seed = int(kv.get("seed", 0))
sets = S.data(cfg)
model = S.build_model(kind, cfg, seed)
t0 = time.perf_counter()
S._train(model, kind, cfg, sets["train"], seed, False)
sec = time.perf_counter() - t0
test = sets["test"]
depth = S._depth_of(kind)
if isinstance(model, S.SequenceClassifier):
    logits, st = M.evaluate(model, test.tokens, depth=depth, batch_size=500)
    iters = None if depth else float(np.mean(st.nsteps))
    res = None if depth else float(np.median(st.rel_residual))
else:
    logits, _ = T.predict(model, test.tokens, batch_size=500); iters = res = None
ok = logits.argmax(-1) == test.labels
ind = test.depth <= cfg.train_max_depth
print(json.dumps(dict(kind=kind, over=kv, params=T.count_params(model), sec=round(sec), in_dist=round(float(ok[ind].mean()), 3),
                      per_depth=[round(float(ok[test.depth == d].mean()), 2) for d in range(cfg.max_depth + 1)],
                      iters=iters, res=res)), flush=True)
