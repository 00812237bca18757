"""Immutable records that flow from the samplers through the store to analysis and exporters.

Units are in field names; ``None`` means "unavailable" (not supported, not yet measured) and is
never exported as 0.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
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

    @property
    def num_workers(self) -> int:
        return len(self.worker_pids)

    @property
    def worker_cpu_max_ratio(self) -> float | None:
        """The busiest worker: one worker at a full core is what a data-bound job looks like."""
        return max(self.worker_cpu_ratios) if self.worker_cpu_ratios else None


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

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> GpuSample:
        """A sample from the JSON a recording keeps of it (``asdict``): the fields it lacks are
        unknown, the ones this version does not know are left out."""
        values = {name: document[name] for name in _GPU_SAMPLE_FIELDS if name in document}
        reasons = document.get("clock_event_reasons")
        extra = document.get("extra")
        return cls(
            **{"uuid": "", "name": "", **values},
            clock_event_reasons=tuple(str(r) for r in reasons) if isinstance(reasons, list | tuple) else None,
            processes=tuple(
                GpuProcess(p["pid"], p.get("used_memory_bytes"), p.get("sm_utilization_ratio"))
                for p in document.get("processes") or ()
                if isinstance(p, dict) and isinstance(p.get("pid"), int)
            ),
            extra=dict(extra) if isinstance(extra, dict) else {},
        )


# What GpuSample.from_json takes as it is; the rest are containers it rebuilds.
_GPU_SAMPLE_FIELDS = frozenset(
    f.name for f in fields(GpuSample) if f.name not in ("clock_event_reasons", "processes", "extra")
)


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


# ---- the recorded tables -----------------------------------------------------------------------
# Each record a recording keeps (host sample, process sample, verdict; the GPU sample's columns)
# has one table below: its columns, each with how it is stored and the record attribute it holds.
# The recording's DDL, inserts and SELECTs (``recordings/schema.py``, ``writer.py``, ``reader.py``)
# and the analysis frames' columns (``analysis/context.py``) are derived from these tables. A new
# column is one new row, appended: recordings written before it read it as unknown.


class Kind(Enum):
    """How a column is stored, read back and framed."""

    COUNT = "count"  # an integer always known: 0 when missing, int32 in a frame
    INTEGER = "integer"  # an integer that may be unknown (None): float64 in a frame, NaN when unknown
    REAL = "real"  # float64 in a frame, NaN when unknown
    FLAG = "flag"  # a bool stored as 0/1, int32 in a frame
    TEXT = "text"
    RATIOS = "ratios"  # a tuple of ratios as a JSON list, rounded to 4 decimals (per-core CPU)
    DOCUMENT = "document"  # a JSON object (the verdict document)

    @property
    def sql(self) -> str:
        """Its SQLite column type."""
        return _SQL_TYPES[self]

    @property
    def frame_dtype(self) -> str:
        """Its dtype in an analysis frame: integers that are always known stay integers."""
        return "int32" if self in (Kind.COUNT, Kind.FLAG) else "float64"


_SQL_TYPES = {
    Kind.COUNT: "INTEGER",
    Kind.INTEGER: "INTEGER",
    Kind.REAL: "REAL",
    Kind.FLAG: "INTEGER",
    Kind.TEXT: "TEXT",
    Kind.RATIOS: "TEXT",
    Kind.DOCUMENT: "TEXT",
}

SqlValue = int | float | str | None


def _as_int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):  # NULL, or text where a number belongs
        return None


def _as_float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _ratios(value: object) -> tuple[float, ...]:
    try:
        ratios = json.loads(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ()
    return tuple(float(r) for r in ratios if isinstance(r, int | float)) if isinstance(ratios, list) else ()


def _document(value: object) -> dict[str, Any] | None:
    try:
        document = json.loads(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return document if isinstance(document, dict) else None


# What a stored value reads back as; a damaged value (text where a number belongs, JSON that
# does not parse) reads as unknown rather than failing the read.
_DECODE: dict[Kind, Callable[[SqlValue], Any]] = {
    Kind.COUNT: lambda v: _as_int(v) or 0,
    Kind.INTEGER: _as_int,
    Kind.REAL: _as_float,
    Kind.FLAG: lambda v: bool(_as_int(v)),
    Kind.TEXT: lambda v: None if v is None else str(v),
    Kind.RATIOS: _ratios,
    Kind.DOCUMENT: _document,
}


# How a record's value is stored, for the kinds not stored as they are (None is always NULL).
_ENCODE: dict[Kind, Callable[[Any], SqlValue]] = {
    Kind.FLAG: lambda v: int(bool(v)),
    Kind.RATIOS: lambda v: json.dumps([round(ratio, 4) for ratio in v]),
    Kind.DOCUMENT: json.dumps,
}


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a recorded table: ``name`` in SQL and in the frame, how it is stored, the
    attribute of the record it is written from and read back into, and whether the analysis
    frame has it (numbers only)."""

    name: str
    kind: Kind
    attribute: str
    frame: bool = True

    @property
    def sql(self) -> str:
        return self.kind.sql

    def decode(self, value: SqlValue) -> Any:
        return _DECODE[self.kind](value)


def _encoder(columns: tuple[Column, ...]) -> Callable[[object], tuple[SqlValue, ...]]:
    """The stored values of ``columns`` from a record: one attrgetter, then the few that are encoded."""
    if not columns:
        return lambda record: ()
    read = operator.attrgetter(*(column.attribute for column in columns))
    encoded = [(i, _ENCODE[column.kind]) for i, column in enumerate(columns) if column.kind in _ENCODE]
    single = len(columns) == 1  # attrgetter of one name returns the value, not a tuple

    def encode(record: object) -> tuple[SqlValue, ...]:
        values: list[Any] = [read(record)] if single else list(read(record))
        for i, encode_value in encoded:
            if values[i] is not None:
                values[i] = encode_value(values[i])
        return tuple(values)

    return encode


@dataclass(frozen=True)
class Table:
    """The columns of one recorded record, in their stored order."""

    name: str
    columns: tuple[Column, ...]
    # Built once: rows and frame rows are made per sample, in the writer and each analysis tick.
    _row: Callable[[object], tuple[SqlValue, ...]] = field(init=False, repr=False, compare=False)
    _frame_row: Callable[[object], tuple[SqlValue, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_row", _encoder(self.columns))
        object.__setattr__(self, "_frame_row", _encoder(tuple(c for c in self.columns if c.frame)))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(column.attribute for column in self.columns)

    def column(self, attribute: str) -> Column:
        """The column that holds the record's ``attribute``."""
        return next(column for column in self.columns if column.attribute == attribute)

    @property
    def frame_columns(self) -> list[str]:
        """The analysis frame's columns, in the table's order."""
        return [column.name for column in self.columns if column.frame]

    def ddl(self, extra: str = "") -> str:
        columns = ", ".join(f"{column.name} {column.sql}" for column in self.columns)
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({columns}{extra})"

    def insert(self, extra: tuple[str, ...] = ()) -> str:
        """Columns named, so a recording created with another column order (an older one) takes it."""
        names = (*self.names, *extra)
        return f"INSERT INTO {self.name} ({', '.join(names)}) VALUES ({','.join('?' * len(names))})"

    def row(self, record: object) -> tuple[SqlValue, ...]:
        """The record as the table's row, ready for its insert."""
        return self._row(record)

    def frame_row(self, record: object) -> tuple[SqlValue, ...]:
        """The record as a row of the analysis frame (``frame_columns``)."""
        return self._frame_row(record)

    def values(self, present: tuple[str, ...], row: tuple[SqlValue, ...]) -> dict[str, Any]:
        """A stored row (of the ``present`` columns: older recordings lack some) as the record's
        attribute values; a column it lacks reads as its kind's unknown."""
        stored = dict(zip(present, row, strict=True))
        return {column.attribute: column.decode(stored.get(column.name)) for column in self.columns}


def _check(cls: type, table: Table, exact: bool) -> None:
    """Fail at import when a record and its table disagree (a field added to one only)."""
    if exact:
        declared = {f.name for f in fields(cls)}
        missing = sorted(set(table.attributes) - declared)
        unknown = sorted(declared - set(table.attributes))
    else:  # written from: the table may name any attribute (a field or a property)
        missing = sorted(a for a in table.attributes if not hasattr(cls, a))
        unknown = []
    if missing or unknown:
        problem = f"missing {missing}, unknown {unknown}"
        raise RuntimeError(f"{cls.__name__} disagrees with the {table.name} table: {problem}")


@dataclass(frozen=True, slots=True)
class RecordedProcess:
    """What a recording keeps of a ``ProcessSample``: the workers as a count, a sum and a maximum."""

    ts_unix_s: float | None
    pid: int
    rank: int
    alive: bool
    cpu_ratio: float | None
    rss_bytes: int | None
    num_workers: int
    workers_cpu_ratio: float | None
    worker_cpu_max_ratio: float | None


@dataclass(frozen=True, slots=True)
class RecordedVerdict:
    """A verdict as a recording keeps it: when, whose, its category and severity, the document
    (``profilerd.verdict/v1``, None when unreadable)."""

    evaluated_unix_s: float | None
    job: str | None
    primary: str | None
    severity: str | None
    document: dict[str, Any] | None


HOST_TABLE = Table(
    "host_samples",
    (
        Column("ts_unix_s", Kind.REAL, "ts_unix_s"),
        Column("cpu_count", Kind.COUNT, "cpu_count"),
        Column("cpu_ratio", Kind.REAL, "cpu_ratio"),
        Column("iowait_ratio", Kind.REAL, "iowait_ratio", frame=False),
        Column("memory_used_bytes", Kind.INTEGER, "memory_used_bytes", frame=False),
        Column("memory_total_bytes", Kind.INTEGER, "memory_total_bytes", frame=False),
        Column("load1", Kind.REAL, "load1", frame=False),
        Column("cpu_per_core", Kind.RATIOS, "cpu_per_core_ratio", frame=False),
    ),
)

PROCESS_TABLE = Table(
    "process_samples",
    (
        Column("ts_unix_s", Kind.REAL, "ts_unix_s"),
        Column("pid", Kind.COUNT, "pid"),
        Column("rank", Kind.COUNT, "rank"),
        Column("alive", Kind.FLAG, "alive"),
        Column("cpu_ratio", Kind.REAL, "cpu_ratio"),
        Column("rss_bytes", Kind.INTEGER, "rss_bytes", frame=False),
        Column("num_workers", Kind.COUNT, "num_workers"),
        Column("workers_cpu_ratio", Kind.REAL, "workers_cpu_ratio"),
        Column("worker_cpu_max_ratio", Kind.REAL, "worker_cpu_max_ratio"),
    ),
)

# One row per evaluation the daemon recorded (when the verdict changed, and every few seconds).
VERDICT_TABLE = Table(
    "verdicts",
    (
        Column("ts_unix_s", Kind.REAL, "evaluated_unix_s", frame=False),
        Column("job", Kind.TEXT, "job", frame=False),
        Column("primary_category", Kind.TEXT, "primary", frame=False),
        Column("severity", Kind.TEXT, "severity", frame=False),
        Column("verdict", Kind.DOCUMENT, "document", frame=False),
    ),
)

# The GPU sample's columns, for SQL queries and the recording's frame; the table's ``sample``
# column (``GPU_SAMPLE_JSON``) holds the whole sample as JSON, every field, for the offline GPU
# analysis.
GPU_TABLE = Table(
    "gpu_samples",
    (
        Column("ts_unix_s", Kind.REAL, "ts_unix_s"),
        Column("gpu_index", Kind.COUNT, "index"),
        Column("uuid", Kind.TEXT, "uuid"),
        Column("name", Kind.TEXT, "name"),
        Column("lost", Kind.FLAG, "lost"),
        Column("utilization_gpu_ratio", Kind.REAL, "utilization_gpu_ratio"),
        Column("memory_used_bytes", Kind.INTEGER, "memory_used_bytes"),
        Column("memory_total_bytes", Kind.INTEGER, "memory_total_bytes"),
        Column("power_watts", Kind.REAL, "power_watts"),
        Column("power_limit_watts", Kind.REAL, "power_limit_watts"),
        Column("temperature_celsius", Kind.REAL, "temperature_celsius"),
        Column("sm_active_ratio", Kind.REAL, "sm_active_ratio"),
        Column("tensor_active_ratio", Kind.REAL, "tensor_active_ratio"),
    ),
)
GPU_SAMPLE_JSON = "sample"

_check(HostSample, HOST_TABLE, exact=True)  # read back whole: a recording keeps every field
_check(ProcessSample, PROCESS_TABLE, exact=False)
_check(RecordedProcess, PROCESS_TABLE, exact=True)
_check(RecordedVerdict, VERDICT_TABLE, exact=True)
_check(GpuSample, GPU_TABLE, exact=False)
