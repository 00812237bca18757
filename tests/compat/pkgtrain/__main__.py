"""`python -m pkgtrain`: sys.path[0] is the cwd, __main__ is this module, __package__ is set."""

import os
import sys

from common import finish, train_tiny

print("package", __package__, "spec", __spec__.name, flush=True)
print("sys.path[0] is the cwd", os.path.abspath(sys.path[0]) == os.getcwd(), flush=True)
print("argv", sys.argv[1:], flush=True)
_, _, batches, loss = train_tiny(steps=25)
finish(loss, len(batches))
