"""Under a site sitecustomize (on PYTHONPATH) that extends sys.path: what it did is still there."""

import sys

import site_extra
import sitecustomize
from common import finish, train_tiny

print(getattr(sitecustomize, "SITE_MARKER", "the site's sitecustomize is not the one imported"), flush=True)
print(site_extra.VALUE, flush=True)
print("extra_dir on sys.path", any(p.endswith("extra_dir") for p in sys.path), flush=True)
_, _, batches, loss = train_tiny(steps=25)
print("extra_dir still on sys.path", any(p.endswith("extra_dir") for p in sys.path), flush=True)
finish(loss, len(batches))
