"""A training package run as `python -m pkgtrain`."""
