"""A site's own sitecustomize (as clusters ship): extends sys.path and leaves a marker."""

import os
import sys

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "extra_dir"))
SITE_MARKER = "site sitecustomize ran"
