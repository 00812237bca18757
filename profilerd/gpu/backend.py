"""What the daemon needs from a GPU library, and the choice of one.

The daemon talks only to a ``GpuBackend``. ``NoGpuBackend`` is used when no NVIDIA driver is
present; the NVML backend lives in ``profilerd.gpu.nvml`` (the only importer of pynvml), which
is imported only here, late, so that a host without the bindings still runs in no-GPU mode.
"""

from __future__ import annotations

from typing import Protocol

from profilerd.model import GpuEvent, GpuSample


class GpuBackend(Protocol):
    """A GPU library behind one interface. Implementations never raise from sample()."""

    name: str

    @property
    def available(self) -> bool:
        """False in no-GPU mode."""
        ...

    @property
    def unavailable_reason(self) -> str | None:
        """One line saying why there are no GPUs, or None."""
        ...

    @property
    def error_count(self) -> int:
        """Failed reads since open; answers meaning "not on this device" are not errors."""
        ...

    def sample(self, now_unix_s: float) -> list[GpuSample]:
        """Read every device once; lost devices come back with ``lost=True``."""
        ...

    def drain_events(self) -> list[GpuEvent]:
        """Events (XID, lost, recovered) since the last call."""
        ...

    def close(self) -> None: ...


class NoGpuBackend:
    """No NVIDIA GPU: every sample is empty, and the reason is said once."""

    name = "none"
    error_count = 0

    def __init__(self, reason: str) -> None:
        self._reason = reason

    @property
    def available(self) -> bool:
        return False

    @property
    def unavailable_reason(self) -> str | None:
        return self._reason

    def sample(self, now_unix_s: float) -> list[GpuSample]:
        return []

    def drain_events(self) -> list[GpuEvent]:
        return []

    def close(self) -> None:
        return None
