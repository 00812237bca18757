"""The TUI's view model: immutable snapshots that every source produces and every widget reads.

A source (daemon API, recording, Prometheus) turns what it reads into one ``Snapshot``; the
widgets never see where it came from. Keeping this module free of Textual lets the sources be
tested, and benchmarked, without a terminal. Units are in field names and ``None`` means
"unavailable", as everywhere else in profilerd.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from profilerd.analysis.document import headline

FRACTION_LABELS = {"data_wait": "data", "compute": "compute", "communication": "comm", "other": "other"}
# Without a verdict document (Prometheus carries numbers only), a rank is taken for the
# straggler when its own work (step time less exposed communication, which in a synchronous
# job is mostly waiting for the slowest rank) exceeds the others' median by this.
STRAGGLER_MARGIN = 1.10


@dataclass(frozen=True, slots=True)
class RankRow:
    rank: int
    host: str | None
    pid: int | None
    alive: bool
    steps_total: int
    step_p50_s: float | None
    step_p95_s: float | None
    data_wait_ratio: float | None
    comm_ratio: float | None
    own_s: float | None = None  # median step time less communication: the rank's own work
    straggler: bool = False
    recent_step_s: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class GpuRow:
    index: int
    name: str
    node: str | None = None
    lost: bool = False
    utilization_ratio: float | None = None
    sm_active_ratio: float | None = None
    tensor_active_ratio: float | None = None
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    temperature_celsius: float | None = None
    throttle_reasons: tuple[str, ...] | None = None
    uuid: str = ""


@dataclass(frozen=True, slots=True)
class ProcessRow:
    pid: int | None  # None when the source does not know pids (Prometheus)
    rank: int
    role: str  # "trainer" | "worker" | "workers" (an aggregate)
    cpu_cores: float | None
    rss_bytes: int | None = None
    alive: bool = True
    node: str | None = None
    count: int = 1


@dataclass(frozen=True, slots=True)
class RecommendationRow:
    id: str
    title: str
    estimated_speedup: float
    how: str = ""
    why: str = ""
    rule: str = ""
    evidence: str = ""


@dataclass(frozen=True, slots=True)
class FindingRow:
    rule: str
    category: str
    severity: str
    evidence: str
    confidence: float | None = None
    thresholds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HostView:
    cpu_count: int | None
    cpu_per_core_ratio: tuple[float, ...]
    cpu_ratio: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    node: str | None = None


@dataclass(frozen=True, slots=True)
class ReplayState:
    position_s: float
    duration_s: float
    speed: float
    playing: bool


@dataclass(frozen=True, slots=True)
class DeviceView:
    """What the GPU did with the steps, on its own clock (the verdict's ``device`` section)."""

    busy_ratio: float
    idle_ratio: float
    idle_data_wait_ratio: float  # idle while the loop waited for batches
    host_ahead_s: float | None  # how far the host ran ahead of the device at a step's end (median)
    steps_timed: int
    steps: int
    busy_is_lower_bound: bool = False  # the GPU kept pace with the host: busy "at least", idle "up to"

    def line(self) -> str:
        """One line for the step-time panel (the step count last: it is what an ellipsis may cut):
        "GPU clock: busy 61% · idle 39% (data 0%) · host ahead 12 ms · 198/200 steps": idle,
        and the part of it while the loop waited for batches."""
        at_least, up_to = ("≥", "≤") if self.busy_is_lower_bound else ("", "")
        ahead = f" · host ahead {fmt_duration(self.host_ahead_s)}" if self.host_ahead_s is not None else ""
        return (
            f"GPU clock: busy {at_least}{self.busy_ratio:.0%} · idle {up_to}{self.idle_ratio:.0%} "
            f"(data {self.idle_data_wait_ratio:.0%}){ahead} · {self.steps_timed}/{self.steps} steps"
        )


def device_view(document: Mapping[str, Any] | None) -> DeviceView | None:
    """The device section of a verdict document, or None where the steps carried no device timing."""
    if not document or document.get("busy_fraction") is None:
        return None
    return DeviceView(
        busy_ratio=float(document["busy_fraction"]),
        idle_ratio=float(document.get("idle_fraction") or 0.0),
        idle_data_wait_ratio=float(document.get("idle_data_wait_fraction") or 0.0),
        host_ahead_s=document.get("host_ahead_s_p50"),
        steps_timed=int(document.get("steps_timed") or 0),
        steps=int(document.get("steps") or 0),
        busy_is_lower_bound=bool(document.get("busy_is_lower_bound")),
    )


@dataclass(frozen=True)
class Snapshot:
    """Everything one screen shows, at one instant."""

    source: str  # where it came from, for the status bar
    job: str | None = None
    run_id: str | None = None
    state: str = "waiting"  # waiting (no job yet) | running | finished
    primary: str = "none"
    severity: str = "ok"
    summary: str = "waiting for the first training step"
    statement: str | None = None  # the summary's evidence sentence, without its headline
    straggler: int | None = None  # the rank the verdict names the straggler
    fractions: dict[str, float] | None = None
    phases: dict[str, float] | None = None
    device: DeviceView | None = None  # the shares above are then the device's
    step_p50_s: float | None = None
    step_p95_s: float | None = None
    step_mean_s: float | None = None
    steps_total: int = 0
    steps_per_s: float | None = None
    step_times_s: tuple[float, ...] = ()  # recent step times, oldest first
    ranks: tuple[RankRow, ...] = ()
    gpus: tuple[GpuRow, ...] = ()
    gpu_note: str | None = None  # why there are no GPUs to show
    processes: tuple[ProcessRow, ...] = ()
    hosts: tuple[HostView, ...] = ()
    recommendations: tuple[RecommendationRow, ...] = ()
    findings: tuple[FindingRow, ...] = ()
    jobs: tuple[str, ...] = ()
    replay: ReplayState | None = None
    taken_unix_s: float = 0.0

    @property
    def headline(self) -> str:
        return headline(self.primary)

    @property
    def evidence(self) -> str:
        """The sentence under the headline: the verdict's statement, or the whole summary of a
        snapshot without a verdict (waiting, a job that is gone)."""
        return self.statement if self.statement is not None else self.summary


def flag_straggler(rows: Sequence[RankRow], straggler: int | None) -> tuple[RankRow, ...]:
    """Flag the rank the verdict names the straggler (the daemon, a replay, attach)."""
    return tuple(replace(r, straggler=True) if r.rank == straggler else r for r in rows)


def mark_straggler(rows: Sequence[RankRow]) -> tuple[RankRow, ...]:
    """For a source without a verdict document (Prometheus): flag the rank whose own work is
    clearly the slowest; nothing with fewer than two ranks.

    In a synchronous job every rank's step time is the same (they wait for each other inside
    the collectives), so step time alone cannot tell; step time less exposed communication can:
    the slow rank is the one that does not wait.
    """
    known = [r for r in rows if r.own_s is not None and r.alive]
    if len(known) < 2:  # a finished job: still say who held it back
        known = [r for r in rows if r.own_s is not None]
    if len(known) < 2:
        return tuple(rows)
    slowest = max(known, key=lambda r: r.own_s or 0.0)
    others = [r.own_s or 0.0 for r in known if r is not slowest]
    baseline = statistics.median(others)
    if baseline <= 0 or (slowest.own_s or 0.0) < baseline * STRAGGLER_MARGIN:
        return tuple(rows)
    return tuple(replace(r, straggler=True) if r is slowest else r for r in rows)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), without numpy on the UI path."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---- formatting shared by widgets, screens and the docs' examples ---------------------------------
def fmt_duration(seconds: float | None) -> str:
    """Step times: µs, ms or s, always three significant figures at most."""
    if seconds is None:
        return "–"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        value = seconds * 1000
        return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value >= scale:
            scaled = value / scale
            return f"{scaled:.1f}{unit}" if scaled < 10 else f"{scaled:.0f}{unit}"
    return f"{value:.0f}B"


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def fmt_clock(seconds: float) -> str:
    minutes, rest = divmod(max(0.0, seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{rest:04.1f}" if hours else f"{minutes:02d}:{rest:04.1f}"
