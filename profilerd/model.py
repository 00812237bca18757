"""Immutable records that flow from the samplers through the store to analysis and exporters.

Units are in field names; ``None`` means "unavailable" (not supported, not yet measured) and is
never exported as 0.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, TypedDict

from profilerd_probes.schema import STEP_COLUMNS, check_fields


class GpuContext(TypedDict, total=False):
    """NVML means over the window of the job's GPUs (``analysis.context.gpu_context``); a key is
    absent when it was not measured. The verdict document's ``gpu`` object is this record."""

    gpu_count: int
    gpu_name: str
    gpu_utilization_ratio: float
    gpu_tensor_active_ratio: float
    gpu_sm_active_ratio: float
    gpu_sm_clock_ratio: float
    gpu_thermal_throttle: float  # share of samples with a thermal clock event reason
    gpu_power_throttle: float  # share of samples with a power clock event reason
    gpu_pcie_bytes_per_second: float
    gpu_nvlink_bytes_per_second: float
    gpu_memory_max_ratio: float
    gpu_idle_while_held_fraction: float  # samples the job held the GPU and it was idle


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One training step of one rank, as received from the probes."""

    job: str
    rank: int
    pid: int
    step: int
    end_unix_s: float
    step_s: float
    data_wait_s: float
    forward_s: float
    backward_s: float
    optimizer_s: float
    comm_s: float
    flags: int = 0
    # Training signals; None when the probe had no value for this step.
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    scaler_scale: float | None = None
    sync_count: int = 0
    sync_s: float = 0.0
    comm_total_s: float = 0.0
    graph_compiles: int = 0
    comm_ops: int = 0
    comm_bytes: int = 0
    # Device-side timing (CUDA events, see docs/concepts.md); None without it.
    gpu_busy_s: float | None = None
    gpu_forward_s: float | None = None
    gpu_backward_s: float | None = None
    gpu_optimizer_s: float | None = None
    gpu_idle_s: float | None = None  # the device idle within the step's wall span
    gpu_idle_data_wait_s: float | None = None  # the device idle while the training thread waited for data
    host_ahead_s: float | None = None  # how far the host ran ahead of the device at the step's end

    def as_row(self) -> tuple[Any, ...]:
        """One row of the recording's steps table (schema.STEP_COLUMNS)."""
        return _row(self)

    @property
    def other_s(self) -> float:
        measured = self.data_wait_s + self.forward_s + self.backward_s + self.optimizer_s + self.comm_s
        return max(0.0, self.step_s - measured)


_row = operator.attrgetter(*STEP_COLUMNS)
check_fields(StepRecord, STEP_COLUMNS, extra=("job",))


@dataclass(frozen=True, slots=True)
class ProbeSession:
    """A training process that said hello: which job, run and rank it belongs to."""

    pid: int
    job: str
    run_id: str
    rank: int
    local_rank: int
    world_size: int
    hostname: str
    argv: tuple[str, ...]
    started_unix_s: float
    probe_version: str


@dataclass(frozen=True, slots=True)
class HostSample:
    ts_unix_s: float
    cpu_count: int
    cpu_per_core_ratio: tuple[float, ...]
    cpu_ratio: float
    iowait_ratio: float | None
    memory_used_bytes: int
    memory_total_bytes: int
    load1: float | None


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """A training process and its DataLoader workers at one instant."""

    ts_unix_s: float
    pid: int
    job: str
    rank: int
    alive: bool
    cpu_ratio: float | None  # cores busy, 1.0 = one full core
    rss_bytes: int | None
    num_threads: int | None
    worker_pids: tuple[int, ...] = ()
    worker_cpu_ratios: tuple[float, ...] = ()  # per worker, 1.0 = one full core

    @property
    def workers_cpu_ratio(self) -> float:
        return sum(self.worker_cpu_ratios)


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A process using a GPU; ``pid`` is already mapped into the daemon's PID namespace."""

    pid: int
    used_memory_bytes: int | None
    sm_utilization_ratio: float | None = None


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU at one instant. Every metric may be None when unsupported or unavailable."""

    ts_unix_s: float
    index: int
    uuid: str
    name: str
    lost: bool = False
    utilization_gpu_ratio: float | None = None
    utilization_memory_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    memory_reserved_bytes: int | None = None
    power_watts: float | None = None
    power_average_watts: float | None = None
    power_limit_watts: float | None = None
    temperature_celsius: float | None = None
    memory_temperature_celsius: float | None = None
    sm_clock_hertz: float | None = None
    sm_clock_max_hertz: float | None = None
    memory_clock_hertz: float | None = None
    memory_clock_max_hertz: float | None = None
    clock_event_reasons: tuple[str, ...] | None = None
    pcie_tx_bytes_per_second: float | None = None
    pcie_rx_bytes_per_second: float | None = None
    nvlink_tx_bytes_per_second: float | None = None
    nvlink_rx_bytes_per_second: float | None = None
    ecc_corrected_total: int | None = None
    ecc_uncorrected_total: int | None = None
    remapped_rows_total: int | None = None
    mig_enabled: bool | None = None
    # GPM (Hopper and newer), ratios 0-1 of peak
    sm_active_ratio: float | None = None
    sm_occupancy_ratio: float | None = None
    tensor_active_ratio: float | None = None
    dram_active_ratio: float | None = None
    fp16_active_ratio: float | None = None
    fp32_active_ratio: float | None = None
    fp64_active_ratio: float | None = None
    processes: tuple[GpuProcess, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GpuEvent:
    """Something that happened to a GPU: an XID error, the device lost, recovered."""

    ts_unix_s: float
    index: int | None
    kind: str
    detail: str


@dataclass(frozen=True, slots=True)
class Recommendation:
    id: str
    title: str
    estimated_speedup: float  # whole-run speedup factor, >= 1.0, bounded by Amdahl's law
    how: str  # a code snippet or concrete change
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "estimated_speedup": round(self.estimated_speedup, 3),
            "how": self.how,
            "why": self.why,
        }


@dataclass(frozen=True, slots=True)
class Finding:
    rule: str
    category: str
    severity: str
    evidence: str
    confidence: float
    metrics: dict[str, float]  # the numbers behind the evidence
    thresholds: dict[str, float]
    recommendations: tuple[Recommendation, ...] = ()
    cost: float = 0.0  # share of step time (or of the run, for convergence) this finding costs

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "category": self.category,
            "severity": self.severity,
            "evidence": self.evidence,
            "confidence": round(self.confidence, 3),
            "metrics": {k: round(v, 6) for k, v in self.metrics.items()},
            "thresholds": self.thresholds,
            "recommendations": [r.to_json() for r in self.recommendations],
        }
