"""The one diagnosis entry point: what was observed of a job in, its verdict out.

Every path that shows a verdict builds an :class:`Observation` and calls :func:`diagnose`: the
daemon's live analysis and a replay over the window the live analysis uses (:meth:`Observation.window`),
`report`, `run --json` and `diff` over a whole recording (``recordings.analyse``), and `attach` over what
it can see of a process without probes (stack samples, thread CPU). The verdict document is
built once, by ``Verdict.to_json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from profilerd.analysis.context import GPU_COLUMNS, HOST_COLUMNS, PROCESS_COLUMNS, build_context
from profilerd.analysis.features import (
    STEP_COLUMNS,
    Context,
    Features,
    compute_features,
)
from profilerd.analysis.history import LossSummary
from profilerd.analysis.rules import RuleSet
from profilerd.analysis.verdict import Verdict, evaluate
from profilerd.model import Finding
from profilerd.vocabulary import Fraction, Phase, fractions_from_phases

# A live window aims at this many steps per rank (it reacts within that many steps when the
# cause of a bottleneck goes away); faster jobs get more, so that it still spans min_seconds.
WINDOW_TARGET_STEPS = 500


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(columns=columns)


@dataclass(frozen=True)
class SampledPhases:
    """What `attach` sees of a process without probes: no step boundaries, only shares of time.

    ``phases`` are counts (or shares) of training-thread stack samples per step phase (L1);
    ``fractions`` alone, without ``phases``, are the rough shares the thread-CPU estimate gives
    (L0), which also brings its own ``estimate`` finding in place of the rules' evidence.
    """

    seconds: float
    samples: int = 0
    phases: Mapping[str, float] | None = None
    fractions: Mapping[str, float] | None = None
    estimate: Finding | None = None


@dataclass(frozen=True)
class Observation:
    """Everything a verdict rests on: steps, host and process samples, configuration, GPUs.

    Frames have the columns the recording and the daemon share (``STEP_COLUMNS``,
    ``HOST_COLUMNS``, ``PROCESS_COLUMNS``, ``context.GPU_COLUMNS``). Samples taken before
    ``since_unix_s`` are not part of the evidence; ``losses`` is the run-wide loss evidence when
    ``steps`` is only a window of the run (without it, it comes from ``steps`` themselves).
    """

    steps: pd.DataFrame = field(default_factory=lambda: _empty(STEP_COLUMNS))
    config: dict[str, Any] | None = None
    hosts: pd.DataFrame = field(default_factory=lambda: _empty(HOST_COLUMNS))
    processes: pd.DataFrame = field(default_factory=lambda: _empty(PROCESS_COLUMNS))
    gpus: pd.DataFrame = field(default_factory=lambda: _empty(GPU_COLUMNS))
    since_unix_s: float | None = None
    losses: LossSummary | None = None
    sampled: SampledPhases | None = None  # `attach` without probes: shares of time, not steps

    @classmethod
    def window(
        cls,
        steps: pd.DataFrame,
        at_unix_s: float,
        window_s: float,
        window_steps: int,
        ruleset: RuleSet,
        *,
        losses: LossSummary,
        config: dict[str, Any] | None = None,
        hosts: pd.DataFrame | None = None,
        processes: pd.DataFrame | None = None,
        gpus: pd.DataFrame | None = None,
    ) -> Observation:
        """What the live verdict at ``at_unix_s`` rests on: the window of steps that
        :func:`select_window` picks, and the samples taken over it (none after ``at_unix_s``)."""
        frame = select_window(steps, at_unix_s, window_s, window_steps, ruleset)
        since = float((frame["end_unix_s"] - frame["step_s"]).min()) if not frame.empty else at_unix_s

        def until(samples: pd.DataFrame | None, columns: list[str]) -> pd.DataFrame:
            if samples is None:
                return _empty(columns)
            return samples[samples["ts_unix_s"] <= at_unix_s] if not samples.empty else samples

        return cls(
            steps=frame,
            config=config,
            hosts=until(hosts, HOST_COLUMNS),
            processes=until(processes, PROCESS_COLUMNS),
            gpus=until(gpus, GPU_COLUMNS),
            since_unix_s=since,
            losses=losses,
        )

    @classmethod
    def whole_run(
        cls,
        steps: pd.DataFrame,
        *,
        config: dict[str, Any] | None = None,
        hosts: pd.DataFrame | None = None,
        processes: pd.DataFrame | None = None,
        gpus: pd.DataFrame | None = None,
    ) -> Observation:
        """Every recorded step, and the samples taken since the first of them began."""
        since = float((steps["end_unix_s"] - steps["step_s"]).min()) if not steps.empty else None
        return cls(
            steps=steps,
            config=config,
            hosts=hosts if hosts is not None else _empty(HOST_COLUMNS),
            processes=processes if processes is not None else _empty(PROCESS_COLUMNS),
            gpus=gpus if gpus is not None else _empty(GPU_COLUMNS),
            since_unix_s=since,
        )

    def context(self) -> Context:
        return build_context(self.config, self.hosts, self.processes, self.since_unix_s, self.gpus)


def diagnose(observation: Observation, ruleset: RuleSet) -> Verdict:
    """The verdict over one observation: a live window, a whole recording, or an attach."""
    context = observation.context()
    sampled = observation.sampled
    if sampled is None:
        features = compute_features(observation.steps, context, ruleset.warmup_steps, observation.losses)
        return evaluate(features, ruleset)
    estimates = (sampled.estimate,) if sampled.estimate is not None else ()
    return evaluate(sampled_features(sampled, context), ruleset, estimates)


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


def sampled_features(sampled: SampledPhases, context: Context) -> Features:
    """Shares of sampled time as step-phase features; ``steps`` counts the samples (there are no
    step boundaries to count), and step times stay zero rather than mix samples with steps."""
    if sampled.phases is not None:
        total = sum(sampled.phases.values()) or 1.0
        phases = {str(key): float(sampled.phases.get(key, 0.0)) / total for key in Phase}
        fractions = fractions_from_phases(phases)
    else:
        fractions = {str(key): float((sampled.fractions or {}).get(key, 0.0)) for key in Fraction}
        phases = {}  # thread CPU does not tell forward from backward
    return Features(
        steps=sampled.samples,
        ranks=1,
        duration_s=sampled.seconds,
        fractions=fractions,
        phase_fractions=phases,
        step_time_p50_s=0.0,
        step_time_p95_s=0.0,
        step_time_mean_s=0.0,
        steps_per_s=0.0,
        data_wait_spike_fraction=0.0,
        per_rank=pd.DataFrame(),
        context=context,
    )
