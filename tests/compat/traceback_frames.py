"""Errors raised in a forward pass, a backward pass, an optimizer step and a dataset: the
tracebacks the user reads have only their own and torch's frames, and the last error ends the
program as it would without profilerd. Warnings torch issues point where they would without profilerd."""

import os
import traceback
import warnings

import torch
from common import mse, train_tiny
from torch.utils.data import DataLoader, Dataset


class FailsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        raise RuntimeError("a bug in a custom backward")


class BrokenDataset(Dataset[torch.Tensor]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        raise KeyError(f"sample {index} is missing")


def frames(exc: BaseException) -> list[str]:
    # The probes' wrappers of torch.autograd.backward and DataLoader.__next__ are Python frames
    # an exception passes through (a documented limit, docs/concepts.md): the rest must be equal.
    return [
        f"{os.path.basename(f.filename)}:{f.name}"
        for f in traceback.extract_tb(exc.__traceback__)
        if f"{os.sep}profilerd_probes{os.sep}" not in f.filename
    ]


model, optimizer, batches, _ = train_tiny(steps=25)
attempts = {
    "forward": lambda: model(torch.randn(2, 3)),
    "backward": lambda: FailsInBackward.apply(model(batches[0][0])).sum().backward(),
    "optimizer": lambda: optimizer.step(lambda: 1 / 0),
    "dataloader": lambda: next(iter(DataLoader(BrokenDataset()))),
}
for where, attempt in attempts.items():
    try:
        attempt()
    except Exception as exc:
        print(where, type(exc).__name__, frames(exc), flush=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    iter(DataLoader(batches, pin_memory=True))  # no accelerator to pin memory for: torch warns
print("warning at", [f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught], flush=True)
print("last loss", mse(model, *batches[0]).item().hex(), flush=True)
next(iter(DataLoader(BrokenDataset())))  # uncaught: exit 1 with a traceback on stderr
