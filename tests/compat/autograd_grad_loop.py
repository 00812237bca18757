"""A hand-written update with torch.autograd.grad (meta-learning style): no torch.optim, no
.backward(); each iteration is a step."""

import torch
from common import TinyNet, finish, make_batches, mse, seed_everything

seed_everything()
model = TinyNet()
params = list(model.parameters())
batches = make_batches(30)
for x, y in batches:
    loss = mse(model, x, y)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for param, grad in zip(params, grads, strict=True):
            param -= 0.05 * grad
finish(loss, len(batches))
