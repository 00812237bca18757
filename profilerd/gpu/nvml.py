"""The NVML GPU backend: the only module in profilerd that imports pynvml.

Everything the daemon learns about NVIDIA GPUs passes through ``NvmlBackend.sample()``, which
reads each device once per tick into an immutable ``GpuSample`` and never raises. Which metrics
a device supports is decided once, when the device is opened (or recovers): a metric that NVML
answers with NotSupported, FunctionNotFound (an older driver) or NoPermission is cached as
unavailable and never asked for again, so it costs nothing per tick and is exported as absent.

NVML is initialised lazily by ``open_backend()`` under a lock with a reference count and shut
down by the last ``close()``. ``PROFILERD_NVML_LIBRARY`` (or ``library_path``) names another
``libnvidia-ml.so.1`` to load instead of the system one; the tests use it for a simulated
library, so the real bindings run unmodified.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pynvml

from profilerd.gpu.backend import GpuBackend, NoGpuBackend
from profilerd.model import GpuEvent, GpuProcess, GpuSample
from profilerd.vocabulary import ClockEventReason

log = logging.getLogger(__name__)

LIBRARY_ENV = "PROFILERD_NVML_LIBRARY"
GPM_MIN_INTERVAL_S = 0.1  # NVML needs GPM samples at least 100 ms apart
_UINT_MAX = 0xFFFFFFFF  # field-value scope meaning "all NVLink links, summed"


def _const(name: str, default: int) -> int:
    """A pynvml constant, or its documented value on bindings too old to define it."""
    value = getattr(pynvml, name, default)
    return value if isinstance(value, int) else default


# Field values (nvmlDeviceGetFieldValues): (field id, scope id).
_FIELD_MEMORY_TEMP = (_const("NVML_FI_DEV_MEMORY_TEMP", 82), 0)
_FIELD_PCIE_TX = (_const("NVML_FI_DEV_PCIE_COUNT_TX_BYTES", 197), 0)
_FIELD_PCIE_RX = (_const("NVML_FI_DEV_PCIE_COUNT_RX_BYTES", 198), 0)
_FIELD_NVLINK_TX = (_const("NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", 138), _UINT_MAX)  # KiB
_FIELD_NVLINK_RX = (_const("NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX", 139), _UINT_MAX)  # KiB
_FIELDS_BY_CAPABILITY: dict[str, tuple[tuple[int, int], ...]] = {
    "memory_temperature": (_FIELD_MEMORY_TEMP,),
    "pcie_counters": (_FIELD_PCIE_TX, _FIELD_PCIE_RX),
    "nvlink_throughput": (_FIELD_NVLINK_TX, _FIELD_NVLINK_RX),
}

# GPM metric ids -> GpuSample field; NVML reports them in percent.
_GPM_METRICS: tuple[tuple[int, str], ...] = (
    (_const("NVML_GPM_METRIC_SM_UTIL", 2), "sm_active_ratio"),
    (_const("NVML_GPM_METRIC_SM_OCCUPANCY", 3), "sm_occupancy_ratio"),
    (_const("NVML_GPM_METRIC_ANY_TENSOR_UTIL", 5), "tensor_active_ratio"),
    (_const("NVML_GPM_METRIC_DRAM_BW_UTIL", 10), "dram_active_ratio"),
    (_const("NVML_GPM_METRIC_FP16_UTIL", 13), "fp16_active_ratio"),
    (_const("NVML_GPM_METRIC_FP32_UTIL", 12), "fp32_active_ratio"),
    (_const("NVML_GPM_METRIC_FP64_UTIL", 11), "fp64_active_ratio"),
)

# nvmlClocksEventReason* bits (the same bits as the older ThrottleReason names).
_CLOCK_EVENT_REASONS: tuple[tuple[int, ClockEventReason], ...] = (
    (0x001, ClockEventReason.IDLE),
    (0x002, ClockEventReason.APPLICATIONS_CLOCKS),
    (0x004, ClockEventReason.SW_POWER_CAP),
    (0x008, ClockEventReason.HW_SLOWDOWN),
    (0x010, ClockEventReason.SYNC_BOOST),
    (0x020, ClockEventReason.SW_THERMAL),
    (0x040, ClockEventReason.HW_THERMAL),
    (0x080, ClockEventReason.HW_POWER_BRAKE),
    (0x100, ClockEventReason.DISPLAY_CLOCKS),
)
CLOCK_EVENT_REASON_NAMES: tuple[str, ...] = tuple(name for _, name in _CLOCK_EVENT_REASONS)

_EVENT_XID = _const("nvmlEventTypeXidCriticalError", 0x8)

# A few XIDs worth naming in an event's detail; the rest are reported by number.
_XID_MEANINGS: dict[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup",
    48: "double-bit ECC error",
    63: "ECC page retirement or row remapping event",
    64: "ECC page retirement or row remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}

# What each capability feeds; `profilerd doctor` prints this matrix.
CAPABILITIES: dict[str, str] = {
    "utilization": "utilization_gpu_ratio, utilization_memory_ratio",
    "memory": "memory_used_bytes, memory_total_bytes",
    "memory_reserved": "memory_reserved_bytes (nvmlDeviceGetMemoryInfo_v2)",
    "power": "power_watts",
    "energy": "power_average_watts (energy counter)",
    "power_limit": "power_limit_watts",
    "temperature": "temperature_celsius",
    "memory_temperature": "memory_temperature_celsius",
    "sm_clock": "sm_clock_hertz",
    "memory_clock": "memory_clock_hertz",
    "sm_clock_max": "sm_clock_max_hertz",
    "memory_clock_max": "memory_clock_max_hertz",
    "clock_event_reasons": "clock_event_reasons",
    "pcie_counters": "pcie_tx/rx_bytes_per_second",
    "nvlink_throughput": "nvlink_tx/rx_bytes_per_second",
    "ecc": "ecc_corrected_total, ecc_uncorrected_total",
    "remapped_rows": "remapped_rows_total",
    "mig": "mig_enabled, extra['mig_instances']",
    "gpm": "sm_active, sm_occupancy, tensor, dram, fp16/32/64 ratios (Hopper+)",
    "processes": "processes[].used_memory_bytes",
    "process_utilization": "processes[].sm_utilization_ratio",
    "xid_events": "XID events",
}

# Answers that mean "this device will never give this metric": cached, not counted as errors.
# (ArgumentVersionMismatch: a versioned struct newer than the driver; absent from old bindings.)
_UNAVAILABLE: tuple[type[BaseException], ...] = tuple(
    cls
    for cls in (
        pynvml.NVMLError_NotSupported,
        pynvml.NVMLError_FunctionNotFound,
        pynvml.NVMLError_NoPermission,
        getattr(pynvml, "NVMLError_ArgumentVersionMismatch", None),
    )
    if isinstance(cls, type)
)


class _GpuLost(Exception):
    """Raised inside a device read when NVML says the GPU is lost; never leaves this module."""


class _Miss(enum.Enum):
    """Why an NVML call gave no value (see ``NvmlBackend._call``)."""

    UNSUPPORTED = "never on this device"  # the caller caches the capability as unavailable
    FAILED = "failed"  # counted as an error; asked again next time
    NOTHING = "nothing to report"  # an expected answer such as NotFound (an empty MIG slot)


def _ask(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, with NVML's GPU-lost answer turned into ``_GpuLost``."""
    try:
        return fn(*args)
    except pynvml.NVMLError_GpuIsLost as exc:
        raise _GpuLost(str(exc)) from exc


def _text(value: object) -> str:
    """pynvml returns str on Python 3 for most strings, bytes from some older releases."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _address(handle: Any) -> int:
    """The pointer value of an NVML handle, for matching event data to devices."""
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


# --------------------------------------------------------------------------- PID namespaces


class PidNamespaceMapper:
    """Maps the host PIDs NVML reports into the daemon's PID namespace.

    ``/proc/<pid>/status`` NSpid lists a process's PID in each namespace it belongs to, from
    the namespace of the procfs mount inward. The daemon's own depth (the length of its NSpid)
    says which column is "its" namespace. With the host's procfs (``proc_root`` pointing at a
    bind mount of it when the daemon runs in a container), a process inside the daemon's
    namespace is found at that column; one outside it has no PID the daemon can use.
    """

    def __init__(self, proc_root: str | os.PathLike[str] = "/proc") -> None:
        self._root = Path(proc_root)
        self._depth: int | None = None
        self._self_ns: str | None = None

    def _nspid(self, pid: str) -> list[int] | None:
        try:
            text = (self._root / pid / "status").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("NSpid:"):
                try:
                    return [int(part) for part in line.split()[1:]]
                except ValueError:
                    return None
        return [int(pid)] if pid.isdigit() else None  # kernels before 4.1 have no NSpid

    def _ns_link(self, pid: str) -> str | None:
        try:
            return os.readlink(self._root / pid / "ns" / "pid")
        except OSError:
            return None

    def _own_depth(self) -> int:
        if self._depth is None:
            own = self._nspid("self")
            self._depth = len(own) if own else 1
            self._self_ns = self._ns_link("self")
        return self._depth

    def map(self, host_pid: int) -> int | None:
        """The PID in the daemon's namespace, or None when the process is outside it or gone."""
        depth = self._own_depth()
        chain = self._nspid(str(host_pid))
        if not chain or len(chain) < depth:
            return None
        if depth > 1 and len(chain) == depth and self._self_ns is not None:
            # Same depth: only a process in exactly our namespace is ours, not a sibling's.
            other = self._ns_link(str(host_pid))
            if other is not None and other != self._self_ns:
                return None
        return chain[depth - 1]


# --------------------------------------------------------------------------- NVML session


class _LibraryUnavailable(Exception):
    """The configured NVML library could not be loaded; the message is the no-GPU reason."""


class _NvmlSession:
    """One process-wide NVML initialisation, shared by every open backend.

    The lock makes init/shutdown and the choice of library atomic; the reference count makes
    the last close() the one that calls nvmlShutdown().
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refcount = 0
        self._custom_path: str | None = None

    def acquire(self, library_path: str | None) -> None:
        with self._lock:
            if self._refcount == 0:
                self._select_library(library_path)
                pynvml.nvmlInit()
            elif library_path != self._custom_path:
                raise _LibraryUnavailable(f"NVML is already open with {self._custom_path or 'the system library'}")
            self._refcount += 1

    def release(self) -> None:
        with self._lock:
            if self._refcount == 0:
                return
            self._refcount -= 1
            if self._refcount == 0:
                try:
                    pynvml.nvmlShutdown()
                except pynvml.NVMLError as exc:
                    log.warning("nvmlShutdown failed: %s", exc)

    def _select_library(self, library_path: str | None) -> None:
        if library_path == self._custom_path:
            return
        lib: ctypes.CDLL | None = None
        if library_path is not None:
            try:
                lib = ctypes.CDLL(library_path)
            except OSError as exc:
                raise _LibraryUnavailable(f"cannot load NVML library {library_path} ({LIBRARY_ENV}): {exc}") from exc
        with pynvml.libLoadLock:
            # None makes pynvml load the system libnvidia-ml.so.1 by soname on nvmlInit().
            pynvml.nvmlLib = lib
            # pynvml caches function pointers by name; stale ones would call the old library.
            cache = getattr(pynvml, "_nvmlGetFunctionPointer_cache", None)
            if isinstance(cache, dict):
                cache.clear()
        self._custom_path = library_path


_SESSION = _NvmlSession()


def _init_failure_reason(exc: BaseException) -> str:
    if isinstance(exc, pynvml.NVMLError_LibraryNotFound):
        return (
            "NVIDIA driver library libnvidia-ml.so.1 not found: no NVIDIA driver on this host, "
            "or the container was started without GPU access (--gpus / NVIDIA runtime)"
        )
    if isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        return "NVIDIA kernel driver is not loaded (NVML: Driver Not Loaded)"
    if isinstance(exc, pynvml.NVMLError_LibRmVersionMismatch):
        return (
            "NVML library and NVIDIA kernel driver versions differ (driver updated without a reboot or module reload)"
        )
    if isinstance(exc, pynvml.NVMLError_NoPermission):
        return "no permission to open the NVIDIA devices (/dev/nvidia*)"
    return f"NVML initialisation failed: {exc}"


def open_backend(library_path: str | os.PathLike[str] | None = None, **options: Any) -> GpuBackend:
    """Open NVML and every GPU it lists, or explain in one line why there are none.

    ``library_path`` (default: ``$PROFILERD_NVML_LIBRARY``, else the system library) names the
    NVML library to load; ``options`` are those of ``NvmlBackend``.
    """
    path = library_path if library_path is not None else os.environ.get(LIBRARY_ENV) or None
    path_str = os.fspath(path) if path is not None else None
    try:
        _SESSION.acquire(path_str)
    except _LibraryUnavailable as exc:
        return NoGpuBackend(str(exc))
    except pynvml.NVMLError as exc:
        return NoGpuBackend(_init_failure_reason(exc))
    try:
        backend = NvmlBackend(**options)
    except pynvml.NVMLError as exc:
        _SESSION.release()
        return NoGpuBackend(f"NVML started but could not list the GPUs: {exc}")
    if not backend.devices():
        driver = backend.driver_version or "unknown"
        unopened = "; ".join(f"[{i}] {why}" for i, why in sorted(backend.unopened.items()))
        backend.close()
        if unopened:
            return NoGpuBackend(f"NVIDIA driver {driver}: no GPU could be opened ({unopened})")
        return NoGpuBackend(
            f"NVIDIA driver {driver} is loaded but NVML lists no GPUs "
            "(check CUDA_VISIBLE_DEVICES/NVIDIA_VISIBLE_DEVICES and container device access)"
        )
    return backend


# --------------------------------------------------------------------------- devices


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """Identity of one GPU as the backend currently knows it."""

    index: int
    uuid: str
    name: str
    lost: bool


@dataclass
class _Gpm:
    """Two rotating GPM sample buffers: ``older`` holds the last reading, ``newer`` is filled."""

    older: Any
    newer: Any
    older_taken_at: float
    request: Any = None
    values: dict[str, float | None] = field(default_factory=dict)


@dataclass
class _Device:
    index: int
    handle: Any = None
    uuid: str = ""
    name: str = ""
    caps: dict[str, bool] = field(default_factory=dict)
    variant: dict[str, Callable[..., Any]] = field(default_factory=dict)
    sm_clock_max_hz: float | None = None
    memory_clock_max_hz: float | None = None
    counters: dict[str, tuple[float, float]] = field(default_factory=dict)
    gpm: _Gpm | None = None
    proc_util_last_ts: int = 0
    pid_map: dict[int, int | None] = field(default_factory=dict)  # host pid -> ours, last tick
    lost: bool = False
    lost_since: float = 0.0
    retry_at: float = 0.0
    backoff_s: float = 0.0


def _memory_v2(handle: Any) -> Any:
    return pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)


def _temperature_v(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetTemperatureV(handle, pynvml.NVML_TEMPERATURE_GPU))


def _temperature_legacy(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))


def _variants(*names: str) -> list[tuple[str, Callable[..., Any]]]:
    """The pynvml functions among ``names`` that these bindings define, in order of preference."""
    found = [(name, getattr(pynvml, name, None)) for name in names]
    return [(name, fn) for name, fn in found if callable(fn)]


_MEMORY_VARIANTS: list[tuple[str, Callable[..., Any]]] = [
    *([("nvmlDeviceGetMemoryInfo_v2", _memory_v2)] if hasattr(pynvml, "nvmlMemory_v2") else []),
    ("nvmlDeviceGetMemoryInfo", pynvml.nvmlDeviceGetMemoryInfo),
]
_TEMPERATURE_VARIANTS: list[tuple[str, Callable[..., Any]]] = [
    *([("nvmlDeviceGetTemperatureV", _temperature_v)] if hasattr(pynvml, "nvmlDeviceGetTemperatureV") else []),
    ("nvmlDeviceGetTemperature", _temperature_legacy),
]
_CLOCK_REASON_VARIANTS = _variants(
    "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"
)
_PROCESS_VARIANTS = _variants("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2")


# nvmlValueType_t -> the member of nvmlValue_t that holds the number.
_FIELD_VALUE_MEMBERS: dict[int, str] = {
    pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
    _const("NVML_VALUE_TYPE_UNSIGNED_SHORT", 6): "usVal",
}


def _field_number(value: Any) -> float | None:
    """The number inside one nvmlFieldValue_t, or None when NVML returned an error for it."""
    if value.nvmlReturn != pynvml.NVML_SUCCESS:
        return None
    member = _FIELD_VALUE_MEMBERS.get(value.valueType)
    return None if member is None else float(getattr(value.value, member))


def _decode_clock_reasons(mask: int) -> tuple[str, ...]:
    return tuple(name for bit, name in _CLOCK_EVENT_REASONS if mask & bit)


def _xid_detail(xid: int) -> str:
    meaning = _XID_MEANINGS.get(xid)
    return f"Xid {xid}: {meaning}" if meaning else f"Xid {xid}"


class NvmlBackend:
    """GPUs read through NVML. Build it with ``open_backend()``, which initialises NVML first.

    ``sample()`` never raises: a failed read leaves that field None and is counted in
    ``error_count`` (per metric in ``error_counts()``); a lost GPU is reported with
    ``lost=True``, not polled, and retried with exponential backoff.

    ``proc_root`` is where host PIDs are looked up (NSpid). ``clock`` is a monotonic clock used
    to space GPM samples; rates and lost-GPU backoff follow the ``now_unix_s`` given to
    ``sample()``. XID events are stamped with ``wall_clock``.
    """

    name = "nvml"

    def __init__(
        self,
        *,
        proc_root: str | os.PathLike[str] = "/proc",
        watch_events: bool = True,
        event_timeout_ms: int = 500,
        lost_backoff_initial_s: float = 1.0,
        lost_backoff_max_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._backoff_initial_s = lost_backoff_initial_s
        self._backoff_max_s = lost_backoff_max_s
        self._pids = PidNamespaceMapper(proc_root)
        self._lock = threading.Lock()  # devices: sample() against close()
        self._stats_lock = threading.Lock()  # errors and events: also written by the XID thread
        self._errors: dict[str, int] = {}
        self._warned: set[tuple[int | None, str]] = set()
        self._events: list[GpuEvent] = []
        self._closed = False
        self.driver_version = self._system_string(pynvml.nvmlSystemGetDriverVersion)
        self.nvml_version = self._system_string(pynvml.nvmlSystemGetNVMLVersion)
        self.cuda_driver_version = self._cuda_version()
        self.binding_version = self._binding_version()
        self.unopened: dict[int, str] = {}  # GPU index -> why it could not be opened
        opened = (self._open_device(i) for i in range(pynvml.nvmlDeviceGetCount()))
        self._devices = [dev for dev in opened if dev is not None]
        self._watcher: _XidWatcher | None = None
        if watch_events and self._devices:
            self._watcher = self._start_watcher(event_timeout_ms)

    # ------------------------------------------------------------------ GpuBackend protocol

    @property
    def available(self) -> bool:
        return True

    @property
    def unavailable_reason(self) -> str | None:
        return None

    def sample(self, now_unix_s: float) -> list[GpuSample]:
        """Read every GPU once; never raises."""
        with self._lock:
            if self._closed:
                return []
            return [self._sample_device(dev, now_unix_s) for dev in self._devices]

    def drain_events(self) -> list[GpuEvent]:
        with self._stats_lock:
            events, self._events = self._events, []
        return events

    def close(self) -> None:
        """Stop the XID thread, free NVML objects and drop this backend's NVML reference."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._watcher is not None:
                self._watcher.stop()
                self._watcher = None
            for dev in self._devices:
                self._free_gpm(dev)
        _SESSION.release()

    # ------------------------------------------------------------------ doctor / health

    @property
    def error_count(self) -> int:
        """Failed NVML reads since open (NotSupported and similar are not errors)."""
        with self._stats_lock:
            return sum(self._errors.values())

    def error_counts(self) -> dict[str, int]:
        """Failed reads per metric."""
        with self._stats_lock:
            return dict(self._errors)

    def capabilities(self) -> dict[int, dict[str, bool]]:
        """Per GPU index, which capabilities (keys of ``CAPABILITIES``) it supports."""
        with self._lock:
            return {dev.index: {cap: dev.caps.get(cap, False) for cap in CAPABILITIES} for dev in self._devices}

    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo(d.index, d.uuid, d.name, d.lost) for d in self._devices]

    # ------------------------------------------------------------------ opening and probing

    def _system_string(self, fn: Callable[[], Any]) -> str | None:
        try:
            return _text(fn())
        except pynvml.NVMLError as exc:
            log.debug("%s failed: %s", getattr(fn, "__name__", fn), exc)
            return None

    def _cuda_version(self) -> str | None:
        for name in ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"):
            fn = getattr(pynvml, name, None)
            if fn is None:
                continue
            try:
                version = int(fn())
            except pynvml.NVMLError:
                continue
            return f"{version // 1000}.{(version % 1000) // 10}"
        return None

    @staticmethod
    def _binding_version() -> str | None:
        try:
            return metadata.version("nvidia-ml-py")
        except metadata.PackageNotFoundError:
            return None

    def _open_device(self, index: int) -> _Device | None:
        """A GPU ready to sample, lost (to be retried), or None when NVML refuses it outright.

        Containers often see every GPU in the count but may open only their own ones
        (NoPermission): those are left out and listed in ``unopened`` for `profilerd doctor`.
        """
        dev = _Device(index=index)
        try:
            self._identify(dev)
            self._probe(dev)
        except _GpuLost as exc:
            self._mark_lost(dev, self._wall_clock(), str(exc), retry_now=True)
        except pynvml.NVMLError as exc:
            self._count_error(index, "open", exc)
            self.unopened[index] = str(exc)
            return None
        return dev

    def _identify(self, dev: _Device) -> None:
        """Handle, uuid and name; any failure but a lost GPU propagates (the device is not opened)."""
        dev.handle = _ask(pynvml.nvmlDeviceGetHandleByIndex, dev.index)
        dev.uuid = _text(_ask(pynvml.nvmlDeviceGetUUID, dev.handle))
        dev.name = _text(_ask(pynvml.nvmlDeviceGetName, dev.handle))

    def _probe(self, dev: _Device) -> None:
        """Decide once which metrics this device supports (and read the static ones)."""
        h = dev.handle
        caps: dict[str, bool] = {}
        dev.caps = caps
        dev.variant = {}
        dev.counters = {}
        dev.proc_util_last_ts = 0
        dev.pid_map = {}
        caps["utilization"] = self._probe_call(dev, pynvml.nvmlDeviceGetUtilizationRates, h)
        self._probe_variants(dev, "memory", _MEMORY_VARIANTS)
        caps["memory_reserved"] = dev.variant.get("memory") is _memory_v2
        caps["power"] = self._probe_call(dev, pynvml.nvmlDeviceGetPowerUsage, h)
        caps["energy"] = self._probe_call(dev, pynvml.nvmlDeviceGetTotalEnergyConsumption, h)
        caps["power_limit"] = self._probe_call(dev, pynvml.nvmlDeviceGetEnforcedPowerLimit, h)
        self._probe_variants(dev, "temperature", _TEMPERATURE_VARIANTS)
        caps["sm_clock"] = self._probe_call(dev, pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM)
        caps["memory_clock"] = self._probe_call(dev, pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_MEM)
        dev.sm_clock_max_hz = self._static_clock(dev, "sm_clock_max", pynvml.NVML_CLOCK_SM)
        dev.memory_clock_max_hz = self._static_clock(dev, "memory_clock_max", pynvml.NVML_CLOCK_MEM)
        self._probe_variants(dev, "clock_event_reasons", _CLOCK_REASON_VARIANTS)
        self._probe_fields(dev)
        caps["ecc"] = self._probe_call(
            dev,
            pynvml.nvmlDeviceGetTotalEccErrors,
            h,
            pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            pynvml.NVML_VOLATILE_ECC,
        )
        caps["remapped_rows"] = self._probe_call(dev, getattr(pynvml, "nvmlDeviceGetRemappedRows", None), h)
        caps["mig"] = self._probe_call(dev, getattr(pynvml, "nvmlDeviceGetMigMode", None), h)
        caps["gpm"] = self._probe_gpm(dev)
        self._probe_variants(dev, "processes", _PROCESS_VARIANTS)
        caps["process_utilization"] = self._probe_process_utilization(dev)
        caps.setdefault("xid_events", False)

    def _probe_call(self, dev: _Device, fn: Callable[..., Any] | None, *args: Any) -> bool:
        """True unless NVML says this device will never answer ``fn``.

        Any other failure counts as an error and keeps the metric, to be retried next tick.
        """
        if fn is None:
            return False
        return self._call(dev.index, getattr(fn, "__name__", "probe"), fn, *args) is not _Miss.UNSUPPORTED

    def _probe_variants(self, dev: _Device, cap: str, variants: Sequence[tuple[str, Callable[..., Any]]]) -> None:
        """Use the newest NVML entry point this driver has (e.g. _v2 before the original)."""
        for _, fn in variants:
            if self._probe_call(dev, fn, dev.handle):
                dev.variant[cap] = fn
                dev.caps[cap] = True
                return
        dev.caps[cap] = False

    def _static_clock(self, dev: _Device, cap: str, clock_type: int) -> float | None:
        mhz = self._call(dev.index, cap, pynvml.nvmlDeviceGetMaxClockInfo, dev.handle, clock_type)
        dev.caps[cap] = not isinstance(mhz, _Miss)
        return None if isinstance(mhz, _Miss) else float(mhz) * 1e6

    def _probe_fields(self, dev: _Device) -> None:
        ids = [fid for fields in _FIELDS_BY_CAPABILITY.values() for fid in fields]
        values = self._call(dev.index, "field_values", pynvml.nvmlDeviceGetFieldValues, dev.handle, ids)
        if isinstance(values, _Miss):
            for cap in _FIELDS_BY_CAPABILITY:
                dev.caps[cap] = False
            return
        returns = {(v.fieldId, v.scopeId): v.nvmlReturn for v in values}
        unsupported = {
            pynvml.NVML_ERROR_NOT_SUPPORTED,
            pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
            pynvml.NVML_ERROR_NO_PERMISSION,
            pynvml.NVML_ERROR_INVALID_ARGUMENT,  # a field id this driver does not know
        }
        for cap, fields in _FIELDS_BY_CAPABILITY.items():
            dev.caps[cap] = all(returns.get(fid) not in unsupported for fid in fields)

    def _probe_gpm(self, dev: _Device) -> bool:
        query = getattr(pynvml, "nvmlGpmQueryDeviceSupport", None)
        if query is None:
            return False
        support = self._call(dev.index, "gpm", query, dev.handle)
        if isinstance(support, _Miss) or not support.isSupportedDevice:
            return False
        older = self._call(dev.index, "gpm", pynvml.nvmlGpmSampleAlloc)
        if isinstance(older, _Miss):
            return False
        newer = self._call(dev.index, "gpm", pynvml.nvmlGpmSampleAlloc)
        dev.gpm = _Gpm(older=older, newer=newer, older_taken_at=0.0)
        if isinstance(newer, _Miss):
            dev.gpm.newer = None
            self._free_gpm(dev)
            return False
        try:
            # The first sample also tells us whether GPM works (it does not under MIG).
            first = self._call(dev.index, "gpm", pynvml.nvmlGpmSampleGet, dev.handle, older)
        except _GpuLost:
            self._free_gpm(dev)
            raise
        if isinstance(first, _Miss):
            self._free_gpm(dev)
            return False
        dev.gpm.older_taken_at = self._clock()
        return True

    def _probe_process_utilization(self, dev: _Device) -> bool:
        # NotFound: supported, just no sample yet.
        answer = self._call(
            dev.index,
            "process_utilization",
            pynvml.nvmlDeviceGetProcessUtilization,
            dev.handle,
            0,
            expected=(pynvml.NVMLError_NotFound,),
        )
        return answer is not _Miss.UNSUPPORTED

    def _free_gpm(self, dev: _Device) -> None:
        gpm, dev.gpm = dev.gpm, None
        if gpm is None:
            return
        for sample in (gpm.older, gpm.newer):
            if sample is None:
                continue
            try:
                pynvml.nvmlGpmSampleFree(sample)
            except pynvml.NVMLError as exc:
                log.debug("nvmlGpmSampleFree failed on GPU %d: %s", dev.index, exc)

    # ------------------------------------------------------------------ XID events

    def _start_watcher(self, timeout_ms: int) -> _XidWatcher | None:
        event_set = self._call(None, "xid_events", pynvml.nvmlEventSetCreate, lost_raises=False)
        if isinstance(event_set, _Miss):
            return None
        watcher = _XidWatcher(self, event_set, timeout_ms)
        for dev in self._devices:
            if not dev.lost:
                self._register_xid(dev, watcher)
        if not any(dev.caps.get("xid_events") for dev in self._devices):
            watcher.free()
            return None
        watcher.start()
        return watcher

    def _register_xid(self, dev: _Device, watcher: _XidWatcher) -> None:
        # A GPU lost here is counted only: the next sample() finds it lost and says so.
        supported = self._call(
            dev.index, "xid_events", pynvml.nvmlDeviceGetSupportedEventTypes, dev.handle, lost_raises=False
        )
        registered = (
            not isinstance(supported, _Miss)
            and supported & _EVENT_XID
            and not isinstance(
                self._call(
                    dev.index,
                    "xid_events",
                    pynvml.nvmlDeviceRegisterEvents,
                    dev.handle,
                    _EVENT_XID,
                    watcher.event_set,
                    lost_raises=False,
                ),
                _Miss,
            )
        )
        dev.caps["xid_events"] = bool(registered)
        if registered:
            watcher.handles[_address(dev.handle)] = dev.index

    def _add_event(self, event: GpuEvent) -> None:
        with self._stats_lock:
            self._events.append(event)

    # ------------------------------------------------------------------ lost GPUs

    def _mark_lost(self, dev: _Device, now: float, detail: str, *, retry_now: bool = False) -> None:
        self._free_gpm(dev)
        dev.lost = True
        dev.lost_since = now
        dev.counters = {}
        dev.backoff_s = self._backoff_initial_s
        dev.retry_at = float("-inf") if retry_now else now + dev.backoff_s
        log.warning("GPU %d (%s) is lost: %s", dev.index, dev.uuid or "uuid unknown", detail)
        self._add_event(GpuEvent(now, dev.index, "lost", f"GPU is lost: {detail}"))

    def _try_recover(self, dev: _Device, now: float) -> bool:
        old_uuid = dev.uuid
        try:
            self._identify(dev)
            self._probe(dev)
        except (_GpuLost, pynvml.NVMLError) as exc:
            self._free_gpm(dev)
            dev.backoff_s = min(self._backoff_max_s, max(dev.backoff_s, 1e-3) * 2)
            dev.retry_at = now + dev.backoff_s
            log.debug("GPU %d still lost (%s); next try in %.1f s", dev.index, exc, dev.backoff_s)
            return False
        dev.lost = False
        if self._watcher is not None:
            self._register_xid(dev, self._watcher)
        detail = f"GPU answers again after {max(0.0, now - dev.lost_since):.1f} s"
        if old_uuid and old_uuid != dev.uuid:
            detail += f"; uuid changed from {old_uuid}"
        log.warning("GPU %d (%s) recovered: %s", dev.index, dev.uuid, detail)
        self._add_event(GpuEvent(now, dev.index, "recovered", detail))
        return True

    # ------------------------------------------------------------------ sampling

    def _sample_device(self, dev: _Device, now: float) -> GpuSample:
        if dev.lost and (now < dev.retry_at or not self._try_recover(dev, now)):
            return GpuSample(ts_unix_s=now, index=dev.index, uuid=dev.uuid, name=dev.name, lost=True)
        try:
            return self._read_device(dev, now)
        except _GpuLost as exc:
            self._mark_lost(dev, now, str(exc))
            return GpuSample(ts_unix_s=now, index=dev.index, uuid=dev.uuid, name=dev.name, lost=True)
        except Exception as exc:
            # A bug or an unexpected binding failure must not stop the sampler: count it and
            # return the identity only, so the GPU stays visible.
            self._count_error(dev.index, "internal", exc, exc_info=True)
            return GpuSample(ts_unix_s=now, index=dev.index, uuid=dev.uuid, name=dev.name)

    def _read(self, dev: _Device, cap: str, fn: Callable[..., Any], *args: Any) -> Any:
        """One NVML read for a supported capability; None if unsupported or failed."""
        if not dev.caps.get(cap):
            return None
        answer = self._call(dev.index, cap, fn, *args)
        if answer is _Miss.UNSUPPORTED:
            dev.caps[cap] = False  # decided now, for good
        return None if isinstance(answer, _Miss) else answer

    def _rate(self, dev: _Device, key: str, now: float, value: float | None) -> float | None:
        """Per-second change of a cumulative counter since the previous tick."""
        if value is None:
            return None
        prev = dev.counters.get(key)
        dev.counters[key] = (now, value)
        if prev is None or now <= prev[0] or value < prev[1]:
            return None  # first reading, clock went back, or the counter wrapped/reset
        return (value - prev[1]) / (now - prev[0])

    def _read_device(self, dev: _Device, now: float) -> GpuSample:
        h = dev.handle
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}

        util = self._read(dev, "utilization", pynvml.nvmlDeviceGetUtilizationRates, h)
        if util is not None:
            values["utilization_gpu_ratio"] = util.gpu / 100.0
            values["utilization_memory_ratio"] = util.memory / 100.0

        mem = self._read(dev, "memory", dev.variant.get("memory", _memory_v2), h)
        if mem is not None:
            values["memory_used_bytes"] = int(mem.used)
            values["memory_total_bytes"] = int(mem.total)
            if dev.caps.get("memory_reserved"):
                values["memory_reserved_bytes"] = int(mem.reserved)

        power_mw = self._read(dev, "power", pynvml.nvmlDeviceGetPowerUsage, h)
        if power_mw is not None:
            values["power_watts"] = power_mw / 1000.0
        energy_mj = self._read(dev, "energy", pynvml.nvmlDeviceGetTotalEnergyConsumption, h)
        avg_mw = self._rate(dev, "energy", now, energy_mj)
        if avg_mw is not None:
            values["power_average_watts"] = avg_mw / 1000.0
        limit_mw = self._read(dev, "power_limit", pynvml.nvmlDeviceGetEnforcedPowerLimit, h)
        if limit_mw is not None:
            values["power_limit_watts"] = limit_mw / 1000.0

        temp = self._read(dev, "temperature", dev.variant.get("temperature", _temperature_v), h)
        if temp is not None:
            values["temperature_celsius"] = float(temp)

        sm = self._read(dev, "sm_clock", pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM)
        if sm is not None:
            values["sm_clock_hertz"] = sm * 1e6
        mclk = self._read(dev, "memory_clock", pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_MEM)
        if mclk is not None:
            values["memory_clock_hertz"] = mclk * 1e6
        values["sm_clock_max_hertz"] = dev.sm_clock_max_hz
        values["memory_clock_max_hertz"] = dev.memory_clock_max_hz

        reasons_fn = dev.variant.get("clock_event_reasons")
        if reasons_fn is not None:
            mask = self._read(dev, "clock_event_reasons", reasons_fn, h)
            if mask is not None:
                values["clock_event_reasons"] = _decode_clock_reasons(int(mask))

        self._read_fields(dev, now, values)
        self._read_ecc(dev, values, extra)

        mig = self._read(dev, "mig", pynvml.nvmlDeviceGetMigMode, h)
        if mig is not None:
            values["mig_enabled"] = bool(mig[0] == pynvml.NVML_DEVICE_MIG_ENABLE)
            if values["mig_enabled"]:
                extra["mig_instances"] = self._mig_instances(dev)

        values.update(self._read_gpm(dev))
        processes = self._read_processes(dev, extra)

        return GpuSample(
            ts_unix_s=now,
            index=dev.index,
            uuid=dev.uuid,
            name=dev.name,
            processes=processes,
            extra=extra,
            **values,
        )

    def _read_fields(self, dev: _Device, now: float, values: dict[str, Any]) -> None:
        wanted = [cap for cap in _FIELDS_BY_CAPABILITY if dev.caps.get(cap)]
        if not wanted:
            return
        ids = [fid for cap in wanted for fid in _FIELDS_BY_CAPABILITY[cap]]
        raw = self._call(dev.index, "field_values", pynvml.nvmlDeviceGetFieldValues, dev.handle, ids)
        if raw is _Miss.UNSUPPORTED:
            for cap in wanted:
                dev.caps[cap] = False
        if isinstance(raw, _Miss):
            return
        got: dict[tuple[int, int], float | None] = {}
        for item in raw:
            key = (int(item.fieldId), int(item.scopeId))
            got[key] = _field_number(item)
            if item.nvmlReturn == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise _GpuLost("GPU is lost (field values)")
            if item.nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED:
                for cap in wanted:
                    if key in _FIELDS_BY_CAPABILITY[cap]:
                        dev.caps[cap] = False
            elif item.nvmlReturn != pynvml.NVML_SUCCESS:
                self._count_error(dev.index, f"field_{key[0]}", pynvml.NVMLError(item.nvmlReturn))

        temp = got.get(_FIELD_MEMORY_TEMP)
        if temp is not None:
            values["memory_temperature_celsius"] = temp
        values["pcie_tx_bytes_per_second"] = self._rate(dev, "pcie_tx", now, got.get(_FIELD_PCIE_TX))
        values["pcie_rx_bytes_per_second"] = self._rate(dev, "pcie_rx", now, got.get(_FIELD_PCIE_RX))
        nv_tx = self._rate(dev, "nvlink_tx", now, got.get(_FIELD_NVLINK_TX))
        nv_rx = self._rate(dev, "nvlink_rx", now, got.get(_FIELD_NVLINK_RX))
        values["nvlink_tx_bytes_per_second"] = None if nv_tx is None else nv_tx * 1024.0
        values["nvlink_rx_bytes_per_second"] = None if nv_rx is None else nv_rx * 1024.0

    def _read_ecc(self, dev: _Device, values: dict[str, Any], extra: dict[str, Any]) -> None:
        h = dev.handle
        for kind, key in (
            (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, "ecc_corrected_total"),
            (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, "ecc_uncorrected_total"),
        ):
            count = self._read(dev, "ecc", pynvml.nvmlDeviceGetTotalEccErrors, h, kind, pynvml.NVML_VOLATILE_ECC)
            if count is not None:
                values[key] = int(count)
        remap_fn = getattr(pynvml, "nvmlDeviceGetRemappedRows", None)
        rows = self._read(dev, "remapped_rows", remap_fn, h) if remap_fn else None
        if rows is not None:
            corrected, uncorrected, pending, failure = rows
            values["remapped_rows_total"] = int(corrected) + int(uncorrected)
            extra["remapped_rows_pending"] = bool(pending)
            extra["remapped_rows_failure"] = bool(failure)

    def _mig_instances(self, dev: _Device) -> list[dict[str, Any]]:
        """Per MIG device: GPU instance id, uuid and memory (parent-level GPM/utilisation is N/A)."""
        instances: list[dict[str, Any]] = []
        count = self._call(dev.index, "mig", pynvml.nvmlDeviceGetMaxMigDeviceCount, dev.handle)
        if isinstance(count, _Miss):
            return instances
        empty_slot = (pynvml.NVMLError_NotFound, pynvml.NVMLError_InvalidArgument)
        for slot in range(count):
            mig = self._call(
                dev.index, "mig", pynvml.nvmlDeviceGetMigDeviceHandleByIndex, dev.handle, slot, expected=empty_slot
            )
            if isinstance(mig, _Miss):
                continue
            info: dict[str, Any] = {"slot": slot}
            for key, fn in (
                ("gpu_instance_id", pynvml.nvmlDeviceGetGpuInstanceId),
                ("uuid", pynvml.nvmlDeviceGetUUID),
                ("memory", pynvml.nvmlDeviceGetMemoryInfo),
            ):
                value = self._call(dev.index, "mig", fn, mig)
                if not isinstance(value, _Miss):
                    info[key] = value
            memory = info.pop("memory", None)
            if "uuid" in info:
                info["uuid"] = _text(info["uuid"])
            if memory is not None:
                info["memory_used_bytes"] = int(memory.used)
                info["memory_total_bytes"] = int(memory.total)
            instances.append(info)
        return instances

    def _read_gpm(self, dev: _Device) -> dict[str, float | None]:
        """GPM ratios from the two newest samples, taken no closer than GPM_MIN_INTERVAL_S.

        Called faster than that, the previous values are returned again rather than nothing.
        """
        gpm = dev.gpm
        if gpm is None or not dev.caps.get("gpm"):
            return {}
        if self._clock() - gpm.older_taken_at < GPM_MIN_INTERVAL_S:
            return gpm.values
        got = self._call(dev.index, "gpm", pynvml.nvmlGpmSampleGet, dev.handle, gpm.newer)
        if got is _Miss.UNSUPPORTED:
            dev.caps["gpm"] = False
            self._free_gpm(dev)
            return {}
        if isinstance(got, _Miss):
            return gpm.values
        # Read the clock after the call so the next sample is >= 100 ms after this one.
        taken_at = self._clock()
        request = gpm.request
        if request is None:
            # Built once: NVML only writes the results, so ids and version stay as set.
            request = gpm.request = pynvml.c_nvmlGpmMetricsGet_t()
            request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
            request.numMetrics = len(_GPM_METRICS)
            for i, (metric_id, _) in enumerate(_GPM_METRICS):
                request.metrics[i].metricId = metric_id
        request.sample1 = gpm.older
        request.sample2 = gpm.newer
        # The sample just taken becomes the baseline for the next tick whatever happens next.
        gpm.older, gpm.newer = gpm.newer, gpm.older
        gpm.older_taken_at = taken_at
        if isinstance(self._call(dev.index, "gpm", pynvml.nvmlGpmMetricsGet, request), _Miss):
            gpm.values = {}
            return gpm.values
        result: dict[str, float | None] = {}
        for i, (_, key) in enumerate(_GPM_METRICS):
            metric = request.metrics[i]
            ok = metric.nvmlReturn == pynvml.NVML_SUCCESS
            result[key] = min(1.0, max(0.0, metric.value / 100.0)) if ok else None
        gpm.values = result
        return result

    def _read_processes(self, dev: _Device, extra: dict[str, Any]) -> tuple[GpuProcess, ...]:
        list_fn = dev.variant.get("processes")
        procs = self._read(dev, "processes", list_fn, dev.handle) if list_fn else None
        if not procs:
            dev.pid_map = {}
            return ()
        sm_by_pid = self._process_sm_utilization(dev)
        result: list[GpuProcess] = []
        outside = 0
        outside_bytes = 0
        # A PID listed on consecutive ticks is the same process (it never left the GPU), so
        # its /proc lookup is reused; one that drops off the list is looked up afresh.
        known, dev.pid_map = dev.pid_map, {}
        for proc in procs:
            host_pid = int(proc.pid)
            used = proc.usedGpuMemory
            used_bytes = None if used is None else int(used)
            pid = known[host_pid] if host_pid in known else self._pids.map(host_pid)
            dev.pid_map[host_pid] = pid
            if pid is None:
                outside += 1
                outside_bytes += used_bytes or 0
                continue
            result.append(GpuProcess(pid, used_bytes, sm_by_pid.get(host_pid)))
        if outside:
            extra["processes_outside_namespace"] = outside
            extra["processes_outside_namespace_memory_bytes"] = outside_bytes
        return tuple(result)

    def _process_sm_utilization(self, dev: _Device) -> dict[int, float]:
        """Latest per-process SM utilisation newer than the last one seen (NotFound: none new)."""
        if not dev.caps.get("process_utilization"):
            return {}
        samples = self._call(
            dev.index,
            "process_utilization",
            pynvml.nvmlDeviceGetProcessUtilization,
            dev.handle,
            dev.proc_util_last_ts,
            expected=(pynvml.NVMLError_NotFound,),  # no sample newer than the last one
        )
        if samples is _Miss.UNSUPPORTED:
            dev.caps["process_utilization"] = False
        if isinstance(samples, _Miss):
            return {}
        latest: dict[int, tuple[int, float]] = {}
        for s in samples:
            ts = int(s.timeStamp)
            dev.proc_util_last_ts = max(dev.proc_util_last_ts, ts)
            pid = int(s.pid)
            if pid not in latest or ts >= latest[pid][0]:
                latest[pid] = (ts, min(1.0, max(0.0, s.smUtil / 100.0)))
        return {pid: ratio for pid, (_, ratio) in latest.items()}

    # ------------------------------------------------------------------ errors

    def _call(
        self,
        index: int | None,
        metric: str,
        fn: Callable[..., Any],
        *args: Any,
        expected: tuple[type[BaseException], ...] = (),
        lost_raises: bool = True,
    ) -> Any:
        """``fn(*args)`` through the one error ladder every NVML read in this module uses.

        A lost GPU raises ``_GpuLost`` (with ``lost_raises``; otherwise it is counted like any
        failure); an ``expected`` error returns ``_Miss.NOTHING``; an answer meaning "never on
        this device" returns ``_Miss.UNSUPPORTED``, for the caller to cache; any other NVML
        error is counted under ``metric`` and returns ``_Miss.FAILED``.
        """
        try:
            return _ask(fn, *args) if lost_raises else fn(*args)
        except expected:
            return _Miss.NOTHING
        except _UNAVAILABLE:
            return _Miss.UNSUPPORTED
        except pynvml.NVMLError as exc:
            self._count_error(index, metric, exc)
            return _Miss.FAILED

    def _count_error(self, index: int | None, metric: str, exc: BaseException, *, exc_info: bool = False) -> None:
        with self._stats_lock:
            self._errors[metric] = self._errors.get(metric, 0) + 1
            first = (index, metric) not in self._warned
            self._warned.add((index, metric))
        where = "NVML" if index is None else f"GPU {index}"
        if first:
            log.warning(
                "%s: reading %s failed: %s (repeats are counted, logged at debug)",
                where,
                metric,
                exc,
                exc_info=exc_info,
            )
        else:
            log.debug("%s: reading %s failed again: %s", where, metric, exc)


class _XidWatcher:
    """Waits on an NVML event set in its own thread and queues XID events on the backend.

    nvmlEventSetWait_v2 blocks (outside the GIL) for at most ``timeout_ms``, so stop() returns
    within about that long.
    """

    def __init__(self, backend: NvmlBackend, event_set: Any, timeout_ms: int) -> None:
        self._backend = backend
        self.event_set = event_set
        self.handles: dict[int, int] = {}  # handle address -> GPU index
        self._timeout_ms = max(1, int(timeout_ms))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="profilerd-nvml-xid", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._timeout_ms / 1000.0 + 5.0)
        if self._thread.is_alive():
            log.warning("XID event thread did not stop; leaving its event set allocated")
            return
        self.free()

    def free(self) -> None:
        try:
            pynvml.nvmlEventSetFree(self.event_set)
        except pynvml.NVMLError as exc:
            log.debug("nvmlEventSetFree failed: %s", exc)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                data = pynvml.nvmlEventSetWait_v2(self.event_set, self._timeout_ms)
            except pynvml.NVMLError_Timeout:
                failures = 0
                continue
            except pynvml.NVMLError_Uninitialized:
                return
            except pynvml.NVMLError as exc:
                # e.g. GPU lost: count it and back off so a broken event set cannot spin.
                failures += 1
                self._backend._count_error(None, "xid_events", exc)
                self._stop.wait(min(5.0, 0.05 * 2**failures))
                continue
            failures = 0
            if not data.eventType & _EVENT_XID:
                continue
            index = self.handles.get(_address(data.device))
            xid = int(data.eventData)
            self._backend._add_event(GpuEvent(self._backend._wall_clock(), index, "xid", _xid_detail(xid)))
