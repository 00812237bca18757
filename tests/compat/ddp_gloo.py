"""2-rank DistributedDataParallel on gloo (torch.multiprocessing.spawn): gradient accumulation
with no_sync() and find_unused_parameters=True (a branch used on every other step only)."""

import gc
import sys

import torch
import torch.multiprocessing as mp
from common import finish_rank, init_gloo, make_batches, seed_everything
from torch import nn
from torch.nn.parallel import DistributedDataParallel

STEPS = 24


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(8, 16)
        self.head = nn.Linear(16, 1)
        self.aux = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor, use_aux: bool) -> torch.Tensor:
        h = torch.relu(self.trunk(x))
        return self.head(h) + (self.aux(h) if use_aux else 0.0)


def run(rank: int, port: str) -> None:
    init_gloo(rank, port)
    seed_everything()
    model = DistributedDataParallel(Branchy(), find_unused_parameters=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = make_batches(2 * STEPS, seed=10 + rank)
    for step in range(STEPS):
        (x1, y1), (x2, y2) = batches[2 * step], batches[2 * step + 1]
        use_aux = step % 2 == 0
        optimizer.zero_grad()
        with model.no_sync():
            nn.functional.mse_loss(model(x1, use_aux), y1).backward()
        loss = nn.functional.mse_loss(model(x2, use_aux), y2)
        loss.backward()
        optimizer.step()
    finish_rank(loss, STEPS, rank)
    del model, optimizer  # free DDP before exit (see examples/ddp_cpu.py)
    gc.collect()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2, join=True)
