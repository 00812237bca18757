"""Prometheus families for GPU samples: a pure function the daemon's Collector calls per scrape.

Names carry base units (``_bytes``, ``_watts``, ``_celsius``, ``_hertz``, ``_ratio`` 0–1) and
counters end in ``_total``. Series are labelled by ``gpu`` (index) and ``uuid`` only; the GPU
name lives in ``profilerd_gpu_info`` and is joined on when needed. A value that is None
(unsupported, not measured yet, GPU lost) is left out, never written as 0 or NaN, so a
dashboard shows a gap rather than a false zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from profilerd.model import GpuSample
from profilerd.vocabulary import ClockEventReason

PREFIX = "profilerd_gpu_"
GPU_LABELS = ("gpu", "uuid")

# The clock event (throttle) reasons profilerd.gpu.nvml decodes; each is exported as a 0/1 series so
# that a reason that clears goes to 0 instead of vanishing. A test keeps this in step with nvml.
CLOCK_EVENT_REASONS: tuple[str, ...] = tuple(ClockEventReason)


@dataclass(frozen=True, slots=True)
class _Series:
    """One per-GPU metric read from a GpuSample attribute."""

    name: str  # without PREFIX; counters without _total
    doc: str
    get: Callable[[GpuSample], float | int | bool | None]
    counter: bool = False


def _attr(field: str) -> Callable[[GpuSample], Any]:
    return lambda sample: getattr(sample, field)


def _bool(field: str) -> Callable[[GpuSample], float | None]:
    def read(sample: GpuSample) -> float | None:
        value = getattr(sample, field)
        return None if value is None else float(bool(value))

    return read


_SERIES: tuple[_Series, ...] = (
    _Series("lost", "1 while the GPU is lost (not answering NVML)", lambda s: float(s.lost)),
    _Series(
        "utilization_ratio", "Share of time a kernel was running (NVML utilization)", _attr("utilization_gpu_ratio")
    ),
    _Series(
        "memory_utilization_ratio",
        "Share of time device memory was read or written",
        _attr("utilization_memory_ratio"),
    ),
    _Series("memory_used_bytes", "Device memory in use", _attr("memory_used_bytes")),
    _Series("memory_total_bytes", "Device memory installed", _attr("memory_total_bytes")),
    _Series("memory_reserved_bytes", "Device memory reserved by the driver", _attr("memory_reserved_bytes")),
    _Series("power_watts", "Power draw now", _attr("power_watts")),
    _Series(
        "power_average_watts",
        "Average power since the previous sample (energy counter)",
        _attr("power_average_watts"),
    ),
    _Series("power_limit_watts", "Enforced power limit", _attr("power_limit_watts")),
    _Series("temperature_celsius", "GPU core temperature", _attr("temperature_celsius")),
    _Series("memory_temperature_celsius", "Device memory (HBM) temperature", _attr("memory_temperature_celsius")),
    _Series("sm_clock_hertz", "SM clock now", _attr("sm_clock_hertz")),
    _Series("sm_clock_max_hertz", "Highest SM clock", _attr("sm_clock_max_hertz")),
    _Series("memory_clock_hertz", "Memory clock now", _attr("memory_clock_hertz")),
    _Series("memory_clock_max_hertz", "Highest memory clock", _attr("memory_clock_max_hertz")),
    _Series("pcie_tx_bytes_per_second", "PCIe bytes sent per second", _attr("pcie_tx_bytes_per_second")),
    _Series("pcie_rx_bytes_per_second", "PCIe bytes received per second", _attr("pcie_rx_bytes_per_second")),
    _Series(
        "nvlink_tx_bytes_per_second",
        "NVLink data bytes sent per second, all links",
        _attr("nvlink_tx_bytes_per_second"),
    ),
    _Series(
        "nvlink_rx_bytes_per_second",
        "NVLink data bytes received per second, all links",
        _attr("nvlink_rx_bytes_per_second"),
    ),
    _Series(
        "ecc_corrected_errors",
        "Corrected ECC errors since the driver loaded",
        _attr("ecc_corrected_total"),
        counter=True,
    ),
    _Series(
        "ecc_uncorrected_errors",
        "Uncorrected ECC errors since the driver loaded",
        _attr("ecc_uncorrected_total"),
        counter=True,
    ),
    _Series(
        "remapped_rows", "Memory rows remapped (corrected + uncorrected)", _attr("remapped_rows_total"), counter=True
    ),
    _Series("mig_enabled", "1 when MIG mode is on", _bool("mig_enabled")),
    _Series("sm_active_ratio", "Share of SMs busy (GPM)", _attr("sm_active_ratio")),
    _Series("sm_occupancy_ratio", "Active warps over the maximum (GPM)", _attr("sm_occupancy_ratio")),
    _Series("tensor_active_ratio", "Share of time tensor cores were busy (GPM)", _attr("tensor_active_ratio")),
    _Series("dram_active_ratio", "DRAM bandwidth used over peak (GPM)", _attr("dram_active_ratio")),
    _Series("fp16_active_ratio", "Share of time in non-tensor FP16 math (GPM)", _attr("fp16_active_ratio")),
    _Series("fp32_active_ratio", "Share of time in non-tensor FP32 math (GPM)", _attr("fp32_active_ratio")),
    _Series("fp64_active_ratio", "Share of time in non-tensor FP64 math (GPM)", _attr("fp64_active_ratio")),
)


def _gpu_labels(sample: GpuSample) -> list[str]:
    return [str(sample.index), sample.uuid]


_NumericFamily = GaugeMetricFamily | CounterMetricFamily


def _info_family() -> InfoMetricFamily:
    return InfoMetricFamily(PREFIX.rstrip("_"), "GPU identity: name by index and uuid", labels=list(GPU_LABELS))


def _families() -> dict[str, _NumericFamily]:
    """Every numeric GPU family, empty, in a stable order."""
    families: dict[str, _NumericFamily] = {}
    for series in _SERIES:
        cls = CounterMetricFamily if series.counter else GaugeMetricFamily
        families[series.name] = cls(PREFIX + series.name, series.doc, labels=list(GPU_LABELS))
    families["clock_event_reason"] = GaugeMetricFamily(
        PREFIX + "clock_event_reason",
        "1 while this reason holds the clocks down (throttling), else 0",
        labels=[*GPU_LABELS, "reason"],
    )
    families["process_memory_used_bytes"] = GaugeMetricFamily(
        PREFIX + "process_memory_used_bytes",
        "Device memory used by a process (pid in the daemon's namespace)",
        labels=[*GPU_LABELS, "pid"],
    )
    families["process_sm_utilization_ratio"] = GaugeMetricFamily(
        PREFIX + "process_sm_utilization_ratio",
        "Share of time the process had a kernel on the SMs",
        labels=[*GPU_LABELS, "pid"],
    )
    families["mig_instance_memory_used_bytes"] = GaugeMetricFamily(
        PREFIX + "mig_instance_memory_used_bytes",
        "Device memory used in a MIG GPU instance",
        labels=[*GPU_LABELS, "gpu_instance"],
    )
    families["mig_instance_memory_total_bytes"] = GaugeMetricFamily(
        PREFIX + "mig_instance_memory_total_bytes",
        "Device memory of a MIG GPU instance",
        labels=[*GPU_LABELS, "gpu_instance"],
    )
    families["events"] = CounterMetricFamily(
        PREFIX + "events",
        "GPU events since the daemon started, by kind (xid, lost, recovered)",
        labels=[*GPU_LABELS, "kind"],
    )
    return families


def describe_gpu_metric_families() -> list[Metric]:
    """The families gpu_metric_families() can return, without samples (for Collector.describe)."""
    return [_info_family(), *_families().values()]


def gpu_metric_families(
    samples: list[GpuSample], events_total: Mapping[tuple[int, str], int] | None = None
) -> list[Metric]:
    """Families for the latest sample of each GPU, and event counts keyed by (gpu index, kind).

    Families without any series are left out. An event index below 0 (an event no GPU could
    be named for) is exported with empty ``gpu`` and ``uuid`` labels.
    """
    info = _info_family()
    families = _families()
    for sample in samples:
        labels = _gpu_labels(sample)
        info.add_metric(labels, {"name": sample.name})
        for series in _SERIES:
            value = series.get(sample)
            if value is not None:
                families[series.name].add_metric(labels, float(value))
        if sample.clock_event_reasons is not None:
            active = set(sample.clock_event_reasons)
            for reason in CLOCK_EVENT_REASONS:
                families["clock_event_reason"].add_metric([*labels, reason], 1.0 if reason in active else 0.0)
        for proc in sample.processes:
            proc_labels = [*labels, str(proc.pid)]
            if proc.used_memory_bytes is not None:
                families["process_memory_used_bytes"].add_metric(proc_labels, float(proc.used_memory_bytes))
            if proc.sm_utilization_ratio is not None:
                families["process_sm_utilization_ratio"].add_metric(proc_labels, proc.sm_utilization_ratio)
        _add_mig(families, labels, sample.extra.get("mig_instances"))
    if events_total:
        uuids = {sample.index: sample.uuid for sample in samples}
        for (index, kind), count in sorted(events_total.items()):
            gpu = str(index) if index >= 0 else ""
            families["events"].add_metric([gpu, uuids.get(index, ""), kind], float(count))
    return [family for family in (info, *families.values()) if family.samples]


def _add_mig(families: dict[str, _NumericFamily], labels: list[str], instances: object) -> None:
    if not isinstance(instances, list):
        return
    for instance in instances:
        if not isinstance(instance, dict) or instance.get("gpu_instance_id") is None:
            continue
        instance_labels = [*labels, str(instance["gpu_instance_id"])]
        for key in ("memory_used_bytes", "memory_total_bytes"):
            value = instance.get(key)
            if value is not None:
                families[f"mig_instance_{key}"].add_metric(instance_labels, float(value))
