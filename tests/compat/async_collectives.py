"""Hand-rolled data parallelism: each gradient all-reduced with async_op=True, then wait()."""

import gc
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import TinyNet, finish_rank, init_gloo, make_batches, mse, seed_everything

STEPS = 24


def run(rank: int, port: str) -> None:
    init_gloo(rank, port)
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
    finish_rank(loss, STEPS, rank)
    del model, optimizer
    gc.collect()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2, join=True)
