"""The GPU sampler: one read of every device through the backend, as records for the fan-out."""

from __future__ import annotations

from profilerd.gpu import GpuBackend
from profilerd.samplers.sinks import GpuRecords


class GpuSampler:
    def __init__(self, backend: GpuBackend) -> None:
        self._backend = backend

    def sample(self, now_unix_s: float) -> GpuRecords:
        backend = self._backend
        return GpuRecords(backend.sample(now_unix_s), backend.drain_events(), backend.error_count)
