"""2-rank DistributedDataParallel on gloo (torch.multiprocessing.spawn): gradient accumulation
with no_sync() and find_unused_parameters=True (a branch used on every other step only)."""

import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import finish, make_batches, record_steps, seed_everything
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
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
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
    total = loss.detach().clone()
    dist.all_reduce(total)
    record_steps(STEPS, f"rank{rank}")
    if rank == 0:
        finish(total / 2, STEPS, "rank0")
    dist.destroy_process_group()
    del model, optimizer  # free DDP before exit (see examples/ddp_cpu.py)
    gc.collect()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2, join=True)
