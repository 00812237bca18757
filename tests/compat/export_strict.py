"""torch.export (strict) of the trained model, saved and reloaded."""

import torch
from common import finish, train_tiny

model, _, batches, _ = train_tiny()
program = torch.export.export(model, (batches[0][0],), strict=True)
torch.export.save(program, "model.pt2")
reloaded = torch.export.load("model.pt2").module()
with torch.no_grad():
    finish(torch.nn.functional.mse_loss(reloaded(batches[0][0]), batches[0][1]), len(batches))
