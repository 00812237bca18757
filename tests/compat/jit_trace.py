"""torch.jit.trace in the middle of training (after step 5), then keep training the eager model."""

import torch
from common import TinyNet, finish, make_batches, seed_everything, train_step

seed_everything()
model = TinyNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
batches = make_batches(30)
for step, (x, y) in enumerate(batches, start=1):
    train_step(model, optimizer, x, y)
    if step == 5:
        traced = torch.jit.trace(model, (x,), check_trace=True)
        traced.save("traced.ts")
with torch.no_grad():
    finish(torch.nn.functional.mse_loss(model(batches[0][0]), batches[0][1]), len(batches))
