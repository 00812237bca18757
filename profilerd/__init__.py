"""profilerd: GPU telemetry and bottleneck profiler daemon for PyTorch training."""

__version__ = "0.1.0"
