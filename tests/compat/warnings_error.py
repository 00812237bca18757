"""Run with `python -W error`: a fake-tensor dry run of forward and backward to size memory (a
common idiom), then training. Any warning raised into this program ends it."""

import torch
from common import TinyNet, finish, make_batches, mse, seed_everything, train_step
from torch._subclasses.fake_tensor import FakeTensorMode

seed_everything()
with FakeTensorMode(allow_non_fake_inputs=False) as mode:
    fake_model = TinyNet()
    fake_x = mode.from_tensor(torch.empty(16, 8))
    fake_model(fake_x).sum().backward()
model = TinyNet()
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
batches = make_batches(30)
for x, y in batches:
    train_step(model, optimizer, x, y)
with torch.no_grad():
    finish(mse(model, *batches[0]), len(batches))
