"""A Ctrl-C that lands inside ``optimizer.step`` (here its closure raises the KeyboardInterrupt,
where a signal lands under load: while the step computes, not while data is awaited), caught by
the program, which trains on, three times over. The optimizer's step never finished, so its
post hooks never ran: every step after it is still a step, and is recorded."""

import torch
from common import mse, record_steps, report, tiny_setup, train_step

model, optimizer, batches = tiny_setup(lr=0.01, batches=8)
steps = 0


def interrupted() -> torch.Tensor:
    raise KeyboardInterrupt


for round_number in range(1, 4):
    for x, y in batches * 2:
        train_step(model, optimizer, x, y)
        steps += 1
    try:
        optimizer.zero_grad()
        mse(model, *batches[0]).backward()
        optimizer.step(interrupted)
    except KeyboardInterrupt:
        print(f"round {round_number}: interrupted inside the optimizer step", flush=True)
for x, y in batches:
    report("loss", train_step(model, optimizer, x, y))
    steps += 1
record_steps(steps)
