"""Features of a window of steps: pure, vectorised functions over tidy pandas frames.

A step frame has one row per step and rank, durations in seconds (columns in STEP_COLUMNS).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from profilerd.model import StepRecord

STEP_COLUMNS = [
    "end_unix_s",
    "rank",
    "pid",
    "step",
    "step_s",
    "data_wait_s",
    "forward_s",
    "backward_s",
    "optimizer_s",
    "comm_s",
    "flags",
]
FRACTION_KEYS = ("data_wait", "compute", "communication", "other")
PHASE_KEYS = ("data_wait", "forward", "backward", "optimizer", "communication", "other")


def steps_frame(records: Iterable[StepRecord]) -> pd.DataFrame:
    rows = [
        (
            s.end_unix_s,
            s.rank,
            s.pid,
            s.step,
            s.step_s,
            s.data_wait_s,
            s.forward_s,
            s.backward_s,
            s.optimizer_s,
            s.comm_s,
            s.flags,
        )
        for s in records
    ]
    return pd.DataFrame(rows, columns=STEP_COLUMNS)


def with_phases(steps: pd.DataFrame) -> pd.DataFrame:
    """Add compute_s and other_s; other is what the probes did not attribute, never negative."""
    frame = steps.copy()
    frame["compute_s"] = frame["forward_s"] + frame["backward_s"] + frame["optimizer_s"]
    measured = frame["data_wait_s"] + frame["compute_s"] + frame["comm_s"]
    frame["other_s"] = (frame["step_s"] - measured).clip(lower=0.0)
    return frame


@dataclass(frozen=True)
class Context:
    """What is known besides the steps: configuration and what the samplers saw."""

    config: dict[str, Any] | None = None
    cpu_count: int | None = None
    host_busy_cores: float | None = None  # mean cores busy on the host
    trainer_cpu_cores: float | None = None  # mean cores used by the training process(es)
    workers_cpu_cores: float | None = None  # mean cores used by all DataLoader workers
    worker_cpu_max_ratio: float | None = None  # the busiest worker, 1.0 = one full core
    workers_seen: int | None = None
    gpu_utilization_ratio: float | None = None

    @property
    def free_cores(self) -> float | None:
        if self.cpu_count is None or self.host_busy_cores is None:
            return None
        return max(0.0, self.cpu_count - self.host_busy_cores)

    def dataloader(self) -> dict[str, Any]:
        return (self.config or {}).get("dataloader") or {}

    def models(self) -> list[dict[str, Any]]:
        return list((self.config or {}).get("models") or [])

    def optimizers(self) -> list[dict[str, Any]]:
        return list((self.config or {}).get("optimizers") or [])


@dataclass(frozen=True)
class Features:
    steps: int
    ranks: int
    duration_s: float
    fractions: dict[str, float]  # data_wait, compute, communication, other: sums to 1
    phase_fractions: dict[str, float]  # the compute part split into forward/backward/optimizer
    step_time_p50_s: float
    step_time_p95_s: float
    step_time_mean_s: float
    steps_per_s: float
    data_wait_spike_fraction: float  # share of step time in data-wait spikes (epoch starts)
    per_rank: pd.DataFrame
    context: Context = field(default_factory=Context)


def empty_features(context: Context | None = None) -> Features:
    zero = dict.fromkeys(FRACTION_KEYS, 0.0)
    return Features(
        0,
        0,
        0.0,
        zero,
        dict.fromkeys(PHASE_KEYS, 0.0),
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        pd.DataFrame(),
        context or Context(),
    )


def compute_features(steps: pd.DataFrame, context: Context, warmup_steps: int = 2) -> Features:
    """Fractions of step time and step-time statistics, after dropping each rank's warm-up."""
    usable = steps[steps["step"] > warmup_steps]
    if usable.empty:
        return empty_features(context)
    frame = with_phases(usable)
    total = float(frame["step_s"].sum())
    if total <= 0:
        return empty_features(context)
    sums = frame[["data_wait_s", "compute_s", "comm_s", "other_s", "forward_s", "backward_s", "optimizer_s"]].sum()
    # Normalise by the attributed sum so the four fractions add up to exactly 1 even when the
    # probes' phases overlap a little (nested timers, clock granularity).
    attributed = float(sums["data_wait_s"] + sums["compute_s"] + sums["comm_s"] + sums["other_s"])
    scale = attributed if attributed > 0 else total
    fractions = {
        "data_wait": float(sums["data_wait_s"]) / scale,
        "compute": float(sums["compute_s"]) / scale,
        "communication": float(sums["comm_s"]) / scale,
        "other": float(sums["other_s"]) / scale,
    }
    phases = {
        "data_wait": fractions["data_wait"],
        "forward": float(sums["forward_s"]) / scale,
        "backward": float(sums["backward_s"]) / scale,
        "optimizer": float(sums["optimizer_s"]) / scale,
        "communication": fractions["communication"],
        "other": fractions["other"],
    }
    span = float(frame["end_unix_s"].max() - (frame["end_unix_s"] - frame["step_s"]).min())
    ranks = int(frame["rank"].nunique())
    median_wait = float(frame["data_wait_s"].median())
    spikes = frame["data_wait_s"] > max(10 * median_wait, 0.05)
    spike_fraction = float(frame.loc[spikes, "data_wait_s"].sum()) / scale
    step_times = frame["step_s"].to_numpy()
    return Features(
        steps=len(frame),
        ranks=ranks,
        duration_s=span,
        fractions=fractions,
        phase_fractions=phases,
        step_time_p50_s=float(np.percentile(step_times, 50)),
        step_time_p95_s=float(np.percentile(step_times, 95)),
        step_time_mean_s=float(step_times.mean()),
        steps_per_s=len(frame) / ranks / span if span > 0 else 0.0,
        data_wait_spike_fraction=spike_fraction,
        per_rank=per_rank_summary(frame),
        context=context,
    )


def per_rank_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per rank: steps, step-time percentiles and phase fractions."""
    grouped = frame.groupby("rank")
    summary = grouped.agg(
        steps=("step_s", "size"),
        step_time_p50_s=("step_s", "median"),
        step_time_p95_s=("step_s", lambda s: float(np.percentile(s, 95))),
        step_s_total=("step_s", "sum"),
        data_wait_s_total=("data_wait_s", "sum"),
        compute_s_total=("compute_s", "sum"),
        comm_s_total=("comm_s", "sum"),
        other_s_total=("other_s", "sum"),
    )
    for name, column in (
        ("data_wait", "data_wait_s_total"),
        ("compute", "compute_s_total"),
        ("communication", "comm_s_total"),
        ("other", "other_s_total"),
    ):
        summary[f"{name}_fraction"] = summary[column] / summary["step_s_total"]
    return summary.reset_index()
