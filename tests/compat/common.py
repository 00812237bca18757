"""What the compatibility programs share: a seeded tiny model and data, and one way to report.

Each program in this folder is a small, realistic training script built around one idiom. It
prints only what must be identical with and without profilerd (final losses as ``float.hex``,
facts about its own objects), saves its files in the current directory, and writes how many
optimizer steps each of its processes took to ``steps.<label>.txt`` there, which is how the
test knows the step count profilerd must report.
"""

from __future__ import annotations

import collections
import os
import random
import signal
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, get_worker_info

FEATURES = 8


def seed_everything(seed: int = 0) -> None:
    """Fixed seeds and one thread, so two runs of a program compute bit-identical losses."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)


class TinyNet(nn.Module):
    """A two-layer regressor; defined here, not in ``__main__``, so a pickled model can be loaded
    by an interpreter that imports this module, as a user loads a checkpoint elsewhere."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_batches(count: int, batch_size: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        x = torch.randn(batch_size, FEATURES, generator=generator)
        batches.append((x, x.sum(dim=1, keepdim=True) * 0.5))
    return batches


class Samples(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A map-style dataset that computes each sample from its index: same data in any worker."""

    def __init__(self, size: int = 256) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(FEATURES, generator=torch.Generator().manual_seed(index))
        return x, x.sum(dim=0, keepdim=True) * 0.5


class Stream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """An iterable dataset that splits its samples between DataLoader workers."""

    def __init__(self, size: int = 256) -> None:
        self.samples = Samples(size)

    def __iter__(self):  # type: ignore[no-untyped-def]
        info = get_worker_info()
        start, stride = (0, 1) if info is None else (info.id, info.num_workers)
        for index in range(start, len(self.samples), stride):
            yield self.samples[index]


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad()
    loss = mse(model, x, y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def tiny_setup(
    optimizer: str = "sgd", lr: float = 0.05, batches: int = 30
) -> tuple[TinyNet, torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The usual start of a program: seeds, a TinyNet, its optimizer and its batches."""
    seed_everything()
    model = TinyNet()
    factory = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
    return model, factory(model.parameters(), lr=lr), make_batches(batches)


def train_tiny(
    optimizer: str = "sgd", lr: float = 0.05, steps: int = 30
) -> tuple[TinyNet, torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """A TinyNet trained for ``steps`` plain steps, for programs whose idiom comes after training."""
    model, opt, batches = tiny_setup(optimizer, lr, steps)
    for x, y in batches:
        loss = train_step(model, opt, x, y)
    return model, opt, batches, loss


def init_gloo(rank: int, port: str, world_size: int = 2) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


def finish_rank(loss: torch.Tensor, steps: int, rank: int) -> None:
    """Each rank records its steps; rank 0 prints the mean final loss; the group is destroyed
    (the caller then frees its DDP model before exit, see examples/ddp_cpu.py)."""
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    record_steps(steps, f"rank{rank}")
    if rank == 0:
        report("final loss", total / torch.distributed.get_world_size())
    torch.distributed.destroy_process_group()


def record_steps(steps: int, label: str = "main") -> None:
    """How many optimizer steps this process took (read by the test, not printed: it may vary)."""
    Path(f"steps.{label}.txt").write_text(f"{steps}\n")


def report(name: str, value: float | torch.Tensor) -> None:
    if isinstance(value, torch.Tensor):
        value = value.detach().item()
    print(f"{name} {float(value).hex()}", flush=True)


def finish(loss: float | torch.Tensor, steps: int, label: str = "main") -> None:
    """The usual end of a program: its final loss, bit for bit, and its step count."""
    report("final loss", loss)
    record_steps(steps, label)


class SignalDeliveries:
    """Counts each delivery of a signal to this process, even two that Python's handler would
    see as one (it runs once for signals that arrive close together): CPython's C-level handler
    writes one byte per delivery to the wakeup fd."""

    def __init__(self) -> None:
        self._read, write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._counts: collections.Counter[int] = collections.Counter()

    def count(self, signum: int) -> int:
        try:
            while data := os.read(self._read, 512):
                self._counts.update(data)
        except BlockingIOError:
            pass
        return self._counts[signum]
