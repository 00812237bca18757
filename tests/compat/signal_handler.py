"""A handler for SIGNAME (argv[1]) that asks the training loop to stop after its step, as
schedulers' preemption notices are handled: it must run exactly once per signal sent."""

import signal
import sys
import time
from pathlib import Path

import torch
from common import SignalDeliveries, record_steps, tiny_setup, train_step

signum = getattr(signal, f"SIG{sys.argv[1]}")
received: list[int] = []
signal.signal(signum, lambda number, frame: received.append(number))
deliveries = SignalDeliveries()
model, optimizer, batches = tiny_setup(lr=0.01, batches=8)
steps = 0
deadline = time.monotonic() + 30
while not received and time.monotonic() < deadline:
    for x, y in batches:
        time.sleep(0.01)
        train_step(model, optimizer, x, y)
        steps += 1
        if steps == 30:
            Path("ready-1").write_text("")
record_steps(steps)
torch.save(model.state_dict(), "preempted.pt")
time.sleep(1.0)  # a duplicate would arrive by now
print(f"handler ran {len(received)} time(s), signal delivered {deliveries.count(signum)} time(s)", flush=True)
