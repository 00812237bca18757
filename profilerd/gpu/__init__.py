"""GPUs: the backend interface (``backend``), the NVML backend (``nvml``, the only importer of
pynvml) and the simulated ``libnvidia-ml.so.1`` the tests and benchmarks load under it
(``simnvml``)."""

from profilerd.gpu.backend import GpuBackend, NoGpuBackend, open_backend

__all__ = ["GpuBackend", "NoGpuBackend", "open_backend"]
