"""Example: a wide MLP on in-memory data; the math itself is the bottleneck.

profilerd run -- python examples/compute_bound.py
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=14.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    inputs = torch.randn(4096, 512)
    targets = torch.randint(0, 10, (4096,))
    dataset = TensorDataset(inputs, targets)
    # Whole batches are indexed at once (one gather per tensor, no per-sample Python, no
    # collate), so loading is a fraction of a percent of the step: the math is what is slow.
    batches = BatchSampler(RandomSampler(dataset), batch_size=256, drop_last=False)
    loader = DataLoader(dataset, sampler=batches, batch_size=None)
    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        for batch, labels in loader:
            loss = nn.functional.cross_entropy(model(batch), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if time.monotonic() >= deadline:
                break


if __name__ == "__main__":
    main()
