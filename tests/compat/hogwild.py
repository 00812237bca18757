"""Hogwild: two torch.multiprocessing processes train one shared-memory model (pytorch/examples
mnist_hogwild). Both processes' steps must be recorded. The shared updates race, so only the
step counts are printed."""

import torch
import torch.multiprocessing as mp
from common import TinyNet, make_batches, record_steps, seed_everything, train_step

STEPS = 30


def train(rank: int, model: TinyNet) -> None:
    torch.set_num_threads(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for x, y in make_batches(STEPS, seed=rank):
        train_step(model, optimizer, x, y)
    record_steps(STEPS, f"worker{rank}")


if __name__ == "__main__":
    seed_everything()
    model = TinyNet()
    model.share_memory()
    workers = [mp.Process(target=train, args=(rank, model)) for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print("exit codes", [worker.exitcode for worker in workers], flush=True)
