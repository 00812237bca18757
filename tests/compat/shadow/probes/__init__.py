"""The user's own package named `probes` (e.g. their evaluation probes)."""

OWNER = "user probes package"
