"""A functional training loop: torch.func.grad over functional_call, parameters updated by hand."""

import torch
from common import TinyNet, finish, make_batches, seed_everything
from torch.func import functional_call, grad_and_value

seed_everything()
model = TinyNet()
params = {name: p.detach() for name, p in model.named_parameters()}


def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)


step = grad_and_value(loss_fn)
batches = make_batches(30)
for x, y in batches:
    grads, loss = step(params, x, y)
    params = {name: p - 0.05 * grads[name] for name, p in params.items()}
finish(loss, len(batches))
