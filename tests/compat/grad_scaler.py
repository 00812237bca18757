"""Mixed-precision bookkeeping with torch.amp.GradScaler on CPU: scale, unscale, clip, step, update."""

import torch
from common import TinyNet, finish, make_batches, mse, seed_everything

seed_everything()
model = TinyNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
batches = make_batches(30)
for x, y in batches:
    optimizer.zero_grad()
    loss = mse(model, x, y)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()
print("scale", scaler.get_scale(), flush=True)
finish(loss, len(batches))
