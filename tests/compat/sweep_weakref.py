"""A hyperparameter sweep in one process: each finished trial's model, optimizer and Adam state
must be freed (checked with weak references), or memory grows trial after trial."""

import gc
import weakref

import torch
from common import TinyNet, finish, make_batches, mse, seed_everything, train_step

batches = make_batches(10)
results = []
for trial, lr in enumerate((0.1, 0.01, 0.001)):
    seed_everything(trial)
    model = TinyNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for x, y in batches:
        train_step(model, optimizer, x, y)
    with torch.no_grad():
        results.append(float(mse(model, *batches[0])))
    state = next(iter(optimizer.state.values()))["exp_avg"]
    refs = {"model": weakref.ref(model), "optimizer": weakref.ref(optimizer), "adam state": weakref.ref(state)}
    refs["parameter"] = weakref.ref(next(model.parameters()))
    del model, optimizer, state, x, y
    gc.collect()
    alive = sorted(name for name, ref in refs.items() if ref() is not None)
    print(f"trial {trial} still alive: {alive}", flush=True)
best = min(results)
finish(best, 3 * len(batches))
