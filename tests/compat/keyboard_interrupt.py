"""Trains until Ctrl-C; its KeyboardInterrupt handler saves a checkpoint, which takes a moment.

A second SIGINT during the save would interrupt it: the program must see exactly one."""

import time
from pathlib import Path

import torch
from common import TinyNet, make_batches, record_steps, seed_everything, train_step

seed_everything()
model = TinyNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
batches = make_batches(8)
steps = 0
try:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for x, y in batches:
            time.sleep(0.01)  # waiting for data: where a Ctrl-C usually lands
            train_step(model, optimizer, x, y)
            steps += 1
            if steps == 30:
                Path("ready").write_text("")
    print("never interrupted", flush=True)
except KeyboardInterrupt:
    print("interrupted: saving a checkpoint", flush=True)
    record_steps(steps)
    for part in range(5):  # a save that takes ~1 s, long enough for a duplicate signal to land
        torch.save(model.state_dict(), f"checkpoint-{part}.pt")
        time.sleep(0.2)
    print("checkpoint saved", flush=True)
