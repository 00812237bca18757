"""Live analysis: on every tick, a verdict per job from its recent window and its history.

It reads the store and returns the verdicts; ``profilerd.samplers.analysis`` runs it and hands
them to the fan-out, which writes the store and the recording.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict

import pandas as pd

from profilerd.analysis.context import build_context, gpu_frame, host_frame, process_frame
from profilerd.analysis.features import steps_frame
from profilerd.analysis.history import LossHistory
from profilerd.analysis.rules import RuleSet
from profilerd.analysis.verdict import Verdict, VerdictTracker, diagnose
from profilerd.model import StepRecord
from profilerd.store import Store

# A window aims at this many steps per rank (it reacts within that many steps when the cause
# of a bottleneck goes away); faster jobs get more, so that it still spans min_seconds.
WINDOW_TARGET_STEPS = 500


def select_window(
    steps: pd.DataFrame, at_unix_s: float, window_s: float, window_steps: int, ruleset: RuleSet
) -> pd.DataFrame:
    """The steps a live verdict at ``at_unix_s`` rests on, the same for the daemon and a replay.

    Per rank, within the last ``window_s`` seconds and the daemon's ring (``window_steps``): the
    newest WINDOW_TARGET_STEPS steps, or all of the last ``min_seconds`` when that is more (a
    job at 200 steps/s gets 2000); and never fewer than a verdict needs (``min_steps`` after
    warm-up), however old, so a job at 10 s per step gets a verdict too.
    """
    done = steps[steps["end_unix_s"] <= at_unix_s]
    if done.empty:
        return done
    ring = done.groupby("rank", sort=False).tail(window_steps)
    age = ring.groupby("rank", sort=False).cumcount(ascending=False)  # 0 for each rank's newest
    end = ring["end_unix_s"]
    wanted = (age < WINDOW_TARGET_STEPS) | (end >= at_unix_s - ruleset.min_seconds)
    needed = age < ruleset.min_steps + ruleset.warmup_steps
    return ring[(wanted & (end >= at_unix_s - window_s)) | needed]


class LiveAnalyzer:
    def __init__(self, store: Store, ruleset: RuleSet) -> None:
        self.store = store
        self.ruleset = ruleset
        self._trackers: dict[str, VerdictTracker] = {}
        self._histories: dict[str, _JobHistory] = {}

    def analyse(self, job: str, now_unix_s: float) -> Verdict:
        ring = self.store.ring(job)
        records = [step for steps in ring.values() for step in steps]
        history = self._history(job)
        history.feed(records)
        store = self.store
        frame = select_window(steps_frame(records), now_unix_s, store.window_s, store.window_steps, self.ruleset)
        since = float((frame["end_unix_s"] - frame["step_s"]).min()) if not frame.empty else now_unix_s
        hosts, processes = self.store.history(job)
        gpus = gpu_frame((asdict(s) for s in self.store.gpu_window()), self.store.job_pids(job))
        context = build_context(self.store.job_config(job), host_frame(hosts), process_frame(processes), since, gpus)
        return diagnose(frame, context, self.ruleset, history.losses.summary())

    def _history(self, job: str) -> _JobHistory:
        run_id = self.store.run_of(job)
        history = self._histories.get(job)
        if history is None or history.run_id != run_id:
            history = self._histories[job] = _JobHistory(run_id)
        return history

    def tick(self, now_unix_s: float, jobs: Iterable[str] | None = None) -> dict[str, Verdict]:
        """The verdict of each of ``jobs`` (default: every job), and forget jobs that are gone."""
        live_jobs = set(self.store.job_names())
        for job in list(self._trackers):
            if job not in live_jobs:
                del self._trackers[job]
        for job in list(self._histories):
            if job not in live_jobs:
                del self._histories[job]
        verdicts = {}
        for job in live_jobs if jobs is None else live_jobs.intersection(jobs):
            tracker = self._trackers.setdefault(job, VerdictTracker(self.ruleset.hysteresis_evaluations))
            verdicts[job] = tracker.update(self.analyse(job, now_unix_s))
        return verdicts


class _JobHistory:
    """A job's run-wide loss evidence, fed every step once: the ring holds each step for many
    ticks (``window_steps`` is far more than a tick's steps), so none is missed or counted twice."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
        self.losses = LossHistory()
        self._fed: dict[tuple[int, int], int] = {}  # (rank, pid) -> last step fed

    def feed(self, records: list[StepRecord]) -> None:
        fresh = [s for s in records if s.step > self._fed.get((s.rank, s.pid), 0)]
        if not fresh:
            return
        for step in fresh:
            key = (step.rank, step.pid)
            self._fed[key] = max(self._fed.get(key, 0), step.step)
        self.losses.update(steps_frame(fresh))
