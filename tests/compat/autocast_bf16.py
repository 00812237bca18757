"""bfloat16 autocast on CPU around the forward pass."""

import torch
from common import TinyNet, finish, make_batches, seed_everything

seed_everything()
model = TinyNet()
optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
batches = make_batches(30)
for x, y in batches:
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(x)
    loss = torch.nn.functional.mse_loss(output.float(), y)
    loss.backward()
    optimizer.step()
finish(loss, len(batches))
