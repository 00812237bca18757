"""A project with its own top-level packages named `probes` and `tui` next to its script."""

import os
import sys

import torch

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import TinyNet, finish, make_batches, seed_everything, train_step

import probes
import tui

here = os.path.dirname(os.path.abspath(__file__))
for package in (probes, tui):
    print(package.__name__, package.OWNER, os.path.dirname(os.path.dirname(package.__file__)) == here, flush=True)
seed_everything()
model = TinyNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
batches = make_batches(25)
for x, y in batches:
    loss = train_step(model, optimizer, x, y)
finish(loss, len(batches))
