"""Example: DistributedDataParallel on CPU (gloo), for `torchrun`.

profilerd run -- torchrun --nproc-per-node 2 examples/ddp_cpu.py
# communication-bound: a wide model, tiny batches
profilerd run -- torchrun --nproc-per-node 2 examples/ddp_cpu.py --width 2048 --batch-size 2
# a straggler: rank 1 loads its data slowly
profilerd run -- torchrun --nproc-per-node 2 examples/ddp_cpu.py --slow-rank 1
# balanced: a small conv net has much compute per parameter, so the all-reduce hides
profilerd run -- torchrun --nproc-per-node 2 examples/ddp_cpu.py --model conv
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


class DeviceTime(nn.Module):
    """Stands in for accelerator time on a CPU-only machine: the host waits, no core is busy."""

    def __init__(self, milliseconds: float) -> None:
        super().__init__()
        self.seconds = milliseconds / 1000

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


class Samples(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, size: int, shape: tuple[int, ...], delay_s: float) -> None:
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(size, *shape, generator=generator)
        self.labels = torch.randint(0, 10, (size,), generator=generator)
        self.delay_s = delay_s

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.delay_s:
            time.sleep(self.delay_s)  # this rank's storage is slow
        return self.inputs[index], self.labels[index]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=256, help="hidden width: gradient size grows with its square")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--slow-rank", type=int, default=-1, help="this rank's loader sleeps per sample")
    parser.add_argument("--slow-ms", type=float, default=1.0)
    parser.add_argument("--model", choices=["mlp", "conv"], default="mlp")
    parser.add_argument("--device-ms", type=float, default=0.0, help="simulated accelerator time per step")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    delay = args.slow_ms / 1000 if rank == args.slow_rank else 0.0
    width = args.width
    if args.model == "conv":
        data = Samples(1024, (3, 32, 32), delay)
        network = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )
    else:
        data = Samples(4096, (128,), delay)
        network = nn.Sequential(
            nn.Linear(128, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
        )
    if args.device_ms:
        network = nn.Sequential(DeviceTime(args.device_ms), network)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=DistributedSampler(data))
    model = DistributedDataParallel(network)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    # All ranks must run the same number of steps, so the deadline is decided on rank 0.
    deadline = torch.tensor([time.time() + args.seconds], dtype=torch.float64)
    dist.broadcast(deadline, 0)
    epoch = 0
    done = False
    while not done:
        loader.sampler.set_epoch(epoch)
        for step, (inputs, labels) in enumerate(loader):
            loss = nn.functional.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 20 == 0:
                flag = torch.tensor([float(time.time() >= deadline.item())])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if flag.item():
                    done = True
                    break
        epoch += 1
    dist.destroy_process_group()
    # DDP's hooks form reference cycles that keep it, and the gloo process group it holds,
    # alive until the interpreter's final garbage collection. By then gloo's worker threads can
    # no longer release the tensors of finished collectives, and torch aborts the process
    # (pytorch/pytorch#190489). Free them now, while the interpreter is fully alive.
    del model, optimizer
    gc.collect()


if __name__ == "__main__":
    main()
