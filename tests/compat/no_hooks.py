"""User code that asserts its model, parameters and optimizer carry no hooks or extra attributes,
and that no global module hook is active while it trains (global optimizer hooks are allowed:
they are on no user object)."""

import torch
from common import TinyNet, finish, make_batches, mse, seed_everything
from torch.nn.modules import module as module_globals

seed_everything()
model = TinyNet()
pristine = set(TinyNet().__dict__)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
optimizer_keys = set(optimizer.__dict__)
GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_module_registration_hooks",
    "_global_parameter_registration_hooks",
    "_global_buffer_registration_hooks",
)


def assert_untouched(where: str) -> None:
    for name in GLOBAL_HOOKS:
        assert not getattr(module_globals, name), f"{where}: a global module hook {name} is active"
    for sub in model.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(sub, name), f"{where}: {type(sub).__name__}.{name} is not empty"
    assert set(model.__dict__) == pristine, f"{where}: model attributes {set(model.__dict__) ^ pristine}"
    for param in model.parameters():
        assert not param._backward_hooks, f"{where}: a tensor hook"
        assert not getattr(param, "_post_accumulate_grad_hooks", None), f"{where}: a post-accumulate hook"
    assert set(optimizer.__dict__) == optimizer_keys, f"{where}: optimizer attributes changed"
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


batches = make_batches(30)
for x, y in batches:
    optimizer.zero_grad()
    loss = mse(model, x, y)
    assert_untouched("after forward")
    loss.backward()
    assert_untouched("after backward")
    optimizer.step()
    assert_untouched("after step")
print("no hooks, no attributes", flush=True)
finish(loss, len(batches))
