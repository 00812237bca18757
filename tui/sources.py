"""Where snapshots come from: the daemon's JSON API, a recording, or a Prometheus server.

Every source has one blocking method, ``fetch() -> Snapshot``, which the app only ever calls
from a worker thread; a source that cannot be read raises ``SourceError`` and the app shows
"disconnected — retrying". Nothing here imports Textual, so sources are tested and benchmarked
on their own.
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import pandas as pd

    from profilerd.model import RecordedProcess

from profilerd.analysis.document import headline, statement_of, straggler_of
from profilerd.client import ClientError, NotFound, get_json
from profilerd.client import origin as _origin
from profilerd.vocabulary import FRACTION_OF_CATEGORY, Fraction, Severity, fractions_from_phases
from profilerd_tui.model import (
    FindingRow,
    GpuRow,
    HostView,
    ProcessRow,
    RankRow,
    RecommendationRow,
    ReplayState,
    Snapshot,
    device_view,
    flag_straggler,
    mark_straggler,
    percentile,
)

SPARKLINE_STEPS = 150  # recent steps fetched per rank: enough for a 160-column sparkline


class Source(Protocol):
    """What the app needs from a source. ``fetch`` may block; it never runs on the UI thread."""

    label: str
    refresh_s: float

    def fetch(self) -> Snapshot: ...

    def close(self) -> None: ...


# ---- HTTP ---------------------------------------------------------------------------------------
# One error type for every source (the app shows its message), the daemon client's own.
SourceError = ClientError


# ---- the verdict document, shared by the daemon and replay paths ----------------------------------
def verdict_fields(verdict: Mapping[str, Any] | None) -> dict[str, Any]:
    """Snapshot fields from a ``profilerd.verdict/v1`` document (or nothing without one)."""
    if not verdict:
        return {}
    findings = tuple(
        FindingRow(
            rule=f["rule"],
            category=f["category"],
            severity=f["severity"],
            evidence=f.get("evidence", ""),
            confidence=f.get("confidence"),
            thresholds=dict(f.get("thresholds") or {}),
        )
        for f in verdict.get("findings") or []
    )
    evidence = {f.rule: f.evidence for f in findings}
    recommendations = tuple(
        RecommendationRow(
            id=r["id"],
            title=r.get("title") or r["id"],
            estimated_speedup=float(r.get("estimated_speedup") or 1.0),
            how=r.get("how", ""),
            why=r.get("why", ""),
            rule=r.get("rule", ""),
            evidence=evidence.get(r.get("rule", ""), ""),
        )
        for r in verdict.get("recommendations") or []
    )
    step_time = verdict.get("step_time_s") or {}
    steps = int(verdict.get("steps") or 0)
    return {
        "primary": verdict.get("primary", "none"),
        "severity": verdict.get("severity", "ok"),
        "summary": verdict.get("summary", ""),
        "statement": statement_of(verdict),
        "straggler": straggler_of(verdict),
        "fractions": dict(verdict["fractions"]) if steps and verdict.get("fractions") else None,
        "phases": dict(verdict["phases"]) if steps and verdict.get("phases") else None,
        "device": device_view(verdict.get("device")) if steps else None,
        "step_p50_s": step_time.get("p50") if steps else None,
        "step_p95_s": step_time.get("p95") if steps else None,
        "step_mean_s": step_time.get("mean") if steps else None,
        "steps_per_s": verdict.get("steps_per_s") if steps else None,
        "recommendations": recommendations,
        "findings": findings,
    }


def rank_row(
    rank: int,
    step_s: Sequence[float],
    data_wait_s: Sequence[float],
    comm_s: Sequence[float],
    *,
    host: str | None = None,
    pid: int | None = None,
    alive: bool = True,
    steps_total: int = 0,
) -> RankRow:
    """Per-rank statistics over its recent steps."""
    total = sum(step_s)
    own = [s - c for s, c in zip(step_s, comm_s, strict=False)]
    return RankRow(
        rank=rank,
        host=host,
        pid=pid,
        alive=alive,
        steps_total=steps_total,
        step_p50_s=percentile(step_s, 50),
        step_p95_s=percentile(step_s, 95),
        data_wait_ratio=sum(data_wait_s) / total if total > 0 else None,
        comm_ratio=sum(comm_s) / total if total > 0 else None,
        own_s=statistics.median(own) if own else None,
        recent_step_s=tuple(step_s[-SPARKLINE_STEPS:]),
    )


def gpu_row(sample: Mapping[str, Any], node: str | None = None) -> GpuRow:
    """A GPU from an ``asdict(GpuSample)`` dictionary (the API and the recording both use it)."""
    reasons = sample.get("clock_event_reasons")
    return GpuRow(
        index=int(sample.get("index", 0)),
        name=str(sample.get("name") or "GPU"),
        node=node,
        lost=bool(sample.get("lost")),
        utilization_ratio=sample.get("utilization_gpu_ratio"),
        sm_active_ratio=sample.get("sm_active_ratio"),
        tensor_active_ratio=sample.get("tensor_active_ratio"),
        memory_used_bytes=sample.get("memory_used_bytes"),
        memory_total_bytes=sample.get("memory_total_bytes"),
        power_watts=sample.get("power_watts"),
        power_limit_watts=sample.get("power_limit_watts"),
        temperature_celsius=sample.get("temperature_celsius"),
        throttle_reasons=tuple(reasons) if reasons is not None else None,
        uuid=str(sample.get("uuid") or ""),
    )


def process_rows(samples: Iterable[Mapping[str, Any]]) -> tuple[ProcessRow, ...]:
    """Trainers, each followed by its DataLoader workers, ordered by rank."""
    rows: list[ProcessRow] = []
    for sample in sorted(samples, key=lambda s: (s.get("rank", 0), s.get("pid", 0))):
        rank = int(sample.get("rank", 0))
        alive = bool(sample.get("alive", True))
        rows.append(
            ProcessRow(
                pid=sample.get("pid"),
                rank=rank,
                role="trainer",
                cpu_cores=sample.get("cpu_ratio"),
                rss_bytes=sample.get("rss_bytes"),
                alive=alive,
            )
        )
        ratios = list(sample.get("worker_cpu_ratios") or [])
        for index, pid in enumerate(sample.get("worker_pids") or []):
            cpu = ratios[index] if index < len(ratios) else None
            rows.append(ProcessRow(pid=pid, rank=rank, role="worker", cpu_cores=cpu, alive=alive))
    return tuple(rows)


def host_view(host: Mapping[str, Any] | None, node: str | None = None) -> HostView | None:
    if not host:
        return None
    return HostView(
        cpu_count=host.get("cpu_count"),
        cpu_per_core_ratio=tuple(host.get("cpu_per_core_ratio") or ()),
        cpu_ratio=host.get("cpu_ratio"),
        memory_used_bytes=host.get("memory_used_bytes"),
        memory_total_bytes=host.get("memory_total_bytes"),
        node=node,
    )


# ---- the daemon ---------------------------------------------------------------------------------
class DaemonSource:
    """The live view: one job of a profilerd daemon, read from ``/api/v1``."""

    refresh_s = 1.0  # the daemon analyses once a second; faster would show the same verdict

    def __init__(
        self,
        url: str | Callable[[], str | None],
        job: str | None = None,
        *,
        steps: int = SPARKLINE_STEPS,
        timeout_s: float = 2.0,
    ) -> None:
        self._url = url
        self.job = job  # followed job; None follows the newest live job
        self.steps = steps
        self.timeout_s = timeout_s
        self._followed: str | None = None
        self.label = f"live {_origin(url)}" if isinstance(url, str) else "live (local daemon)"

    def base_url(self) -> str:
        url = self._url if isinstance(self._url, str) else self._url()
        if not url:
            raise SourceError(
                "no profilerd daemon is running for this user (start one with `profilerd serve`, "
                "or train under `profilerd run -- ...`)"
            )
        url = url.rstrip("/")
        if not isinstance(self._url, str):
            self.label = f"live {_origin(url)}"
        return url

    def fetch(self) -> Snapshot:
        base = self.base_url()
        listing = get_json(f"{base}/api/v1/jobs", self.timeout_s).get("jobs") or []
        names = tuple(j["job"] for j in listing)
        job = self._pick(listing)
        if job is None:
            waiting = (
                f"waiting for job {self.job!r} to report"
                if self.job
                else "no training job has reported to the daemon yet"
            )
            return Snapshot(source=self.label, job=self.job, summary=waiting, jobs=names, taken_unix_s=time.time())
        try:
            document = get_json(
                f"{base}/api/v1/jobs/{urllib.parse.quote(job, safe='')}?steps={self.steps}", self.timeout_s
            )
        except NotFound:
            return Snapshot(source=self.label, job=job, summary=f"job {job!r} is gone", jobs=names)
        gpus = get_json(f"{base}/api/v1/gpus", self.timeout_s)
        host = get_json(f"{base}/api/v1/host", self.timeout_s).get("host")
        self._followed = job
        return snapshot_from_api(self.label, document, gpus, host, names)

    def _pick(self, listing: list[dict[str, Any]]) -> str | None:
        names = [j["job"] for j in listing]
        if self.job is not None:
            return self.job if self.job in names else None
        if self._followed in names:
            followed = next(j for j in listing if j["job"] == self._followed)
            newer_alive = [j for j in listing[names.index(self._followed) + 1 :] if j.get("alive")]
            if followed.get("alive") or not newer_alive:
                return self._followed
        alive = [j["job"] for j in listing if j.get("alive")]
        return alive[-1] if alive else (names[-1] if names else None)

    def close(self) -> None:
        """Nothing to release: every fetch opens and closes its own connections."""


def snapshot_from_api(
    label: str,
    document: Mapping[str, Any],
    gpus: Mapping[str, Any] | None,
    host: Mapping[str, Any] | None,
    jobs: tuple[str, ...] = (),
) -> Snapshot:
    """A snapshot from ``/api/v1/jobs/<job>``, ``/api/v1/gpus`` and ``/api/v1/host``."""
    ranks = []
    for detail in document.get("rank_detail") or []:
        recent = detail.get("recent_steps") or []
        ranks.append(
            rank_row(
                int(detail["rank"]),
                [s["step_s"] for s in recent],
                [s["data_wait_s"] for s in recent],
                [s["comm_s"] for s in recent],
                host=detail.get("hostname"),
                pid=detail.get("pid"),
                alive=bool(detail.get("alive")),
                steps_total=int(detail.get("steps_total") or 0),
            )
        )
    live_ranks = [r for r in ranks if r.alive] or ranks
    step_times = live_ranks[0].recent_step_s if live_ranks else ()
    gpus = gpus or {}
    fields = verdict_fields(document.get("verdict"))
    fields.setdefault("primary", document.get("primary", "none"))
    fields.setdefault("severity", document.get("severity", "ok"))
    fields.setdefault("summary", document.get("summary", ""))
    fields.setdefault("statement", statement_of(fields))  # the job's own summary, before any verdict
    return Snapshot(
        source=label,
        job=document.get("job"),
        run_id=document.get("run_id"),
        state="running" if document.get("alive") else "finished",
        steps_total=int(document.get("steps_total") or 0),
        step_times_s=step_times,
        ranks=flag_straggler(ranks, fields.get("straggler")),
        gpus=tuple(gpu_row(g) for g in gpus.get("gpus") or []),
        gpu_note=None if gpus.get("available") else (gpus.get("reason") or "no GPU sampling"),
        processes=process_rows(document.get("processes") or []),
        hosts=tuple(h for h in (host_view(host),) if h is not None),
        jobs=jobs,
        taken_unix_s=time.time(),
        **fields,
    )


# ---- a recording ----------------------------------------------------------------------------------
SPEEDS = (1.0, 4.0, 16.0)


class ReplaySource:
    """Plays a recording back: at each position, the verdict the live analysis would have
    given over the window that ended there, with the host, processes and GPUs of that moment.

    The position moves with the wall clock times the speed while playing; the app's keys call
    ``toggle``, ``set_speed``, ``step`` and ``seek`` from the UI thread while ``fetch`` runs in
    a worker, hence the lock.
    """

    refresh_s = 0.5

    def __init__(
        self,
        path: Path,
        *,
        rules_file: Path | None = None,
        speed: float = 1.0,
        position_s: float | None = None,
        playing: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from profilerd import recordings as runs
        from profilerd.analysis.rules import load_rules

        ruleset, problems = load_rules(rules_file)
        if problems:
            raise SourceError("; ".join(problems))
        try:
            self.recording = runs.load(path)
        except runs.RecordingError as exc:
            raise SourceError(str(exc)) from None
        self.ruleset = ruleset
        self.path = path
        self.label = f"replay {path.name}"
        self._read_extra(path)
        steps = self.recording.steps
        if steps.empty:
            self.start_unix_s = self.end_unix_s = 0.0
        else:
            self.start_unix_s = float((steps["end_unix_s"] - steps["step_s"]).min())
            self.end_unix_s = float(steps["end_unix_s"].max())
        self.duration_s = max(0.0, self.end_unix_s - self.start_unix_s)
        self._lock = threading.Lock()
        self._clock = clock
        self._speed = speed
        self._playing = playing
        self._position_s = self.duration_s if position_s is None and not playing else (position_s or 0.0)
        self._position_s = min(max(0.0, self._position_s), self.duration_s)
        self._last_tick = clock()
        self._cache: tuple[float, Snapshot] | None = None
        self._final: dict[str, Any] | None = None  # the whole run's verdict document, once computed
        self._gpu_samples: pd.DataFrame | None = None

    def _read_extra(self, path: Path) -> None:
        """What ``recordings.load`` leaves out and the screens show: per-core CPU, memory, GPUs, RSS."""
        from profilerd.recordings import RecordingError, read_sample_rows

        try:
            rows = read_sample_rows(path)
        except RecordingError as exc:
            raise SourceError(str(exc)) from None
        self._hosts, self._processes, self._gpus, self._sessions = rows.hosts, rows.processes, rows.gpus, rows.sessions

    # ---- controls (UI thread) --------------------------------------------------------------
    def _advance(self) -> None:
        now = self._clock()
        if self._playing:
            self._position_s = min(self.duration_s, self._position_s + (now - self._last_tick) * self._speed)
            if self._position_s >= self.duration_s:
                self._playing = False
        self._last_tick = now

    def state(self) -> ReplayState:
        with self._lock:
            self._advance()
            return ReplayState(self._position_s, self.duration_s, self._speed, self._playing)

    def toggle(self) -> None:
        with self._lock:
            self._advance()
            if not self._playing and self._position_s >= self.duration_s:
                self._position_s = 0.0  # play again from the start
            self._playing = not self._playing

    def set_speed(self, speed: float) -> None:
        with self._lock:
            self._advance()
            self._speed = speed

    def faster(self, direction: int) -> float:
        """The next speed up (+1) or down (-1) among 1×, 4×, 16×."""
        with self._lock:
            index = min(range(len(SPEEDS)), key=lambda i: abs(SPEEDS[i] - self._speed))
            self._advance()
            self._speed = SPEEDS[min(max(index + direction, 0), len(SPEEDS) - 1)]
            return self._speed

    def step(self, delta_s: float) -> None:
        """Move by ``delta_s`` and pause: stepping is for looking closely."""
        with self._lock:
            self._advance()
            self._playing = False
            self._position_s = min(max(0.0, self._position_s + delta_s), self.duration_s)

    def seek(self, position_s: float) -> None:
        with self._lock:
            self._advance()
            self._position_s = min(max(0.0, position_s), self.duration_s)

    # ---- fetch (worker thread) ----------------------------------------------------------------
    def fetch(self) -> Snapshot:
        state = self.state()
        if self._cache is not None and self._cache[0] == state.position_s:
            return replace(self._cache[1], replay=state)  # paused: no need to analyse again
        snapshot = self.snapshot_at(self.start_unix_s + state.position_s, state)
        self._cache = (state.position_s, snapshot)
        return snapshot

    def snapshot_at(self, at_unix_s: float, replay: ReplayState | None = None) -> Snapshot:
        """What the live view would have shown at ``at_unix_s``."""
        from profilerd.analysis.features import with_phases

        rec = self.recording
        steps = rec.steps
        done = steps[steps["end_unix_s"] <= at_unix_s]
        finished = at_unix_s >= self.end_unix_s
        fields = verdict_fields(self._verdict_at(at_unix_s, done, finished))
        ranks = []
        recent = with_phases(done.groupby("rank").tail(SPARKLINE_STEPS)) if not done.empty else done
        totals = done.groupby("rank").size() if not done.empty else {}
        for rank, group in recent.groupby("rank") if not recent.empty else ():
            pid, hostname = self._sessions.get(int(rank), (int(group["pid"].iloc[-1]), None))
            ranks.append(
                rank_row(
                    int(rank),
                    group["step_s"].tolist(),
                    group["data_wait_s"].tolist(),
                    group["comm_s"].tolist(),
                    host=hostname,
                    pid=pid,
                    alive=at_unix_s - float(group["end_unix_s"].iloc[-1]) < 5.0,
                    steps_total=int(totals[rank]),
                )
            )
        return Snapshot(
            source=self.label,
            job=rec.job,
            run_id=rec.run_id,
            state="finished" if finished else ("running" if ranks else "waiting"),
            steps_total=len(done),
            step_times_s=ranks[0].recent_step_s if ranks else (),
            ranks=flag_straggler(ranks, fields.get("straggler")),
            gpus=self._gpus_at(at_unix_s),
            gpu_note=None if self._gpus else "no GPU samples in this recording",
            processes=self._processes_at(at_unix_s),
            hosts=self._host_at(at_unix_s),
            replay=replay,
            taken_unix_s=at_unix_s,
            **fields,
        )

    def _verdict_at(self, at_unix_s: float, done: pd.DataFrame, finished: bool) -> dict[str, Any]:
        """At the end, the whole run's verdict, the one `report` gives; before it, what the live
        analysis would have shown: the daemon's window, with the loss evidence of the run so far."""
        from profilerd import recordings as runs
        from profilerd.analysis.diagnosis import Observation, diagnose
        from profilerd.analysis.history import summarize_losses
        from profilerd.config import DaemonConfig

        rec = self.recording
        if finished:
            if self._final is None:
                self._final = runs.analyse(rec, self.ruleset).to_json(rec.run_id, rec.job)
            return self._final
        if self._gpu_samples is None:
            self._gpu_samples = runs.gpu_samples(rec)  # read once: the recording does not change
        live = DaemonConfig()
        observation = Observation.window(
            done,
            at_unix_s,
            live.window_s,
            live.window_steps,
            self.ruleset,
            losses=summarize_losses(done),
            config=rec.config(),
            hosts=rec.hosts,
            processes=rec.processes,
            gpus=self._gpu_samples,
        )
        return diagnose(observation, self.ruleset).to_json(rec.run_id, rec.job)

    def _host_at(self, at_unix_s: float) -> tuple[HostView, ...]:
        host = None
        for sample in self._hosts:
            if (sample.ts_unix_s or 0.0) > at_unix_s:
                break
            host = sample
        if host is None:
            return ()
        return (
            HostView(
                host.cpu_count, host.cpu_per_core_ratio, host.cpu_ratio, host.memory_used_bytes, host.memory_total_bytes
            ),
        )

    def _processes_at(self, at_unix_s: float) -> tuple[ProcessRow, ...]:
        latest: dict[int, RecordedProcess] = {}
        for process in self._processes:
            if (process.ts_unix_s or 0.0) > at_unix_s:
                break
            latest[process.pid] = process
        rows: list[ProcessRow] = []
        for p in sorted(latest.values(), key=lambda p: (p.rank, p.pid)):
            gone = not p.alive or at_unix_s - (p.ts_unix_s or 0.0) > 5.0
            rows.append(ProcessRow(p.pid, p.rank, "trainer", p.cpu_ratio, p.rss_bytes, alive=not gone))
            if p.num_workers:
                workers = ProcessRow(None, p.rank, "workers", p.workers_cpu_ratio, alive=not gone, count=p.num_workers)
                rows.append(workers)
        return tuple(rows)

    def _gpus_at(self, at_unix_s: float) -> tuple[GpuRow, ...]:
        latest: dict[int, str] = {}
        for ts, index, sample in self._gpus:
            if ts > at_unix_s:
                break
            latest[index] = sample
        return tuple(gpu_row(json.loads(latest[i])) for i in sorted(latest))

    def close(self) -> None:
        """The recording was read whole at start; nothing stays open."""


# ---- Prometheus -----------------------------------------------------------------------------------
_GPU_METRICS = (
    "info",
    "lost",
    "utilization_ratio",
    "sm_active_ratio",
    "tensor_active_ratio",
    "memory_used_bytes",
    "memory_total_bytes",
    "power_watts",
    "power_limit_watts",
    "temperature_celsius",
    "clock_event_reason",
)


class PrometheusSource:
    """A job spread over several nodes, read from the Prometheus server that scrapes their daemons.

    Only numbers travel through Prometheus: the verdict's category and severity, phase shares
    (from the phase counters, job-wide), step-time quantiles from the histogram, recommendation
    ids with their speedups, and per-node GPUs and processes. The evidence sentences and code
    snippets stay on each node (``profilerd report`` or the node's API has them).

    A scrape normally renames the daemon's ``job`` label to ``exported_job`` (Prometheus keeps
    ``job`` for the scrape job) unless ``honor_labels`` is set; both are tried.
    """

    refresh_s = 5.0  # Prometheus scrapes every 15-60 s; polling faster shows nothing new
    RATE_WINDOW = "1m"

    def __init__(self, url: str, job: str, *, timeout_s: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self.url = url.rstrip("/")
        self.job = job
        self.timeout_s = timeout_s
        self.label = f"prometheus {_origin(self.url)}"
        self._clock = clock
        self._job_label: str | None = None

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query; the result vector as returned (``metric`` labels and ``value``)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        document = get_json(url, self.timeout_s)
        if document.get("status") != "success":
            raise SourceError(f"Prometheus refused a query: {document.get('error', 'unknown error')}")
        return list(document["data"].get("result") or [])

    def query_range(self, promql: str, seconds: float, step_s: float) -> list[dict[str, Any]]:
        end = self._clock()
        params = {"query": promql, "start": f"{end - seconds:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"}
        url = f"{self.url}/api/v1/query_range?{urllib.parse.urlencode(params)}"
        document = get_json(url, self.timeout_s)
        if document.get("status") != "success":
            raise SourceError(f"Prometheus refused a query: {document.get('error', 'unknown error')}")
        return list(document["data"].get("result") or [])

    def _selector(self) -> str | None:
        """``job="J"`` or ``exported_job="J"``, whichever the server has series for."""
        if self._job_label is None:
            for label in ("job", "exported_job"):
                if self.query(f'profilerd_step_duration_seconds_count{{{label}="{_escape(self.job)}"}}'):
                    self._job_label = label
                    break
        return f'{self._job_label}="{_escape(self.job)}"' if self._job_label else None

    def fetch(self) -> Snapshot:
        selector = self._selector()
        if selector is None:
            return Snapshot(
                source=self.label,
                job=self.job,
                summary=f"no profilerd series for job {self.job!r} in Prometheus yet",
                taken_unix_s=self._clock(),
            )
        s, w = selector, self.RATE_WINDOW
        counts = self.query(f"profilerd_step_duration_seconds_count{{{s}}}")
        last_steps = self.query(f"profilerd_last_step_timestamp_seconds{{{s}}}")
        phase_rates = self.query(f"rate(profilerd_step_phase_seconds_total{{{s}}}[{w}])")
        step_sum_rates = self.query(f"rate(profilerd_step_duration_seconds_sum{{{s}}}[{w}])")
        step_count_rates = self.query(f"rate(profilerd_step_duration_seconds_count{{{s}}}[{w}])")
        quantiles = {
            q: _scalar(
                self.query(
                    f"histogram_quantile({q}, sum by (le) (rate(profilerd_step_duration_seconds_bucket{{{s}}}[{w}])))"
                )
            )
            for q in (0.5, 0.95)
        }
        verdict = self.query(f"profilerd_verdict{{{s}}} == 1")
        severity = self.query(f"profilerd_verdict_severity{{{s}}}")
        speedups = self.query(f"profilerd_recommendation_estimated_speedup_ratio{{{s}}}")
        cpu = self.query(f"profilerd_process_cpu_cores{{{s}}}")
        workers = self.query(f"profilerd_dataloader_workers{{{s}}}")
        on_nodes = f"and on (instance) group by (instance) (profilerd_step_duration_seconds_count{{{s}}})"
        names = "|".join(_GPU_METRICS)
        gpu_series = self.query(f'{{__name__=~"profilerd_gpu_({names})"}} {on_nodes}')
        host_series = self.query(f'{{__name__=~"profilerd_host_.*"}} {on_nodes}')
        trend = self.query_range(
            f"sum(rate(profilerd_step_duration_seconds_sum{{{s}}}[30s])) "
            f"/ sum(rate(profilerd_step_duration_seconds_count{{{s}}}[30s]))",
            seconds=600,
            step_s=5,
        )

        now = self._clock()
        phases_by_rank: dict[tuple[str, str], dict[str, float]] = {}
        for series in phase_rates:
            labels = series["metric"]
            key = (labels.get("instance", ""), labels.get("rank", "0"))
            phases_by_rank.setdefault(key, {})[labels.get("phase", "other")] = _value(series)
        job_phases: dict[str, float] = {}
        for rank_rates in phases_by_rank.values():
            for name, rate in rank_rates.items():
                job_phases[name] = job_phases.get(name, 0.0) + rate
        total = sum(job_phases.values())
        shares = {k: v / total for k, v in job_phases.items()} if total > 0 else None
        fractions = fractions_from_phases(shares) if shares else None

        sums = {_rank_key(x): _value(x) for x in step_sum_rates}
        rates = {_rank_key(x): _value(x) for x in step_count_rates}
        totals = {_rank_key(x): int(_value(x)) for x in counts}
        last = {_rank_key(x): _value(x) for x in last_steps}
        ranks = []
        for key in sorted(totals, key=lambda k: (int(k[1]) if k[1].isdigit() else 0, k[0])):
            instance, rank = key
            rate = rates.get(key, 0.0)
            mean = sums.get(key, 0.0) / rate if rate > 0 else None
            rank_phase = phases_by_rank.get(key, {})
            busy = sum(rank_phase.values())
            comm = rank_phase.get("communication", 0.0)
            ranks.append(
                RankRow(
                    rank=int(rank) if rank.isdigit() else 0,
                    host=_node(instance),
                    pid=None,
                    alive=now - last.get(key, 0.0) < 60.0,
                    steps_total=totals[key],
                    step_p50_s=mean,
                    step_p95_s=None,
                    data_wait_ratio=rank_phase.get("data_wait", 0.0) / busy if busy > 0 else None,
                    comm_ratio=comm / busy if busy > 0 else None,
                    own_s=(mean * (1 - comm / busy)) if mean is not None and busy > 0 else mean,
                )
            )

        primary = verdict[0]["metric"].get("category", "none") if verdict else "none"
        level = max((int(_value(x)) for x in severity), default=0)
        severity_name = str(list(Severity)[min(max(level, 0), len(Severity) - 1)])
        best: dict[str, float] = {}
        for series in speedups:
            rid = series["metric"].get("recommendation", "?")
            best[rid] = max(best.get(rid, 1.0), _value(series))
        recommendations = tuple(
            RecommendationRow(
                id=rid,
                title=rid,
                estimated_speedup=speedup,
                why="read from Prometheus: the evidence and snippet are in `profilerd report` on the node",
            )
            for rid, speedup in sorted(best.items(), key=lambda kv: -kv[1])
        )
        live_ranks = [r for r in ranks if r.alive]
        total_rate = sum(rates.values())
        statement = _prometheus_statement(primary, fractions, len(ranks), len({r.host for r in ranks}))
        return Snapshot(
            source=self.label,
            job=self.job,
            run_id=None,
            state="running" if live_ranks else "finished",
            primary=primary,
            severity=severity_name,
            summary=f"{headline(primary)}: {statement}",
            statement=statement,
            fractions=fractions,
            phases=shares,
            step_p50_s=quantiles[0.5],
            step_p95_s=quantiles[0.95],
            step_mean_s=sum(sums.values()) / total_rate if total_rate > 0 else None,
            steps_total=sum(totals.values()),
            steps_per_s=total_rate / len(ranks) if ranks else None,
            step_times_s=tuple(
                v for v in (_float(p[1]) for p in (trend[0]["values"] if trend else [])) if v is not None
            ),
            ranks=mark_straggler(ranks),
            gpus=_gpus_from_series(gpu_series),
            gpu_note=None if gpu_series else "no profilerd_gpu_* series on the job's nodes",
            processes=_processes_from_series(cpu, workers),
            hosts=_hosts_from_series(host_series),
            recommendations=recommendations,
            taken_unix_s=now,
        )

    def close(self) -> None:
        """Nothing to release: every query opens and closes its own connection."""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _float(raw: Any) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _value(series: Mapping[str, Any]) -> float:
    value = _float(series.get("value", [0, "NaN"])[1])
    return 0.0 if value is None else value


def _scalar(result: list[dict[str, Any]]) -> float | None:
    return _float(result[0]["value"][1]) if result else None


def _rank_key(series: Mapping[str, Any]) -> tuple[str, str]:
    labels = series["metric"]
    return labels.get("instance", ""), labels.get("rank", "0")


def _node(instance: str) -> str | None:
    """The host part of a scrape target, which is all a person needs to tell nodes apart."""
    if not instance:
        return None
    return instance.rsplit(":", 1)[0] if instance.count(":") == 1 else instance


def _prometheus_statement(primary: str, fractions: dict[str, float] | None, ranks: int, nodes: int) -> str:
    """The sentence under the headline, from the numbers Prometheus has (no evidence sentences)."""
    if not fractions:
        return "no steps in the last minute"
    share = fractions.get(FRACTION_OF_CATEGORY.get(primary, Fraction.COMPUTE), 0.0)
    what = {
        "data": "waiting for batches",
        "compute": "in forward, backward and optimizer",
        "communication": "in exposed communication",
        "algorithm": "outside the measured phases",
    }.get(primary, "")
    where = f"{ranks} rank{'s' if ranks != 1 else ''} on {nodes} node{'s' if nodes != 1 else ''}"
    if primary == "none":
        return where
    return f"{share:.0%} of step time {what} across {where}"


def _gpus_from_series(result: list[dict[str, Any]]) -> tuple[GpuRow, ...]:
    by_gpu: dict[tuple[str, str], dict[str, Any]] = {}
    for series in result:
        labels = series["metric"]
        name = labels.get("__name__", "")[len("profilerd_gpu_") :]
        key = (labels.get("instance", ""), labels.get("gpu", "0"))
        entry = by_gpu.setdefault(key, {"reasons": []})
        if name == "info":
            entry["name"] = labels.get("name", "GPU")
            entry["uuid"] = labels.get("uuid", "")
        elif name == "clock_event_reason":
            entry.setdefault("reasons_known", True)
            if _value(series) >= 1:
                entry["reasons"].append(labels.get("reason", "?"))
        else:
            entry[name] = _value(series)
    rows = []
    for (instance, gpu), e in sorted(by_gpu.items(), key=lambda kv: (kv[0][0], int(kv[0][1] or 0))):
        rows.append(
            GpuRow(
                index=int(gpu or 0),
                name=e.get("name", "GPU"),
                node=_node(instance),
                lost=bool(e.get("lost")),
                utilization_ratio=e.get("utilization_ratio"),
                sm_active_ratio=e.get("sm_active_ratio"),
                tensor_active_ratio=e.get("tensor_active_ratio"),
                memory_used_bytes=e.get("memory_used_bytes"),
                memory_total_bytes=e.get("memory_total_bytes"),
                power_watts=e.get("power_watts"),
                power_limit_watts=e.get("power_limit_watts"),
                temperature_celsius=e.get("temperature_celsius"),
                throttle_reasons=tuple(e["reasons"]) if e.get("reasons_known") else None,
                uuid=e.get("uuid", ""),
            )
        )
    return tuple(rows)


def _processes_from_series(cpu: list[dict[str, Any]], workers: list[dict[str, Any]]) -> tuple[ProcessRow, ...]:
    counts = {_rank_key(x): int(_value(x)) for x in workers}
    rows: list[ProcessRow] = []
    ordered = sorted(cpu, key=lambda x: (_rank_key(x)[0], int(_rank_key(x)[1] or 0), x["metric"].get("role", "")))
    for series in sorted(ordered, key=lambda x: x["metric"].get("role") != "trainer"):
        key = _rank_key(series)
        role = series["metric"].get("role", "trainer")
        count = counts.get(key, 0)
        if role != "trainer" and count == 0:
            continue
        rows.append(
            ProcessRow(
                pid=None,
                rank=int(key[1]) if key[1].isdigit() else 0,
                role="trainer" if role == "trainer" else "workers",
                cpu_cores=_value(series),
                node=_node(key[0]),
                count=count if role != "trainer" else 1,
            )
        )
    rows.sort(key=lambda r: (r.node or "", r.rank, r.role != "trainer"))
    return tuple(rows)


def _hosts_from_series(result: list[dict[str, Any]]) -> tuple[HostView, ...]:
    by_node: dict[str, dict[str, Any]] = {}
    for series in result:
        labels = series["metric"]
        entry = by_node.setdefault(labels.get("instance", ""), {"cores": {}})
        name = labels.get("__name__", "")
        if name == "profilerd_host_cpu_utilization_ratio":
            entry["cores"][int(labels.get("cpu", "0"))] = _value(series)
        elif name in ("profilerd_host_memory_used_bytes", "profilerd_host_memory_total_bytes"):
            entry[name] = int(_value(series))
    views = []
    for instance, e in sorted(by_node.items()):
        cores = tuple(e["cores"][i] for i in sorted(e["cores"]))
        views.append(
            HostView(
                cpu_count=len(cores) or None,
                cpu_per_core_ratio=cores,
                cpu_ratio=sum(cores) / len(cores) if cores else None,
                memory_used_bytes=e.get("profilerd_host_memory_used_bytes"),
                memory_total_bytes=e.get("profilerd_host_memory_total_bytes"),
                node=_node(instance),
            )
        )
    return tuple(views)


class AttachSource:
    """The live view of `profilerd attach`: verdicts from a ``profilerd.attach.watch.LiveAttach``."""

    refresh_s = 1.0

    def __init__(self, live: Any) -> None:
        self.live = live
        self.label = f"attach pid {live.target.pid}"

    def fetch(self) -> Snapshot:
        live = self.live
        summary = live.l0.summary
        job = f"pid-{live.target.pid}"
        process = {
            "pid": live.target.pid,
            "rank": 0,
            "alive": not summary.exited,
            "cpu_ratio": summary.main_thread_cores + summary.other_threads_cores,
            "worker_pids": list(live.l0.worker_pids()),
            "worker_cpu_ratios": list(live.l0.worker_ratios()),
        }
        document = live.document
        if document is None:
            return Snapshot(
                source=self.label,
                job=job,
                state="running",
                summary="attaching: the first verdict comes after a few seconds of samples",
                processes=process_rows([process]),
                taken_unix_s=time.time(),
            )
        self.label = f"attach pid {live.target.pid} · layer {document['attach_layer']}"
        return Snapshot(
            source=self.label,
            job=job,
            run_id=document.get("run_id"),
            state="finished" if summary.exited else "running",
            steps_total=int(document.get("steps") or 0),
            processes=process_rows([process]),
            taken_unix_s=time.time(),
            **verdict_fields(document),
        )

    def close(self) -> None:
        self.live.stop()
