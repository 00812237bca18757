"""Ends with os._exit(0) right after training (as some launchers and notebooks' workers do):
no atexit handler runs."""

import os
import sys

import torch
from common import TinyNet, finish, make_batches, seed_everything, train_step

seed_everything()
model = TinyNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
batches = make_batches(40)
for x, y in batches:
    loss = train_step(model, optimizer, x, y)
finish(loss, len(batches))
sys.stdout.flush()
os._exit(0)
