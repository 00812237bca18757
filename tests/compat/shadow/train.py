"""A project with its own top-level packages named `probes` and `tui` next to its script."""

import os
import sys

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import finish, train_tiny

import probes
import tui

here = os.path.dirname(os.path.abspath(__file__))
for package in (probes, tui):
    print(package.__name__, package.OWNER, os.path.dirname(os.path.dirname(package.__file__)) == here, flush=True)
_, _, batches, loss = train_tiny(steps=25)
finish(loss, len(batches))
