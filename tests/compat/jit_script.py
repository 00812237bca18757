"""torch.jit.script the trained model, save it, reload it, run it."""

import torch
from common import TinyNet, finish, make_batches, seed_everything, train_step

seed_everything()
model = TinyNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
batches = make_batches(30)
for x, y in batches:
    train_step(model, optimizer, x, y)
scripted = torch.jit.script(model)
scripted.save("model.ts")
reloaded = torch.jit.load("model.ts")
with torch.no_grad():
    finish(torch.nn.functional.mse_loss(reloaded(batches[0][0]), batches[0][1]), len(batches))
