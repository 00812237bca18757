"""Example: DistributedDataParallel on CPU (gloo), for `torchrun`.

    profilerd run -- torchrun --nproc-per-node 2 examples/ddp_cpu.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(2048, 128), torch.randint(0, 10, (2048,)))
    loader = DataLoader(data, batch_size=64, sampler=DistributedSampler(data))
    model = DistributedDataParallel(nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    # All ranks must run the same number of steps, so the deadline is decided on rank 0.
    deadline = torch.tensor([time.time() + args.seconds], dtype=torch.float64)
    dist.broadcast(deadline, 0)
    epoch = 0
    done = torch.zeros(1)
    while not done.item():
        loader.sampler.set_epoch(epoch)
        for inputs, labels in loader:
            loss = nn.functional.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        epoch += 1
        done = torch.tensor([float(time.time() >= deadline.item())])
        dist.all_reduce(done, op=dist.ReduceOp.MAX)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
