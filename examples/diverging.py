"""Example: a learning rate far too high; the loss blows up to inf and then NaN.

    profilerd run -- python examples/diverging.py
    # 60 steps, done in a few tens of milliseconds: the first NaN/inf step is still named
    profilerd run -- python examples/diverging.py --steps 60

At the end it prints the first step whose loss was not finite (counting steps from 1, as
profilerd does), read from losses kept on the device: no per-step sync.
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
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: after --seconds)")
    parser.add_argument("--lr", type=float, default=50.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    inputs = torch.randn(2048, 32)
    targets = inputs @ torch.randn(32, 1) + 0.1 * torch.randn(2048, 1)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=256, shuffle=True)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    deadline = time.monotonic() + args.seconds
    losses: list[torch.Tensor] = []
    done = False
    while not done:
        for batch, target in loader:
            loss = nn.functional.mse_loss(model(batch), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            if len(losses) == args.steps or (not args.steps and time.monotonic() >= deadline):
                done = True
                break
    finite = torch.isfinite(torch.stack(losses))
    bad = (~finite).nonzero()
    first = int(bad[0]) + 1 if len(bad) else None
    print(f"{len(losses)} steps; first non-finite loss at step {first}", flush=True)


if __name__ == "__main__":
    main()
