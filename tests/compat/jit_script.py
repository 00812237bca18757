"""torch.jit.script the trained model, save it, reload it, run it."""

import torch
from common import finish, train_tiny

model, _, batches, _ = train_tiny()
scripted = torch.jit.script(model)
scripted.save("model.ts")
reloaded = torch.jit.load("model.ts")
with torch.no_grad():
    finish(torch.nn.functional.mse_loss(reloaded(batches[0][0]), batches[0][1]), len(batches))
