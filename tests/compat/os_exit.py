"""Ends with os._exit(0) right after training (as some launchers and notebooks' workers do):
no atexit handler runs."""

import os
import sys

from common import finish, train_tiny

_, _, batches, loss = train_tiny(steps=40)
finish(loss, len(batches))
sys.stdout.flush()
os._exit(0)
