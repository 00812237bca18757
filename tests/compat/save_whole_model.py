"""torch.save of the whole model, reloaded (pytorch/examples word_language_model does this), plus a
state_dict checkpoint with the optimizer's state."""

import torch
from common import TinyNet, finish, make_batches, mse, seed_everything, train_step

seed_everything()
model = TinyNet()
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
batches = make_batches(30)
for x, y in batches:
    train_step(model, optimizer, x, y)
torch.save(model, "model.pt")
torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, "checkpoint.pt")
reloaded = torch.load("model.pt", weights_only=False)
with torch.no_grad():
    finish(mse(reloaded, *batches[0]), len(batches))
