"""Live analysis: on every tick, a verdict per job from its recent window and its history.

It reads the store and returns the verdicts; ``profilerd.samplers.analysis`` runs it and hands
them to the fan-out, which writes the store and the recording.
"""

from __future__ import annotations

from collections.abc import Iterable

from profilerd.analysis.context import gpu_frame, host_frame, process_frame
from profilerd.analysis.diagnosis import Observation, diagnose
from profilerd.analysis.features import steps_frame
from profilerd.analysis.history import LossHistory
from profilerd.analysis.rules import RuleSet
from profilerd.analysis.verdict import Verdict, VerdictTracker
from profilerd.model import StepRecord
from profilerd.store import Store


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
        hosts, processes = store.history(job)
        observation = Observation.window(
            steps_frame(records),
            now_unix_s,
            store.window_s,
            store.window_steps,
            self.ruleset,
            losses=history.losses.summary(),
            config=store.job_config(job),
            hosts=host_frame(hosts),
            processes=process_frame(processes),
            gpus=gpu_frame(store.gpu_window(), store.job_pids(job)),
        )
        return diagnose(observation, self.ruleset)

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
