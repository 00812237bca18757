"""Example: an image-like pipeline that decodes and augments on the fly in the training loop.

Run it under profilerd to see a DATA-BOUND verdict and a num_workers recommendation, then
apply the fix and check that it delivered:

    profilerd run -- python examples/data_starved.py
    profilerd run -- python examples/data_starved.py --num-workers 4
    profilerd diff <first run> latest

With CPU-heavy decoding and a worker per core, the loader saturates the host: more workers
cannot help, and profilerd says the input pipeline is CPU-bound instead:

    profilerd run -- python examples/data_starved.py --cpu-ms 6 --sleep-ms 0 --channels 4 --num-workers "$(nproc)"
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class DecodeOnTheFly(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Every item is 'read' (latency) then 'decoded' and augmented (a little CPU work)."""

    def __init__(self, size: int, sleep_s: float = 0.003, cpu_s: float = 0.0) -> None:
        self.size = size
        self.sleep_s = sleep_s
        self.cpu_s = cpu_s

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sleep_s:
            time.sleep(self.sleep_s)  # storage latency: no CPU used
        busy_until = time.thread_time() + self.cpu_s
        while time.thread_time() < busy_until:  # decoding: CPU time, however loaded the host
            pass
        generator = torch.Generator().manual_seed(index)
        image = torch.rand(3, 32, 32, generator=generator)
        if index % 2:
            image = image.flip(-1)
        return image, torch.tensor(index % 10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=14.0)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (0: in the loop)")
    parser.add_argument("--sleep-ms", type=float, default=3.0, help="read latency per sample")
    parser.add_argument("--cpu-ms", type=float, default=0.0, help="CPU time per sample spent decoding")
    parser.add_argument("--channels", type=int, default=80, help="width of the conv net (less: cheaper steps)")
    args = parser.parse_args()
    # One intra-op thread: the example then behaves alike on an idle laptop and a busy 2-core
    # CI machine, where two spinning intra-op threads make step times erratic.
    torch.set_num_threads(1)
    # Small enough that reading and decoding (in the loop) dominate, big enough that with a
    # few workers the model, not the input pipeline, sets the pace.
    model = nn.Sequential(
        nn.Conv2d(3, args.channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(args.channels, args.channels, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(args.channels * 16, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    workers = args.num_workers
    # Workers kept alive across epochs, as profilerd recommends: restarting them every epoch
    # would bring the data wait back at each epoch start.
    loader = DataLoader(
        DecodeOnTheFly(2048, args.sleep_ms / 1000, args.cpu_ms / 1000),
        batch_size=8,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if time.monotonic() >= deadline:
                break


if __name__ == "__main__":
    main()
