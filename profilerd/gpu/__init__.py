"""GPUs: the backend interface (``backend``), the NVML backend (``nvml``, the only importer of
pynvml) and the simulated ``libnvidia-ml.so.1`` the tests and benchmarks load under it
(``simnvml``)."""

from __future__ import annotations

from profilerd.gpu.backend import GpuBackend, NoGpuBackend

__all__ = ["GpuBackend", "NoGpuBackend", "open_backend"]


def open_backend(kind: str = "auto") -> GpuBackend:
    """The best backend available: NVML when a driver answers, otherwise no-GPU mode. It lives
    here, not in ``backend``, so that the NVML backend depends on the interface and not back.

    ``kind`` is "auto", "nvml" or "none" (from the config).
    """
    if kind == "none":
        return NoGpuBackend("GPU sampling disabled by configuration")
    try:
        from profilerd.gpu import nvml
    except ImportError as exc:
        return NoGpuBackend(f"NVML backend unavailable: {exc}")
    return nvml.open_backend()
