"""torch.profiler around training steps: the ops it records are the program's own, no more."""

import collections

import torch
from common import TinyNet, finish, make_batches, seed_everything, train_step
from torch.profiler import ProfilerActivity, profile

seed_everything()
model = TinyNet()
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
batches = make_batches(30)
for x, y in batches[:10]:
    train_step(model, optimizer, x, y)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for x, y in batches[10:]:
        loss = train_step(model, optimizer, x, y)
prof.export_chrome_trace("trace.json")
counts = collections.Counter(event.name for event in prof.events() if event.name.startswith("aten::"))
for name, count in sorted(counts.items()):
    print(f"{name} {count}", flush=True)
finish(loss, len(batches))
