"""torch.utils.checkpoint (reentrant and not) recomputes blocks in backward: still one step each."""

import torch
from common import finish, make_batches, seed_everything
from torch import nn
from torch.utils.checkpoint import checkpoint


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(3))
        self.out = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for index, block in enumerate(self.blocks):
            h = h + checkpoint(block, h, use_reentrant=index % 2 == 0)
        return self.out(h)


seed_everything()
model = Blocks()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
batches = make_batches(30)
for x, y in batches:
    optimizer.zero_grad()
    x.requires_grad_(True)  # reentrant checkpointing needs an input that requires grad
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
finish(loss, len(batches))
