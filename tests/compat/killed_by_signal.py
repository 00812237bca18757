"""Trains, then dies by SIGTERM with the default action (as an OOM killer or a timeout would end
it): whoever started it must see a death by that signal. Its steps are not counted: a process
killed this way runs no exit code, so what the probes had not yet sent is lost."""

import os
import signal

import torch
from common import TinyNet, make_batches, report, seed_everything, train_step

seed_everything()
model = TinyNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
batches = make_batches(30)
for x, y in batches:
    loss = train_step(model, optimizer, x, y)
report("final loss", loss)
os.kill(os.getpid(), signal.SIGTERM)
