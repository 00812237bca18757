"""A small CPU training job whose input pipeline cannot keep up (the `profilerd demo` workload).

Each sample takes a few milliseconds to "read" (a stand-in for slow storage) and decode, and
the DataLoader runs in the training loop (num_workers=0), so the model waits on its data.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from profilerd.demo import DEMO_SECONDS


class SlowStorageDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, size: int, read_latency_s: float) -> None:
        self.size = size
        self.read_latency_s = read_latency_s
        generator = torch.Generator().manual_seed(0)
        self.centers = torch.randn(10, 64, generator=generator)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.read_latency_s)  # waiting on storage
        label = index % 10
        features = self.centers[label] + 0.5 * torch.randn(64)
        return features, torch.tensor(label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=DEMO_SECONDS, help="how long to train")
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    loader = DataLoader(SlowStorageDataset(4096, 0.0012), batch_size=16, shuffle=True, num_workers=args.num_workers)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    deadline = time.monotonic() + args.seconds
    steps = 0
    while time.monotonic() < deadline:
        for features, labels in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(features), labels)
            loss.backward()
            optimizer.step()
            steps += 1
            if time.monotonic() >= deadline:
                break
    print(f"trained {steps} steps, final loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
