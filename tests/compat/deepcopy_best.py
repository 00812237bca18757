"""Keep a copy.deepcopy of the best model so far, evaluate and save it at the end."""

import copy

import torch
from common import TinyNet, finish, make_batches, mse, seed_everything, train_step

seed_everything()
model = TinyNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
batches = make_batches(30)
best, best_loss = None, float("inf")
for x, y in batches:
    loss = float(train_step(model, optimizer, x, y))
    if loss < best_loss:
        best, best_loss = copy.deepcopy(model), loss
assert best is not None
with torch.no_grad():
    best_eval = mse(best, *batches[0])
torch.save(best.state_dict(), "best.pt")
finish(best_eval, len(batches))
