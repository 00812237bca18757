"""Samplers write into the store: probe ingest, host and processes, GPUs."""
