"""Example: a small classifier trained at the learning rate you give.

    profilerd run -- python examples/learning_rate.py              # lr=1e-3: it learns
    profilerd run -- python examples/learning_rate.py --lr 3       # the loss runs away (finite)
    profilerd run -- python examples/learning_rate.py --lr 0       # nothing is learned

Like nanoGPT at too high a learning rate, Adam at lr=3 drives the loss from its initial ~2.3
to tens or hundreds without ever producing a NaN; at lr=0 the loss stays at its first value.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seconds", type=float, default=0.0, help="stop after this long instead (0: --steps)")
    parser.add_argument("--print-losses", action="store_true", help="print the losses at the end")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    # Labels a linear function of the inputs: a learnable task, batches drawn from it.
    data = torch.randn(4096, 32)
    labels_of_all = (data @ torch.randn(32, 10)).argmax(dim=1)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses: list[torch.Tensor] = []
    deadline = time.monotonic() + args.seconds
    while (time.monotonic() < deadline) if args.seconds else (len(losses) < args.steps):
        index = torch.randint(0, len(data), (64,))
        inputs, labels = data[index], labels_of_all[index]
        loss = nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    if args.print_losses:
        print(" ".join(f"{v:.3g}" for v in torch.stack(losses).tolist()))


if __name__ == "__main__":
    main()
