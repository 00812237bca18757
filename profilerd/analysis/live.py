"""The live analysis loop: every tick, a verdict per job from its recent window."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict

from profilerd.analysis.context import build_context, gpu_frame, host_frame, process_frame
from profilerd.analysis.features import compute_features, steps_frame
from profilerd.analysis.rules import RuleSet
from profilerd.analysis.verdict import Verdict, VerdictTracker, evaluate
from profilerd.recording import Recorder
from profilerd.store import Store

RECORD_EVERY_S = 10.0  # a verdict is recorded when it changes, and at least this often


class LiveAnalyzer:
    def __init__(self, store: Store, ruleset: RuleSet, recorder: Recorder | None) -> None:
        self.store = store
        self.ruleset = ruleset
        self.recorder = recorder
        self._trackers: dict[str, VerdictTracker] = {}
        self._recorded: dict[str, tuple[str, str, float]] = {}

    def analyse(self, job: str, now_unix_s: float) -> Verdict:
        window = self.store.window(job, now_unix_s)
        frame = steps_frame(step for steps in window.values() for step in steps)
        since = float((frame["end_unix_s"] - frame["step_s"]).min()) if not frame.empty else now_unix_s
        hosts, processes = self.store.history(job)
        gpus = gpu_frame((asdict(s) for s in self.store.gpu_window()), self.store.job_pids(job))
        context = build_context(self.store.job_config(job), host_frame(hosts), process_frame(processes), since, gpus)
        return evaluate(compute_features(frame, context, self.ruleset.warmup_steps), self.ruleset)

    def tick(self, now_unix_s: float, jobs: Iterable[str] | None = None) -> None:
        """Update the verdict of ``jobs`` (default: every job), and forget jobs that are gone."""
        live_jobs = set(self.store.job_names())
        for job in list(self._trackers):
            if job not in live_jobs:
                del self._trackers[job]
        for job in live_jobs if jobs is None else live_jobs.intersection(jobs):
            tracker = self._trackers.setdefault(job, VerdictTracker(self.ruleset.hysteresis_evaluations))
            verdict = tracker.update(self.analyse(job, now_unix_s))
            self.store.set_verdict(job, verdict)
            self._maybe_record(job, verdict)

    def _maybe_record(self, job: str, verdict: Verdict) -> None:
        if self.recorder is None or verdict.primary == "none":
            return
        with self.store.lock:
            state = self.store.jobs.get(job)
            run_id = state.run_id if state else None
        if run_id is None:
            return
        last = self._recorded.get(job)
        now = time.monotonic()
        if last and last[0] == verdict.primary and last[1] == verdict.severity and now - last[2] < RECORD_EVERY_S:
            return
        self._recorded[job] = (verdict.primary, verdict.severity, now)
        document = verdict.to_json(run_id, job)
        self.recorder.add(
            run_id,
            "verdicts",
            (verdict.evaluated_unix_s, job, verdict.primary, verdict.severity, json.dumps(document)),
        )
