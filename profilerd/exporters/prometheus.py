"""A stateless Prometheus collector over the store's latest state.

Every scrape builds the families from what the store holds now; nothing is pushed or removed
by hand. Labels stay low-cardinality: job and rank for training series, never pid or hostname.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from profilerd import __version__
from profilerd.model import GpuSample, HostSample, ProcessSample
from profilerd.store import STEP_BUCKETS_S, RankState, Store
from profilerd.vocabulary import PRIMARY_VALUES, Phase, Severity

if TYPE_CHECKING:
    from profilerd.analysis.verdict import Verdict

PHASE_LABELS = {phase.column: str(phase) for phase in Phase}  # the store's phase totals -> the phase label


class _RankCopy(NamedTuple):
    """What the training families need of one rank (``RankState``), copied under the lock."""

    rank: int
    bucket_counts: list[int]
    steps_total: int
    step_seconds_sum: float
    phase_seconds_total: dict[str, float]
    last_step_unix_s: float


class _JobCopy(NamedTuple):
    job: str
    ranks: list[_RankCopy]
    verdict: Verdict | None


class _Scrape(NamedTuple):
    """What one scrape needs of the store, copied under its lock."""

    daemon: list[Metric]
    training: list[_JobCopy]
    host: HostSample | None
    processes: list[ProcessSample]
    gpus: list[GpuSample]
    gpu_available: bool
    events: dict[tuple[int, str], int]
    field_errors: int
    owners: dict[int, tuple[str, int]]

    @staticmethod
    def copy(store: Store) -> _Scrape:
        return _Scrape(
            list(ProfilerdCollector.daemon_metrics(store)),
            [_JobCopy(job.job, _rank_copies(job.ranks), job.verdict) for job in store.jobs.values()],
            store.host,
            list(store.processes.values()),
            list(store.gpus),
            store.gpu_available,
            dict(store.gpu_event_counts),
            store.gpu_field_errors,
            {pid: (s.job, s.rank) for pid, s in store.sessions.items()},
        )


class ProfilerdCollector(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def describe(self) -> Iterator[Metric]:
        """Every family this collector can produce, empty (for registry checks and tooling)."""
        from profilerd.exporters.gpu_metrics import describe_gpu_metric_families

        for family in self.collect():
            # every family but the info one is a *MetricFamily(name, documentation): one of its kind, empty
            empty: Any = type(family)
            yield family if isinstance(family, InfoMetricFamily) else empty(family.name, family.documentation)
        yield from describe_gpu_metric_families()

    def collect(self) -> Iterator[Metric]:
        # Copy what is needed under the store's lock and build the families after: ingest takes
        # the same lock for every step, and a scrape of many ranks takes milliseconds.
        scrape = self.store.read(_Scrape.copy)
        yield from scrape.daemon
        yield from _training_metrics(scrape.training)
        yield from _host_metrics(scrape.host, scrape.processes)
        available = GaugeMetricFamily("profilerd_gpu_sampling_available", "1 when a GPU backend is active")
        available.add_metric([], 1.0 if scrape.gpu_available else 0.0)
        yield available
        if scrape.gpu_available:
            field_errors = scrape.field_errors
            yield _counter("profilerd_gpu_field_errors", "NVML reads that failed (per field, per tick)", field_errors)
        if scrape.gpus or scrape.events:
            from profilerd.exporters.gpu_metrics import gpu_metric_families

            yield from gpu_metric_families(scrape.gpus, scrape.events)
            yield from _rank_gpu_families(scrape.gpus, scrape.owners)

    @staticmethod
    def daemon_metrics(store: Store) -> Iterator[Metric]:
        """The daemon's own families (call with the store's lock held: see ``Store.read``)."""
        info = InfoMetricFamily("profilerd_build", "profilerd build information")
        info.add_metric([], {"version": __version__})
        yield info
        received = CounterMetricFamily(
            "profilerd_probe_messages_received", "Probe messages accepted, by kind", labels=["kind"]
        )
        for kind, count in sorted(store.received.items()):
            received.add_metric([kind], count)
        yield received
        dropped = CounterMetricFamily(
            "profilerd_probe_messages_dropped",
            "Probe messages lost or rejected, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(store.dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        errors = CounterMetricFamily("profilerd_sampler_errors", "Failed sampler cycles", labels=["sampler"])
        lag = GaugeMetricFamily("profilerd_sampler_lag_seconds", "How late the last cycle started", labels=["sampler"])
        duration = GaugeMetricFamily(
            "profilerd_sampler_duration_seconds", "How long the last cycle took", labels=["sampler"]
        )
        for name, health in sorted(store.health.items()):
            errors.add_metric([name], health.errors_total)
            lag.add_metric([name], health.lag_s)
            duration.add_metric([name], health.last_duration_s)
        yield errors
        yield lag
        yield duration
        paused = GaugeMetricFamily("profilerd_recording_paused", "1 while recording is paused (disk full, ...)")
        paused.add_metric([], 1.0 if store.recording_paused_reason else 0.0)
        yield paused
        yield _counter(
            "profilerd_recording_rows_dropped",
            "Rows dropped because recording was paused too long to keep them in memory",
            store.recording_rows_dropped,
        )


def _rank_copies(ranks: dict[int, RankState]) -> list[_RankCopy]:
    """What the training families need of each rank, copied (call with the store's lock held)."""
    return [
        _RankCopy(rank_id, list(r.bucket_counts), r.steps_total, r.step_seconds_sum, dict(r.phase_seconds_total),
                  r.last_step_unix_s)
        for rank_id, r in sorted(ranks.items())
    ]  # fmt: skip


def _training_metrics(jobs: list[_JobCopy]) -> Iterator[Metric]:
    """The training families from ``collect``'s copy: (job, ranks, verdict) per job."""
    steps = HistogramMetricFamily("profilerd_step_duration_seconds", "Training step time", labels=["job", "rank"])
    phase_total = CounterMetricFamily(
        "profilerd_step_phase_seconds", "Time spent per step phase", labels=["job", "rank", "phase"]
    )
    phase_ratio = GaugeMetricFamily(
        "profilerd_step_phase_ratio",
        "Share of step time per phase over the analysis window",
        labels=["job", "phase"],
    )
    last_step = GaugeMetricFamily(
        "profilerd_last_step_timestamp_seconds",
        "When the rank last finished a step",
        labels=["job", "rank"],
    )
    verdict = GaugeMetricFamily(
        "profilerd_verdict", "1 for the job's current bottleneck category", labels=["job", "category"]
    )
    severity = GaugeMetricFamily("profilerd_verdict_severity", "0 ok, 1 info, 2 warning, 3 critical", labels=["job"])
    speedup = GaugeMetricFamily(
        "profilerd_recommendation_estimated_speedup_ratio",
        "Estimated whole-step speedup of each current recommendation",
        labels=["job", "recommendation"],
    )
    gpu_busy = GaugeMetricFamily(
        "profilerd_step_gpu_busy_ratio",
        "Share of step time the job's GPUs were busy on the device clock (CUDA events), analysis window",
        labels=["job"],
    )
    mfu = GaugeMetricFamily(
        "profilerd_mfu_ratio",
        "Model FLOPs utilisation, an estimate from PROFILERD_FLOPS_PER_STEP and the device's peak",
        labels=["job"],
    )
    for job, ranks, current in jobs:
        for rank_id, bucket_counts, steps_total, seconds_sum, phase_seconds, last_step_unix_s in ranks:
            labels = [job, str(rank_id)]
            cumulative = 0
            buckets = []
            for bound, count in zip(STEP_BUCKETS_S, bucket_counts, strict=False):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            buckets.append(("+Inf", steps_total))
            steps.add_metric(labels, buckets, seconds_sum)
            for field, phase in PHASE_LABELS.items():
                phase_total.add_metric([*labels, phase], phase_seconds[field])
            if last_step_unix_s:
                last_step.add_metric(labels, last_step_unix_s)
        if current is None:
            continue
        for phase, value in current.features.phase_fractions.items():
            if current.features.steps:
                phase_ratio.add_metric([job, phase], value)
        for category in PRIMARY_VALUES:
            verdict.add_metric([job, category], 1.0 if current.primary == category else 0.0)
        severity.add_metric([job], float(Severity(current.severity).rank))
        for rec in current.recommendations():
            speedup.add_metric([job, rec["id"]], rec["estimated_speedup"])
        if current.features.device is not None:
            gpu_busy.add_metric([job], current.features.device.busy_fraction)
        if current.features.mfu is not None:
            mfu.add_metric([job], current.features.mfu.ratio)
    yield from (steps, phase_total, phase_ratio, last_step, verdict, severity, speedup, gpu_busy, mfu)


def _host_metrics(host: HostSample | None, processes: list[ProcessSample]) -> Iterator[Metric]:
    """The host and training-process families from ``collect``'s copy."""
    if host is not None:
        cpu = GaugeMetricFamily("profilerd_host_cpu_utilization_ratio", "Busy share per core", labels=["cpu"])
        for index, value in enumerate(host.cpu_per_core_ratio):
            cpu.add_metric([str(index)], value)
        yield cpu
        yield _gauge("profilerd_host_memory_used_bytes", "Host memory in use", host.memory_used_bytes)
        yield _gauge("profilerd_host_memory_total_bytes", "Host memory", host.memory_total_bytes)
        if host.iowait_ratio is not None:
            yield _gauge("profilerd_host_iowait_ratio", "Share of CPU time waiting for I/O", host.iowait_ratio)
    trainer = GaugeMetricFamily(
        "profilerd_process_cpu_cores",
        "CPU use in cores of training processes and their DataLoader workers",
        labels=["job", "rank", "role"],
    )
    workers = GaugeMetricFamily("profilerd_dataloader_workers", "Live DataLoader workers", labels=["job", "rank"])
    for sample in processes:
        if not sample.alive or sample.cpu_ratio is None:
            continue
        labels = [sample.job, str(sample.rank)]
        trainer.add_metric([*labels, "trainer"], sample.cpu_ratio)
        trainer.add_metric([*labels, "dataloader_worker"], sample.workers_cpu_ratio)
        workers.add_metric(labels, len(sample.worker_pids))
    yield trainer
    yield workers


def _rank_gpu_families(gpus: list[GpuSample], owners: dict[int, tuple[str, int]]) -> Iterator[Metric]:
    """Which GPU each training rank runs on, and its memory there: the join of NVML's process
    list with the probes' hellos, so GPU panels can be grouped by job and rank."""
    info = GaugeMetricFamily(
        "profilerd_rank_gpu_info", "1 for each GPU a training rank uses", labels=["job", "rank", "gpu", "uuid"]
    )
    memory = GaugeMetricFamily(
        "profilerd_rank_gpu_memory_used_bytes", "GPU memory used by a training rank", labels=["job", "rank", "gpu"]
    )
    for sample in gpus:
        for process in sample.processes:
            owner = owners.get(process.pid)
            if owner is None:
                continue
            job, rank = owner
            info.add_metric([job, str(rank), str(sample.index), sample.uuid], 1.0)
            if process.used_memory_bytes is not None:
                memory.add_metric([job, str(rank), str(sample.index)], float(process.used_memory_bytes))
    yield info
    yield memory


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def _bound(value: float) -> str:
    return repr(float(value))
