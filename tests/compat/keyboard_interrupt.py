"""Trains until Ctrl-C; its KeyboardInterrupt handler saves a checkpoint, which takes a moment,
then training goes on, three times over. A second SIGINT during a save would interrupt it, and
every delivery is counted: the program must see exactly one SIGINT per Ctrl-C. (Three rounds,
because two SIGINTs sent close together can merge into one delivery.)"""

import signal
import time
from pathlib import Path

import torch
from common import SignalDeliveries, record_steps, tiny_setup, train_step

ROUNDS = 3
deliveries = SignalDeliveries()
model, optimizer, batches = tiny_setup(lr=0.01, batches=8)
steps = 0
for round_number in range(1, ROUNDS + 1):
    try:
        deadline = time.monotonic() + 30
        steps_this_round = 0
        while time.monotonic() < deadline:
            for x, y in batches:
                time.sleep(0.01)  # waiting for data: where a Ctrl-C usually lands
                train_step(model, optimizer, x, y)
                steps += 1
                steps_this_round += 1
                if steps_this_round == 30:
                    Path(f"ready-{round_number}").write_text("")
        print("never interrupted", flush=True)
        break
    except KeyboardInterrupt:
        print(f"round {round_number}: interrupted, saving a checkpoint", flush=True)
        for part in range(3):  # a save that takes ~0.6 s, long enough for a duplicate signal to land
            torch.save(model.state_dict(), f"checkpoint-{round_number}-{part}.pt")
            time.sleep(0.2)
        print(f"round {round_number}: checkpoint saved", flush=True)
record_steps(steps)
print(f"SIGINT delivered {deliveries.count(signal.SIGINT)} time(s)", flush=True)
