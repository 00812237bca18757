"""torch.save of the whole model, reloaded (pytorch/examples word_language_model does this), plus a
state_dict checkpoint with the optimizer's state."""

import torch
from common import finish, mse, train_tiny

model, optimizer, batches, _ = train_tiny("adam", lr=0.01)
torch.save(model, "model.pt")
torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, "checkpoint.pt")
reloaded = torch.load("model.pt", weights_only=False)
with torch.no_grad():
    finish(mse(reloaded, *batches[0]), len(batches))
