"""Hand-rolled data parallelism: each gradient all-reduced with async_op=True, then wait()."""

import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import TinyNet, finish, make_batches, mse, record_steps, seed_everything

STEPS = 24


def run(rank: int, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    seed_everything()
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in make_batches(STEPS, seed=20 + rank):
        optimizer.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        works = [dist.all_reduce(p.grad, async_op=True) for p in model.parameters()]
        for work in works:
            work.wait()
        for p in model.parameters():
            p.grad /= 2
        optimizer.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    record_steps(STEPS, f"rank{rank}")
    if rank == 0:
        finish(total / 2, STEPS, "rank0")
    dist.destroy_process_group()
    del model, optimizer
    gc.collect()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2, join=True)
