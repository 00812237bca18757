"""`python -m pkgtrain`: sys.path[0] is the cwd, __main__ is this module, __package__ is set."""

import os
import sys

import torch
from common import TinyNet, finish, make_batches, seed_everything, train_step

print("package", __package__, "spec", __spec__.name, flush=True)
print("sys.path[0] is the cwd", os.path.abspath(sys.path[0]) == os.getcwd(), flush=True)
print("argv", sys.argv[1:], flush=True)
seed_everything()
model = TinyNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
batches = make_batches(25)
for x, y in batches:
    loss = train_step(model, optimizer, x, y)
finish(loss, len(batches))
