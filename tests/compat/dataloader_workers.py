"""DataLoader variants (argv[1]): `fork` or `spawn` workers, `persistent` workers over two epochs,
or an `iterable` dataset split between workers."""

import sys

import torch
from common import Samples, Stream, TinyNet, finish, seed_everything, train_step
from torch.utils.data import DataLoader


def main(variant: str) -> None:
    seed_everything()
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    if variant == "iterable":
        loader = DataLoader(Stream(320), batch_size=16, num_workers=2)
    else:
        context = "spawn" if variant == "spawn" else "fork"
        loader = DataLoader(
            Samples(320),
            batch_size=16,
            num_workers=2,
            multiprocessing_context=context,
            persistent_workers=variant == "persistent",
        )
    epochs = 2 if variant == "persistent" else 1
    steps = 0
    for _ in range(epochs):
        for x, y in loader:
            loss = train_step(model, optimizer, x, y)
            steps += 1
    finish(loss, steps)


if __name__ == "__main__":
    main(sys.argv[1])
