"""The whole-run verdict of a recording: the one diagnosis over every recorded step, with the
recording's time series and data quality (what `report`, `run --json`, `diff` and replay show)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from profilerd.analysis.diagnosis import Observation, diagnose
from profilerd.analysis.rules import RuleSet
from profilerd.analysis.verdict import Verdict
from profilerd.recordings import timeline
from profilerd.recordings.reader import Recording, gpu_samples


@dataclass(frozen=True)
class RunVerdict(Verdict):
    """A whole-run verdict, with the time-series and data-quality summaries of the recording.

    ``to_json`` adds them to the verdict document, so `run --json` and `report --format json`
    (which both analyse through :func:`analyse`) write the same extended document.
    """

    timeseries: dict[str, Any] = field(default_factory=dict)
    data_quality: dict[str, Any] = field(default_factory=dict)

    def to_json(self, run_id: str, job: str | None = None, **extra: Any) -> dict[str, Any]:
        return super().to_json(run_id, job, timeseries=self.timeseries, data_quality=self.data_quality, **extra)


def analyse(recording: Recording, ruleset: RuleSet) -> RunVerdict:
    """The whole-run verdict: every recorded step after warm-up, one evaluation; the loss
    evidence from every step, warm-up included (a loss that is NaN from step 1 counts)."""
    steps = recording.steps
    observation = Observation.whole_run(
        steps,
        config=recording.config(),
        hosts=recording.hosts,
        processes=recording.processes,
        gpus=gpu_samples(recording),
    )
    verdict = diagnose(observation, ruleset)
    # Stamp it with the last recorded step, so the same recording always gives the same JSON.
    last = float(steps["end_unix_s"].max()) if not steps.empty else 0.0
    base = {f.name: getattr(verdict, f.name) for f in fields(Verdict)}
    return RunVerdict(
        **{**base, "evaluated_unix_s": last},
        timeseries=timeline.summaries(recording, ruleset.warmup_steps),
        data_quality=timeline.data_quality(recording),
    )
