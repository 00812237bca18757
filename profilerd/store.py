"""The daemon's in-memory state: bounded rings of steps per rank and the latest snapshots.

Samplers write (through ``profilerd.samplers.sinks``), analysis reads windows, exporters and
the API only read. All access goes through one lock, private to this module, held for short,
allocation-light sections; a reader that needs several parts at once copies them in ``read()``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

from profilerd.model import GpuEvent, GpuSample, HostSample, ProbeSession, ProcessSample, StepRecord
from profilerd.vocabulary import Phase

T = TypeVar("T")

# Step-time histogram buckets (seconds): from fast CPU loops to multi-second LLM steps.
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Late device timing comes for the first steps within about a second: it is looked for among
# the newest steps of a rank's ring only.
LATE_TIMING_SEARCH = 256


@dataclass
class RankState:
    session: ProbeSession
    steps: deque[StepRecord]
    steps_total: int = 0
    phase_seconds_total: dict[str, float] = field(default_factory=lambda: {phase.column: 0.0 for phase in Phase})
    step_seconds_sum: float = 0.0
    bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(STEP_BUCKETS_S) + 1))
    config: dict[str, Any] | None = None
    last_step_unix_s: float = 0.0
    # Per process: a rank may be fed by several live processes at once (hogwild workers and
    # other torch.multiprocessing children that are not distributed ranks all say rank 0).
    seq_by_pid: dict[int, tuple[int, int]] = field(default_factory=dict)  # pid: (last seq, sender dropped)
    live_pids: set[int] = field(default_factory=set)
    alive: bool = True
    clean_exit: bool = False


@dataclass
class JobState:
    job: str
    run_id: str
    ranks: dict[int, RankState] = field(default_factory=dict)
    verdict: Any = None  # profilerd.analysis.verdict.Verdict, set by analysis (a layer above)
    first_seen_unix_s: float = field(default_factory=time.time)


@dataclass
class RunState:
    run_id: str
    job: str
    state: str = "running"  # running -> closing (flushing the recording) -> closed | aborted
    final_state: str = "closed"
    exit_code: int | None = None
    started_unix_s: float = field(default_factory=time.time)
    ended_unix_s: float | None = None
    recording_path: str | None = None


@dataclass
class SamplerHealth:
    cycles_total: int = 0
    errors_total: int = 0
    lag_s: float = 0.0
    last_duration_s: float = 0.0
    last_error: str | None = None


class Store:
    def __init__(self, window_steps: int = 500, window_s: float = 120.0, max_jobs: int = 256) -> None:
        self._lock = threading.Lock()
        self.window_steps = window_steps
        self.window_s = window_s
        self.max_jobs = max_jobs
        self.started_unix_s = time.time()
        self.sessions: dict[int, ProbeSession] = {}
        self.jobs: dict[str, JobState] = {}
        self.runs: dict[str, RunState] = {}
        self.received: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.host: HostSample | None = None
        self.host_history: deque[HostSample] = deque(maxlen=600)
        self.processes: dict[int, ProcessSample] = {}
        self.process_history: deque[ProcessSample] = deque(maxlen=20_000)
        self.gpus: list[GpuSample] = []
        self.gpu_history: deque[GpuSample] = deque(maxlen=8 * 600)
        self.gpu_field_errors = 0
        self.gpu_available = False
        self.gpu_unavailable_reason: str | None = None
        self.gpu_events: deque[GpuEvent] = deque(maxlen=1000)
        self.gpu_event_counts: Counter[tuple[int, str]] = Counter()
        self.health: dict[str, SamplerHealth] = {}
        self.recording_paused_reason: str | None = None
        self.recording_rows_dropped = 0  # rows a long recording pause could not keep in memory

    # ---- ingest side -----------------------------------------------------------------
    def add_session(self, session: ProbeSession) -> bool:
        """Register a hello; False if the job table is full (the sender is then dropped)."""
        with self._lock:
            job = self.jobs.get(session.job)
            if job is None:
                if len(self.jobs) >= self.max_jobs and not self._evict_finished_job():
                    return False
                job = self.jobs[session.job] = JobState(session.job, session.run_id)
            if session.run_id not in self.runs:
                self.runs[session.run_id] = RunState(session.run_id, session.job)
                self._forget_old_runs()
            self.sessions[session.pid] = session
            rank = job.ranks.get(session.rank)
            if rank is not None and rank.session.pid != session.pid and _shares_rank(rank, session.pid):
                rank.session = session  # the newest hello names the rank; the others keep sending
                rank.live_pids.add(session.pid)
                rank.alive = True
            elif rank is None or rank.session.pid != session.pid:
                if rank is not None:  # a restarted rank: its previous process is gone
                    for pid in rank.live_pids | {rank.session.pid}:
                        previous = self.sessions.get(pid)
                        if previous is not None and previous.job == session.job and previous.rank == session.rank:
                            del self.sessions[pid]
                job.ranks[session.rank] = RankState(session, deque(maxlen=self.window_steps), live_pids={session.pid})
            else:
                rank.session = session
                rank.live_pids.add(session.pid)
                rank.alive = True
            return True

    def _evict_finished_job(self) -> bool:
        for name, job in self.jobs.items():
            if not any(r.alive for r in job.ranks.values()):
                del self.jobs[name]
                for rank in job.ranks.values():
                    if self.sessions.get(rank.session.pid) is rank.session:
                        del self.sessions[rank.session.pid]
                return True
        return False

    def _forget_old_runs(self) -> None:
        """Keep the run table bounded over weeks: the oldest finished runs go first (their
        recordings stay on disk)."""
        excess = len(self.runs) - 4 * self.max_jobs
        if excess <= 0:
            return
        finished = [run for run in self.runs.values() if run.state in ("closed", "aborted")]
        for run in sorted(finished, key=lambda r: r.started_unix_s)[:excess]:
            del self.runs[run.run_id]

    def add_step(self, step: StepRecord, seq: int, sender_dropped: int) -> None:
        with self._lock:
            job = self.jobs.get(step.job)
            rank = job.ranks.get(step.rank) if job else None
            if rank is None:
                self.dropped["unknown_sender"] += 1
                return
            # Messages the sender could not send show up twice: as its own drop count and as a
            # gap in the sequence. Count them once, as sender_side; a gap beyond what the
            # sender admits to was lost on the way.
            last_seq, last_dropped = rank.seq_by_pid.get(step.pid, (0, 0))
            admitted = max(0, sender_dropped - last_dropped)
            if admitted:
                self.dropped["sender_side"] += admitted
            if last_seq and seq > last_seq + 1 + admitted:
                self.dropped["sequence_gap"] += seq - last_seq - 1 - admitted
            rank.seq_by_pid[step.pid] = (seq, sender_dropped)
            rank.steps.append(step)
            rank.steps_total += 1
            rank.last_step_unix_s = step.end_unix_s
            totals = rank.phase_seconds_total
            totals["data_wait_s"] += step.data_wait_s
            totals["forward_s"] += step.forward_s
            totals["backward_s"] += step.backward_s
            totals["optimizer_s"] += step.optimizer_s
            totals["comm_s"] += step.comm_s
            totals["other_s"] += step.other_s
            rank.step_seconds_sum += step.step_s
            bucket = 0
            for bound in STEP_BUCKETS_S:
                if step.step_s <= bound:
                    break
                bucket += 1
            rank.bucket_counts[bucket] += 1
            self.received["step"] += 1

    def set_config(self, pid: int, config: dict[str, Any]) -> bool:
        with self._lock:
            session = self.sessions.get(pid)
            if session is None:
                return False
            rank = self.jobs[session.job].ranks.get(session.rank)
            if rank is not None:
                rank.config = config
            return True

    def session_for(self, pid: int) -> ProbeSession | None:
        return self.sessions.get(pid)

    def count_received(self, kind: str) -> None:
        with self._lock:
            self.received[kind] += 1

    def count_dropped(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.dropped[reason] += n

    def set_host(self, sample: HostSample) -> None:
        with self._lock:
            self.host = sample
            self.host_history.append(sample)

    def set_processes(self, samples: list[ProcessSample]) -> None:
        with self._lock:
            self.processes = {s.pid: s for s in samples}
            self.process_history.extend(samples)

    def set_gpus(self, samples: list[GpuSample], events: list[GpuEvent], field_errors: int) -> None:
        with self._lock:
            self.gpu_field_errors = field_errors
            self.gpus = samples
            self.gpu_history.extend(samples)
            for event in events:
                self.gpu_events.append(event)
                self.gpu_event_counts[(event.index if event.index is not None else -1, event.kind)] += 1

    def set_gpu_backend(self, available: bool, unavailable_reason: str | None) -> None:
        with self._lock:
            self.gpu_available = available
            self.gpu_unavailable_reason = unavailable_reason

    def set_recording_paused(self, reason: str | None) -> None:
        with self._lock:
            self.recording_paused_reason = reason

    def set_recording_rows_dropped(self, rows: int) -> None:
        with self._lock:
            self.recording_rows_dropped = rows

    def note_cycle(self, sampler: str, lag_s: float, duration_s: float, error: str | None) -> None:
        """One cycle of a sampler loop: its lateness, its duration and what it failed with."""
        with self._lock:
            health = self.health.setdefault(sampler, SamplerHealth())
            health.cycles_total += 1
            health.lag_s = lag_s
            health.last_duration_s = duration_s
            if error is not None:
                health.errors_total += 1
                health.last_error = error

    def set_verdict(self, job: str, verdict: Any) -> None:
        with self._lock:
            state = self.jobs.get(job)
            if state is not None:
                state.verdict = verdict

    def job_config(self, job: str) -> dict[str, Any] | None:
        """The configuration snapshot of the job's lowest rank that sent one."""
        with self._lock:
            state = self.jobs.get(job)
            if state is None:
                return None
            for rank in sorted(state.ranks):
                if state.ranks[rank].config is not None:
                    return state.ranks[rank].config
            return None

    def history(self, job: str) -> tuple[list[HostSample], list[ProcessSample]]:
        with self._lock:
            return list(self.host_history), [p for p in self.process_history if p.job == job]

    def gpu_window(self) -> list[GpuSample]:
        with self._lock:
            return list(self.gpu_history)

    def job_pids(self, job: str) -> set[int]:
        with self._lock:
            state = self.jobs.get(job)
            return {r.session.pid for r in state.ranks.values()} if state else set()

    def running_run_ids(self) -> list[str]:
        with self._lock:
            return [run.run_id for run in self.runs.values() if run.state == "running"]

    # ---- run lifecycle -----------------------------------------------------------------
    def end_run(self, run_id: str, exit_code: int | None, aborted: bool) -> RunState:
        with self._lock:
            run = self.runs.get(run_id)
            if run is None:
                run = self.runs[run_id] = RunState(run_id, run_id)
            if run.state == "running":
                run.final_state = "aborted" if aborted else "closed"
                run.state = "closing"
                run.exit_code = exit_code
                run.ended_unix_s = time.time()
            for job in self.jobs.values():
                if job.run_id == run_id:
                    for rank in job.ranks.values():
                        rank.alive = False
            return run

    def finish_run(self, run_id: str, recording_path: str | None) -> None:
        """The recording of the run is complete (or there is none)."""
        with self._lock:
            run = self.runs.get(run_id)
            if run is not None:
                run.state = run.final_state
                run.recording_path = recording_path

    def set_step_timing(self, session: ProbeSession, step: int, fields: dict[str, float | int]) -> bool:
        """Put late device timing into a step the rank's ring holds (the newest few, searched
        from the end); False when it holds no such step of that process."""
        with self._lock:
            job = self.jobs.get(session.job)
            rank = job.ranks.get(session.rank) if job else None
            if rank is None:
                return False
            steps = rank.steps
            for index in range(len(steps) - 1, max(-1, len(steps) - 1 - LATE_TIMING_SEARCH), -1):
                record = steps[index]
                if record.step == step and record.pid == session.pid:
                    rank.phase_seconds_total["comm_s"] += float(fields["comm_s"]) - record.comm_s
                    added = {**fields, "flags": record.flags | int(fields["flags"])}
                    steps[index] = dataclasses.replace(record, **added)  # type: ignore[arg-type]
                    return True
            return False

    def mark_process_exited(self, pid: int, clean: bool = False) -> None:
        """A training process is gone; ``clean`` when it said goodbye at interpreter exit."""
        with self._lock:
            session = self.sessions.get(pid)
            if session is None:
                return
            job = self.jobs.get(session.job)
            rank = job.ranks.get(session.rank) if job else None
            if rank is not None and pid in rank.live_pids | {rank.session.pid}:
                rank.live_pids.discard(pid)
                rank.alive = bool(rank.live_pids)
                rank.clean_exit = rank.clean_exit or clean

    # ---- readers -----------------------------------------------------------------------
    def ring(self, job: str) -> dict[int, list[StepRecord]]:
        """Every step each rank's ring holds: a copy analysis can use unlocked. Analysis picks
        its window from it (``analysis.diagnosis.select_window``), as the replay does from a recording."""
        with self._lock:
            state = self.jobs.get(job)
            if state is None:
                return {}
            return {rank: list(r.steps) for rank, r in state.ranks.items()}

    def run_of(self, job: str) -> str | None:
        with self._lock:
            state = self.jobs.get(job)
            return state.run_id if state else None

    def job_names(self) -> list[str]:
        with self._lock:
            return list(self.jobs)

    def training_pids(self) -> dict[int, ProbeSession]:
        with self._lock:
            return {r.session.pid: r.session for job in self.jobs.values() for r in job.ranks.values() if r.alive}

    def message_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Copies of the messages received by kind and dropped by reason."""
        with self._lock:
            return dict(self.received), dict(self.dropped)

    def orphaned_runs(self, announced: Collection[str], now_unix_s: float, grace_s: float) -> list[tuple[str, bool]]:
        """Running runs whose processes are all gone for ``grace_s`` without a run_end, and
        whether all of them exited cleanly; ``announced`` runs are left to their `profilerd run`."""
        with self._lock:
            orphans = []
            for job in self.jobs.values():
                run = self.runs.get(job.run_id)
                if run is None or run.state != "running" or not job.ranks or job.run_id in announced:
                    continue
                if any(r.alive for r in job.ranks.values()):
                    continue
                last = max((r.last_step_unix_s for r in job.ranks.values()), default=0.0)
                if now_unix_s - max(last, job.first_seen_unix_s) > grace_s:
                    orphans.append((job.run_id, all(r.clean_exit for r in job.ranks.values())))
            return orphans

    def read(self, copy: Callable[[Store], T]) -> T:
        """``copy(self)`` with the lock held, for a reader that needs several parts consistent
        with each other: ``copy`` must only copy (no I/O, no other lock), and the caller
        builds its answer from the copies after the lock is released."""
        with self._lock:
            return copy(self)


def _shares_rank(rank: RankState, pid: int) -> bool:
    """Whether a hello from ``pid`` joins the rank's live processes rather than replacing them:
    true while one of them still runs (two processes with one rank at once), false for a
    restart (the previous process is gone, or said goodbye)."""
    if pid in rank.live_pids:
        return True
    return rank.alive and any(_process_exists(other) for other in rank.live_pids)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: it exists
    except OSError:
        return False
    return True
