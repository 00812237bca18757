"""Example: a learning rate far too high; the loss blows up to inf and then NaN.

profilerd run -- python examples/diverging.py
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--lr", type=float, default=50.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    inputs = torch.randn(2048, 32)
    targets = inputs @ torch.randn(32, 1) + 0.1 * torch.randn(2048, 1)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=256, shuffle=True)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        for batch, target in loader:
            loss = nn.functional.mse_loss(model(batch), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if time.monotonic() >= deadline:
                break


if __name__ == "__main__":
    main()
