"""Under a site sitecustomize (on PYTHONPATH) that extends sys.path: what it did is still there."""

import sys

import site_extra
import sitecustomize
import torch
from common import TinyNet, finish, make_batches, seed_everything, train_step

print(getattr(sitecustomize, "SITE_MARKER", "the site's sitecustomize is not the one imported"), flush=True)
print(site_extra.VALUE, flush=True)
print("extra_dir on sys.path", any(p.endswith("extra_dir") for p in sys.path), flush=True)
seed_everything()
model = TinyNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
batches = make_batches(25)
for x, y in batches:
    loss = train_step(model, optimizer, x, y)
print("extra_dir still on sys.path", any(p.endswith("extra_dir") for p in sys.path), flush=True)
finish(loss, len(batches))
