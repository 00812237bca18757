"""Reads its hyperparameters from stdin and its data from a path relative to the cwd, and prints
what it sees of its start: sys.path[0], cwd, argv, environment (profilerd's documented
variables aside) and the stdin it was given."""

import json
import os
import sys

import torch
from common import TinyNet, finish, seed_everything, train_step

# What profilerd documents that it adds (docs/configuration.md): its PROFILERD_* variables, its
# bootstrap directory at the front of PYTHONPATH, and torch's NCCL timing switches where NCCL runs.
DOCUMENTED = {"PYTHONPATH", "TORCH_NCCL_ENABLE_TIMING", "TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"}
user_pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and "profilerd" not in p]
environment = {k: v for k, v in os.environ.items() if not k.startswith("PROFILERD_") and k not in DOCUMENTED}
print("sys.path[0]", sys.path[0] == os.path.dirname(os.path.abspath(__file__)), flush=True)
print("cwd", os.path.basename(os.getcwd()) in ("plain", "profiled"), flush=True)
print("argv", sys.argv[1:], "orig_argv tail", sys.orig_argv[-len(sys.argv) :][1:], flush=True)
print("user PYTHONPATH", user_pythonpath, flush=True)
print("environment", json.dumps(sorted(environment.items())), flush=True)
print("stdin is a pipe", not sys.stdin.isatty(), flush=True)
settings = json.loads(sys.stdin.read())
print("settings", settings, flush=True)
data = torch.load(os.path.join("data", "train.pt"), weights_only=True)
seed_everything()
model = TinyNet()
optimizer = torch.optim.SGD(model.parameters(), lr=settings["lr"])
for _ in range(settings["epochs"]):
    for x, y in zip(data["x"].split(16), data["y"].split(16), strict=True):
        loss = train_step(model, optimizer, x, y)
finish(loss, settings["epochs"] * len(data["x"].split(16)))
