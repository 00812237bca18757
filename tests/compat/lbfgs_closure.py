"""LBFGS with a closure: each optimizer.step(closure) is one step, and the forward and backward
inside the closure are forward and backward time, not optimizer time. The program measures its
own optimizer share (time in step() outside the closure) and writes it to optimizer_share.txt."""

import time
from pathlib import Path

import torch
from common import TinyNet, finish, make_batches, mse, seed_everything

seed_everything()
model = TinyNet(hidden=64)
optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=5)
batches = make_batches(25, batch_size=256)
in_closure = in_step = 0.0
started = time.perf_counter()
for x, y in batches:

    def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
        global in_closure
        entered = time.perf_counter()
        optimizer.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        in_closure += time.perf_counter() - entered
        return loss

    entered = time.perf_counter()
    loss = optimizer.step(closure)
    in_step += time.perf_counter() - entered
total = time.perf_counter() - started
Path("optimizer_share.txt").write_text(f"{(in_step - in_closure) / total}\n")
finish(loss, len(batches))
