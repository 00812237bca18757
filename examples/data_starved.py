"""Example: an image-like pipeline that decodes and augments on the fly in the training loop.

Run it under profilerd to see a DATA-BOUND verdict and a num_workers recommendation:

    profilerd run -- python examples/data_starved.py
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class DecodeOnTheFly(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Every item is 'read' (latency) then 'decoded' and augmented (a little CPU work)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(0.002)
        generator = torch.Generator().manual_seed(index)
        image = torch.rand(3, 32, 32, generator=generator)
        if index % 2:
            image = image.flip(-1)
        return image, torch.tensor(index % 10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=14.0)
    args = parser.parse_args()
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(DecodeOnTheFly(2048), batch_size=8, shuffle=True)
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
