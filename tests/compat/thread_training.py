"""The training loop runs in a worker thread (as GUIs, servers and some notebooks do)."""

import threading

import torch
from common import TinyNet, finish, make_batches, seed_everything, train_step

results: list[torch.Tensor] = []


def train() -> None:
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in make_batches(30):
        loss = train_step(model, optimizer, x, y)
    results.append(loss)


seed_everything()
worker = threading.Thread(target=train, name="trainer")
worker.start()
worker.join()
finish(results[0], 30)
