"""torch.compile(fullgraph=True): the graph count and the results must be those of a plain run.

The aot_eager backend runs dynamo and AOTAutograd (where instrumentation makes dynamo skip or
break a graph) without inductor's minute of C++ compilation on a small CPU."""

import torch
from common import TinyNet, finish, make_batches, seed_everything
from torch._dynamo.utils import counters

seed_everything()
model = TinyNet()
compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
batches = make_batches(20)
for x, y in batches:
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(compiled(x), y)
    loss.backward()
    optimizer.step()
with torch.no_grad():
    evaluation = torch.nn.functional.mse_loss(compiled(batches[0][0]), batches[0][1])
print("unique graphs", counters["stats"]["unique_graphs"], flush=True)
print("graph breaks", sum(counters["graph_break"].values()), flush=True)
finish(evaluation, len(batches))
