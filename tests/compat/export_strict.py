"""torch.export (strict) of the trained model, saved and reloaded."""

import torch
from common import TinyNet, finish, make_batches, seed_everything, train_step

seed_everything()
model = TinyNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
batches = make_batches(30)
for x, y in batches:
    train_step(model, optimizer, x, y)
program = torch.export.export(model, (batches[0][0],), strict=True)
torch.export.save(program, "model.pt2")
reloaded = torch.export.load("model.pt2").module()
with torch.no_grad():
    finish(torch.nn.functional.mse_loss(reloaded(batches[0][0]), batches[0][1]), len(batches))
