"""What introspection shows of the torch functions a profiler may wrap: name, qualified name,
module, signature and docstring, before and after training."""

import hashlib
import inspect

import torch
from common import TinyNet, finish, make_batches, seed_everything, train_step
from torch.utils.data import DataLoader, dataloader

TARGETS = {
    "torch.autograd.backward": lambda: torch.autograd.backward,
    "torch.autograd.grad": lambda: torch.autograd.grad,
    "torch.Tensor.backward": lambda: torch.Tensor.backward,
    "torch.optim.SGD.step": lambda: torch.optim.SGD.step,
    "torch.optim.Adam.step": lambda: torch.optim.Adam.step,
    "torch.optim.Optimizer.__init__": lambda: torch.optim.Optimizer.__init__,
    "torch.optim.Optimizer.zero_grad": lambda: torch.optim.Optimizer.zero_grad,
    "torch.nn.Module.__call__": lambda: torch.nn.Module.__call__,
    "torch.nn.utils.clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_,
    "torch.amp.GradScaler.step": lambda: torch.amp.GradScaler.step,
    "torch.amp.GradScaler.update": lambda: torch.amp.GradScaler.update,
    "torch.optim.lr_scheduler.LRScheduler.step": lambda: torch.optim.lr_scheduler.LRScheduler.step,
    "_BaseDataLoaderIter.__next__": lambda: dataloader._BaseDataLoaderIter.__next__,
    "_BaseDataLoaderIter.__init__": lambda: dataloader._BaseDataLoaderIter.__init__,
    "DataLoader.__iter__": lambda: DataLoader.__iter__,
    "torch.distributed.all_reduce": lambda: torch.distributed.all_reduce,
    "torch.distributed.barrier": lambda: torch.distributed.barrier,
}


def describe(when: str) -> None:
    for name, get in TARGETS.items():
        function = get()
        try:
            signature = str(inspect.signature(function))
        except (TypeError, ValueError) as exc:
            signature = f"<{type(exc).__name__}>"
        doc = hashlib.sha256((function.__doc__ or "").encode()).hexdigest()[:12]
        print(when, name, function.__name__, function.__qualname__, function.__module__, signature, doc, flush=True)


describe("before")
seed_everything()
model = TinyNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)
samples = [(x[i], y[i]) for x, y in make_batches(25) for i in range(len(x))]
for x, y in DataLoader(samples, batch_size=16):
    loss = train_step(model, optimizer, x, y)
    scheduler.step()
describe("after")
finish(loss, 25)
