"""Time series, per-rank and data-quality analyses of a recording, for reports and diffs.

Pure functions over the frames of :class:`profilerd.recordings.reader.Recording`: vectorised (numpy
``bincount`` and pandas ``groupby``, never a row-wise ``apply``), units in column names, time
as seconds since the start of the analysed window. Nothing here draws or prints: the report
renderers turn these frames into documents.

The analysed window is the one the verdict uses: every rank's steps after its warm-up. Host
and GPU samples are clipped to it, so every timeline of a report shares one time axis.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from profilerd.recordings.reader import Recording
from profilerd.vocabulary import SLOWING_REASONS, Phase

PHASE_COLUMNS = tuple(phase.column for phase in Phase)
_NICE_BUCKETS_S = (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)
GAP_MIN_S = 0.5  # uncovered time shorter than this is never called a gap
GAP_STEP_MULTIPLE = 5.0  # ... nor shorter than this many median steps
SAMPLER_GAP_MULTIPLE = 2.5  # a sampler interval this many times its median is a gap


@dataclass(frozen=True)
class Window:
    """The analysed time span, cut into equal buckets."""

    start_unix_s: float
    end_unix_s: float
    bucket_s: float
    buckets: int

    @property
    def span_s(self) -> float:
        return self.end_unix_s - self.start_unix_s

    def bucket_of(self, ts_unix_s: np.ndarray) -> np.ndarray:
        index = np.floor((ts_unix_s - self.start_unix_s) / self.bucket_s)
        return np.clip(index, 0, self.buckets - 1).astype(np.int64)

    def inside(self, ts_unix_s: np.ndarray) -> np.ndarray:
        return (ts_unix_s >= self.start_unix_s) & (ts_unix_s <= self.end_unix_s)

    def starts_s(self) -> np.ndarray:
        return np.arange(self.buckets) * self.bucket_s


def nice_bucket_s(span_s: float, max_buckets: int) -> float:
    """The smallest round bucket width that cuts ``span_s`` into at most ``max_buckets``."""
    raw = span_s / max(1, max_buckets)
    for width in _NICE_BUCKETS_S:
        if width >= raw:
            return float(width)
    return float(math.ceil(raw / 3600) * 3600)


def _usable(steps: pd.DataFrame, warmup_steps: int) -> np.ndarray:
    return steps["step"].to_numpy() > warmup_steps


def make_window(steps: pd.DataFrame, warmup_steps: int, max_buckets: int) -> Window | None:
    """The window of the steps after warm-up, in at most ``max_buckets`` buckets of at least three
    median steps each; None without any steps."""
    mask = _usable(steps, warmup_steps)
    if not mask.any():
        return None
    end = steps["end_unix_s"].to_numpy()[mask]
    durations = steps["step_s"].to_numpy()[mask]
    start = float((end - durations).min())
    stop = float(end.max())
    span = max(stop - start, 1e-3)
    # A bucket holds a few steps at least: narrower ones alternate between one step and none,
    # and a chart of them is a comb rather than a breakdown.
    width = nice_bucket_s(max(span, 3 * float(np.median(durations)) * max_buckets), max_buckets)
    return Window(start, stop, width, max(1, math.ceil(span / width)))


def phase_seconds(steps: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per-step seconds of the six phases; 'other' is what the probes did not attribute."""
    columns = {name: steps[name].to_numpy(dtype=np.float64) for name in PHASE_COLUMNS[:-1]}
    measured = sum(columns.values())
    columns["other_s"] = np.clip(steps["step_s"].to_numpy(dtype=np.float64) - measured, 0.0, None)
    return columns


def phase_timeline(steps: pd.DataFrame, window: Window, warmup_steps: int) -> pd.DataFrame:
    """Per bucket: steps completed, mean step time and mean seconds per step in each phase.

    A bucket without steps has NaN means (a gap, drawn as one). ``steps_per_s`` is per rank.
    """
    mask = _usable(steps, warmup_steps)
    usable = steps[mask]
    index = window.bucket_of(usable["end_unix_s"].to_numpy())
    counts = np.bincount(index, minlength=window.buckets).astype(np.float64)
    ranks = max(1, int(usable["rank"].nunique()))
    with np.errstate(invalid="ignore", divide="ignore"):
        frame = {
            "start_s": window.starts_s(),
            "steps": counts.astype(np.int64),
            "steps_per_s": counts / window.bucket_s / ranks,
            "step_s_mean": np.bincount(index, weights=usable["step_s"].to_numpy(), minlength=window.buckets) / counts,
        }
        for name, values in phase_seconds(usable).items():
            frame[name] = np.bincount(index, weights=values, minlength=window.buckets) / counts
    return pd.DataFrame(frame)


def step_histogram(steps: pd.DataFrame, warmup_steps: int, bins: int = 60) -> pd.DataFrame:
    """Step-time counts in equal bins between the 0.5th and 99.5th percentiles.

    The few steps outside (a checkpoint, the first step of an epoch) are counted in the edge
    bins so one 3-second step does not squash the rest of the distribution into one bar.
    """
    values = steps["step_s"].to_numpy()[_usable(steps, warmup_steps)]
    if values.size == 0:
        return pd.DataFrame({"left_s": [], "right_s": [], "steps": []})
    low, high = np.quantile(values, [0.005, 0.995])
    if high <= low:
        low, high = low * 0.9, low * 1.1 + 1e-6
    edges = np.linspace(low, high, bins + 1)
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    return pd.DataFrame({"left_s": edges[:-1], "right_s": edges[1:], "steps": counts})


def gpu_label(frame: pd.DataFrame) -> pd.Series:
    """'GPU 3' on one node, 'node-b:3' across several."""
    index = frame["gpu_index"].astype(np.int64).astype(str)
    if frame["node"].nunique() > 1:
        return frame["node"].astype(str) + ":" + index
    return "GPU " + index


def gpu_timeline(gpus: pd.DataFrame, window: Window) -> pd.DataFrame:
    """Per GPU and bucket: mean utilisation, memory, power (and their limits), temperature."""
    columns = [
        "utilization_gpu_ratio",
        "memory_used_bytes",
        "memory_total_bytes",
        "power_watts",
        "power_limit_watts",
        "temperature_celsius",
    ]
    if gpus.empty:
        return pd.DataFrame(columns=["gpu", "start_s", *columns])
    inside = gpus[window.inside(gpus["ts_unix_s"].to_numpy())]
    frame = inside[columns].astype(np.float64)
    frame = frame.assign(
        gpu=gpu_label(inside).to_numpy(),
        bucket=window.bucket_of(inside["ts_unix_s"].to_numpy()),
    )
    means = frame.groupby(["gpu", "bucket"], sort=True)[columns].mean().reset_index()
    means["start_s"] = means["bucket"] * window.bucket_s
    return means[["gpu", "start_s", *columns]]


def host_timeline(hosts: pd.DataFrame, window: Window) -> pd.DataFrame:
    """Per bucket: the host's mean CPU utilisation (all cores, 0-1)."""
    if hosts.empty:
        return pd.DataFrame(columns=["start_s", "cpu_ratio"])
    inside = hosts[window.inside(hosts["ts_unix_s"].to_numpy())]
    index = window.bucket_of(inside["ts_unix_s"].to_numpy())
    counts = np.bincount(index, minlength=window.buckets).astype(np.float64)
    sums = np.bincount(index, weights=inside["cpu_ratio"].fillna(0).to_numpy(), minlength=window.buckets)
    with np.errstate(invalid="ignore", divide="ignore"):
        frame = pd.DataFrame({"start_s": window.starts_s(), "cpu_ratio": sums / counts})
    return frame.dropna()


def _throttle_names(raw: pd.Series) -> pd.Series:
    """The slowing clock-event reasons of each sample, as 'sw_thermal, hw_slowdown' or ''.

    Each distinct JSON value is parsed once (a run has a handful), then mapped onto every row.
    """
    text = raw.fillna("[]").astype(str)
    names: dict[str, str] = {}
    for value in text.unique():
        try:
            reasons = json.loads(value)
        except ValueError:
            reasons = []
        slowing = [r for r in reasons if r in SLOWING_REASONS] if isinstance(reasons, list) else []
        names[value] = ", ".join(slowing)
    return text.map(names)


def throttle_intervals(gpus: pd.DataFrame, window: Window) -> pd.DataFrame:
    """Contiguous spans in which a GPU reported the same slowing reasons (thermal, power, ...)."""
    empty = pd.DataFrame(columns=["gpu", "reasons", "start_s", "end_s", "samples"])
    if gpus.empty:
        return empty
    inside = gpus[window.inside(gpus["ts_unix_s"].to_numpy())]
    frame = pd.DataFrame(
        {
            "gpu": gpu_label(inside).to_numpy(),
            "ts_unix_s": inside["ts_unix_s"].to_numpy(),
            "reasons": _throttle_names(inside["clock_event_reasons"]).to_numpy(),
        }
    ).sort_values(["gpu", "ts_unix_s"], kind="stable", ignore_index=True)
    if not (frame["reasons"] != "").any():
        return empty
    interval = _median_interval(frame["ts_unix_s"].to_numpy(), frame["gpu"].to_numpy())
    changed = (frame["reasons"] != frame["reasons"].shift()) | (frame["gpu"] != frame["gpu"].shift())
    frame["run"] = changed.cumsum()
    spans = frame.groupby("run").agg(
        gpu=("gpu", "first"),
        reasons=("reasons", "first"),
        first_unix_s=("ts_unix_s", "min"),
        last_unix_s=("ts_unix_s", "max"),
        samples=("ts_unix_s", "size"),
    )
    spans = spans[spans["reasons"] != ""]
    return pd.DataFrame(
        {
            "gpu": spans["gpu"].to_numpy(),
            "reasons": spans["reasons"].to_numpy(),
            "start_s": spans["first_unix_s"].to_numpy() - window.start_unix_s,
            "end_s": np.minimum(spans["last_unix_s"].to_numpy() + interval, window.end_unix_s) - window.start_unix_s,
            "samples": spans["samples"].to_numpy(),
        }
    ).reset_index(drop=True)


def _median_interval(ts: np.ndarray, groups: np.ndarray) -> float:
    """The typical sampling interval within groups (GPUs), from consecutive timestamps."""
    if ts.size < 2:
        return 1.0
    same = groups[1:] == groups[:-1]
    diffs = np.diff(ts)[same]
    diffs = diffs[diffs > 0]
    return float(np.median(diffs)) if diffs.size else 1.0


def _event_text(kind: str, detail: dict[str, Any]) -> str:
    if kind == "exit":
        return f"process {detail.get('pid', '?')} exited cleanly after {detail.get('steps', '?')} steps"
    text = detail.get("detail") or detail.get("message") or ""
    if text:
        return str(text)
    rest = {k: v for k, v in detail.items() if k not in ("pid", "kind", "gpu_index", "index")}
    return ", ".join(f"{k}={v}" for k, v in rest.items())


def event_table(events: pd.DataFrame, gpus: pd.DataFrame, window: Window | None) -> pd.DataFrame:
    """Recorded events (XID errors, lost GPUs, process exits, ...) and lost-GPU samples, in time order.

    ``t_s`` is relative to the window and may fall outside it (an event after the last step).
    """
    start = window.start_unix_s if window else 0.0
    rows: list[dict[str, Any]] = []
    for ts, kind, raw, node in events[["ts_unix_s", "kind", "detail", "node"]].itertuples(index=False, name=None):
        try:
            detail = json.loads(raw) if isinstance(raw, str) else {}
        except ValueError:
            detail = {"detail": str(raw)}
        detail = detail if isinstance(detail, dict) else {"detail": str(detail)}
        gpu = detail.get("gpu_index", detail.get("index"))
        rows.append(
            {
                "t_s": float(ts) - start,
                "node": node or "",
                "kind": str(kind),
                "gpu": None if gpu is None else int(gpu),
                "text": _event_text(str(kind), detail),
            }
        )
    if not gpus.empty and (gpus["lost"] == 1).any():
        # Lost GPUs from the samples, for recordings made before the daemon recorded the event
        # itself (or where it could not): one row per GPU, unless the event is there already.
        recorded = {(row["node"], row["gpu"]) for row in rows if row["kind"] == "lost"}
        lost = gpus[gpus["lost"] == 1]
        first = lost.groupby(["node", "gpu_index"], sort=True)["ts_unix_s"].min().reset_index()
        for node, index, ts in first.itertuples(index=False, name=None):
            if (node or "", int(index)) in recorded:
                continue
            rows.append(
                {"t_s": float(ts) - start, "node": node or "", "kind": "lost", "gpu": int(index), "text": "GPU lost"}
            )
    frame = pd.DataFrame(rows, columns=["t_s", "node", "kind", "gpu", "text"])
    return frame.sort_values("t_s", kind="stable", ignore_index=True)


def rank_breakdown(steps: pd.DataFrame, sessions: pd.DataFrame, warmup_steps: int) -> pd.DataFrame:
    """Per rank: node, steps, median step, and mean seconds per step in each phase and own work.

    'Own work' is the step minus communication: in synchronous training the slowest rank's
    own work sets everyone's pace, and the others show the difference as communication wait.
    """
    usable = steps[_usable(steps, warmup_steps)]
    if usable.empty:
        return pd.DataFrame(columns=["rank", "node", "steps", "step_time_p50_s", "step_s_mean", *PHASE_COLUMNS])
    phases = pd.DataFrame(phase_seconds(usable))
    phases["rank"] = usable["rank"].to_numpy()
    phases["step_s"] = usable["step_s"].to_numpy()
    grouped = phases.groupby("rank", sort=True)
    frame = grouped[[*PHASE_COLUMNS]].mean()
    frame["steps"] = grouped.size()
    frame["step_s_mean"] = grouped["step_s"].mean()
    frame["step_time_p50_s"] = grouped["step_s"].median()
    frame["own_s"] = frame["step_s_mean"] - frame["comm_s"]
    frame = frame.reset_index()
    nodes = {}
    if not sessions.empty:
        known = sessions.dropna(subset=["rank"])
        nodes = dict(zip(known["rank"].astype(int), known["hostname"].fillna("").astype(str), strict=False))
    frame["node"] = [nodes.get(int(rank), "") for rank in frame["rank"]]  # one row per rank
    return frame[["rank", "node", "steps", "step_time_p50_s", "step_s_mean", *PHASE_COLUMNS, "own_s"]]


# ---- JSON summaries --------------------------------------------------------------------------------
def _round(value: float) -> float | None:
    if value is None or not np.isfinite(value):
        return None
    return float(f"{value:.6g}")


def _series(values: np.ndarray) -> dict[str, Any]:
    """A coarse series and its shape: min, mean, max over the buckets, and the ratio of the medians
    of the last and first quarters (robust to one checkpoint bucket)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    summary: dict[str, Any] = {"values": [_round(v) for v in values]}
    if finite.size == 0:
        return summary | {"min": None, "mean": None, "max": None, "trend_ratio": None}
    quarter = max(1, finite.size // 4)
    first, last = float(np.median(finite[:quarter])), float(np.median(finite[-quarter:]))
    return summary | {
        "min": _round(float(finite.min())),
        "mean": _round(float(finite.mean())),
        "max": _round(float(finite.max())),
        "trend_ratio": _round(last / first) if first else None,
    }


def summaries(recording: Recording, warmup_steps: int, max_buckets: int = 48) -> dict[str, Any]:
    """Coarse time series of the run for the JSON document (``timeseries``).

    Each series is the per-bucket value (steps and phase shares: means over the steps that
    ended in the bucket; GPU utilisation: mean over GPUs; memory: the fullest GPU; power: sum
    over GPUs; host CPU: mean) with its min, mean and max over the buckets and ``trend_ratio``,
    the median of the last quarter of buckets over the first's (above 1: it got slower/higher).
    """
    window = make_window(recording.steps, warmup_steps, max_buckets)
    if window is None:
        return {"buckets": 0, "series": {}}
    phases = phase_timeline(recording.steps, window, warmup_steps)
    attributed = phases[list(PHASE_COLUMNS)].sum(axis=1).to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        compute = (phases["forward_s"] + phases["backward_s"] + phases["optimizer_s"]).to_numpy()
        series = {
            "step_time_s": _series(phases["step_s_mean"].to_numpy()),
            "steps_per_s": _series(phases["steps_per_s"].to_numpy()),
            "data_wait_ratio": _series(phases["data_wait_s"].to_numpy() / attributed),
            "compute_ratio": _series(compute / attributed),
            "communication_ratio": _series(phases["comm_s"].to_numpy() / attributed),
            "other_ratio": _series(phases["other_s"].to_numpy() / attributed),
        }
    gpus = recording.gpus
    if not gpus.empty:
        inside = gpus[window.inside(gpus["ts_unix_s"].to_numpy())]
        if not inside.empty:
            per = inside.assign(
                bucket=window.bucket_of(inside["ts_unix_s"].to_numpy()),
                gpu=inside["node"].astype(str) + ":" + inside["gpu_index"].astype(str),
            )
            cols = ["utilization_gpu_ratio", "memory_used_bytes", "power_watts"]
            per_gpu = per.groupby(["bucket", "gpu"])[cols].mean().groupby(level="bucket")
            buckets = pd.DataFrame(
                {
                    "utilization": per_gpu["utilization_gpu_ratio"].mean(),
                    "memory": per_gpu["memory_used_bytes"].max(),
                    "power": per_gpu["power_watts"].sum(min_count=1),
                }
            ).reindex(range(window.buckets))
            series["gpu_utilization_ratio"] = _series(buckets["utilization"].to_numpy())
            series["gpu_memory_used_bytes"] = _series(buckets["memory"].to_numpy())
            series["gpu_power_watts"] = _series(buckets["power"].to_numpy())
    host = host_timeline(recording.hosts, window)
    if not host.empty:
        values = host.set_index("start_s")["cpu_ratio"].reindex(window.starts_s()).to_numpy()
        series["host_cpu_ratio"] = _series(values)
    return {
        "start_unix_s": round(window.start_unix_s, 3),
        "bucket_s": window.bucket_s,
        "buckets": window.buckets,
        "series": series,
    }


# ---- data quality -----------------------------------------------------------------------------------
def missing_steps(steps: pd.DataFrame) -> int:
    """Step numbers never received, from gaps in each process's step sequence (lost messages)."""
    if steps.empty:
        return 0
    order = np.lexsort((steps["step"].to_numpy(), steps["pid"].to_numpy(), steps["rank"].to_numpy()))
    rank = steps["rank"].to_numpy()[order]
    pid = steps["pid"].to_numpy()[order]
    number = steps["step"].to_numpy()[order]
    same = (rank[1:] == rank[:-1]) & (pid[1:] == pid[:-1])
    jumps = np.diff(number)[same] - 1
    return int(jumps[jumps > 0].sum())


def coverage_gaps(steps: pd.DataFrame, threshold_s: float) -> pd.DataFrame:
    """Spans longer than ``threshold_s`` that no recorded step of a process covers.

    Consecutive steps of a process tile its time (a step lasts from the previous step's end to
    its own), so uncovered time means step records were lost or the process stalled outside
    any step.
    """
    columns = ["rank", "start_unix_s", "duration_s"]
    if steps.empty:
        return pd.DataFrame(columns=columns)
    order = np.lexsort((steps["end_unix_s"].to_numpy(), steps["pid"].to_numpy(), steps["rank"].to_numpy()))
    rank = steps["rank"].to_numpy()[order]
    pid = steps["pid"].to_numpy()[order]
    end = steps["end_unix_s"].to_numpy()[order]
    start = end - steps["step_s"].to_numpy()[order]
    same = (rank[1:] == rank[:-1]) & (pid[1:] == pid[:-1])
    uncovered = start[1:] - end[:-1]
    hit = same & (uncovered > threshold_s)
    return pd.DataFrame({"rank": rank[1:][hit], "start_unix_s": end[:-1][hit], "duration_s": uncovered[hit]})


def sampler_gaps(ts: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """Samples, their median interval, and intervals longer than SAMPLER_GAP_MULTIPLE of it."""
    if ts.size < 2:
        return {"samples": int(ts.size), "interval_s": None, "gaps": 0, "longest_gap_s": None}
    order = np.lexsort((ts, groups))
    ts, groups = ts[order], groups[order]
    same = groups[1:] == groups[:-1]
    diffs = np.diff(ts)[same]
    positive = diffs[diffs > 0]
    if positive.size == 0:
        return {"samples": int(ts.size), "interval_s": None, "gaps": 0, "longest_gap_s": None}
    interval = float(np.median(positive))
    long = diffs[diffs > SAMPLER_GAP_MULTIPLE * interval]
    return {
        "samples": int(ts.size),
        "interval_s": _round(interval),
        "gaps": int(long.size),
        "longest_gap_s": _round(float(long.max())) if long.size else None,
    }


def state_notes(recording: Recording) -> list[str]:
    """What a reader must know about how the recording ended."""
    notes = []
    steps = recording.steps
    last = ""
    if not steps.empty:
        first_start = float((steps["end_unix_s"] - steps["step_s"]).min())
        last = f" up to {float(steps['end_unix_s'].max()) - first_start:.1f} s after the first step"
    states = set(recording.state.split(","))
    if "running" in states:
        notes.append(
            "The recording was never closed: the run is still in progress, or it or the daemon was killed mid-way. "
            f"This report covers the {len(steps):,} step records written{last}."
        )
    if "aborted" in states:
        notes.append(
            "The training process ended without a clean exit (killed or crashed); "
            f"this report covers the {len(steps):,} step records written before it ended."
        )
    if steps.empty:
        notes.append("No training steps were recorded: there is no step-time evidence to report.")
    return notes


def data_quality(recording: Recording) -> dict[str, Any]:
    """How complete and trustworthy the recording is: state, lost steps, gaps, sampler and clock health."""
    steps = recording.steps
    median_step = float(np.median(steps["step_s"].to_numpy())) if not steps.empty else 0.0
    threshold = max(GAP_MIN_S, GAP_STEP_MULTIPLE * median_step)
    gaps = coverage_gaps(steps, threshold)
    first = float((steps["end_unix_s"] - steps["step_s"]).min()) if not steps.empty else 0.0
    largest = gaps.sort_values("duration_s", ascending=False, kind="stable").head(5)
    lost = missing_steps(steps)
    gpus = recording.gpus
    gpu_groups = (gpus["node"].astype(str) + ":" + gpus["gpu_index"].astype(str)).to_numpy() if not gpus.empty else []
    sources = recording.sources
    offsets = [abs(s.clock_offset_s) for s in sources]
    exit_code = recording.meta.get("exit_code")
    return {
        "state": recording.state,
        "complete": recording.state == "closed" and not recording.notes,
        "exit_code": int(exit_code)
        if exit_code not in (None, "", "None") and exit_code.lstrip("-").isdigit()
        else None,
        "notes": [*state_notes(recording), *recording.notes],
        "steps_recorded": len(steps),
        "missing_steps": lost,
        "missing_steps_ratio": _round(lost / (lost + len(steps))) if len(steps) else None,
        "gaps": {
            "threshold_s": _round(threshold),
            "count": len(gaps),
            "total_s": _round(float(gaps["duration_s"].sum())),
            "largest": [
                {"rank": int(rank), "start_s": _round(start - first), "duration_s": _round(duration)}
                for rank, start, duration in largest.itertuples(index=False, name=None)
            ],
        },
        "samplers": {
            "host": sampler_gaps(recording.hosts["ts_unix_s"].to_numpy(), np.zeros(len(recording.hosts))),
            "gpu": sampler_gaps(gpus["ts_unix_s"].to_numpy(), np.asarray(gpu_groups)),
        },
        "clock": {
            "nodes": len(sources),
            "aligned": len(sources) > 1,
            "max_abs_offset_s": _round(max(offsets)) if offsets else 0.0,
            "sources": [
                {
                    "run_id": s.run_id,
                    "hostname": s.hostname,
                    "ranks": list(s.ranks),
                    "offset_s": _round(s.clock_offset_s),
                    "residual_s": _round(s.clock_residual_s) if s.clock_residual_s is not None else None,
                }
                for s in sources
            ],
        },
    }


# ---- everything a report draws ------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportData:
    """The verdict document plus the frames the HTML and Markdown reports draw from."""

    document: dict[str, Any]
    window: Window | None
    phases: pd.DataFrame
    histogram: pd.DataFrame
    gpus: pd.DataFrame
    host: pd.DataFrame
    throttles: pd.DataFrame
    events: pd.DataFrame
    ranks: pd.DataFrame
    config: dict[str, Any] | None
    configs_by_rank: dict[int, dict[str, Any]]


def report_data(
    recording: Recording, document: dict[str, Any], warmup_steps: int, max_buckets: int = 240
) -> ReportData:
    """Frames for the report of a recording whose verdict document is ``document``."""
    window = make_window(recording.steps, warmup_steps, max_buckets)
    by_rank: dict[int, dict[str, Any]] = {}
    for config in recording.configs:
        by_rank[int(config.get("rank", 0))] = config
    empty = pd.DataFrame()
    if window is None:
        return ReportData(
            document,
            None,
            empty,
            empty,
            empty,
            empty,
            empty,
            event_table(recording.events, recording.gpus, None),
            empty,
            recording.config(),
            by_rank,
        )
    return ReportData(
        document=document,
        window=window,
        phases=phase_timeline(recording.steps, window, warmup_steps),
        histogram=step_histogram(recording.steps, warmup_steps),
        gpus=gpu_timeline(recording.gpus, window),
        host=host_timeline(recording.hosts, window),
        throttles=throttle_intervals(recording.gpus, window),
        events=event_table(recording.events, recording.gpus, window),
        ranks=rank_breakdown(recording.steps, recording.sessions, warmup_steps),
        config=recording.config(),
        configs_by_rank=by_rank,
    )


def changed_settings(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[tuple[str, Any, Any]]:
    """Flattened configuration keys whose values differ: [(dotted.key, before, after)]."""
    flat_a, flat_b = _flatten(before or {}), _flatten(after or {})
    ignored = ("pid", "sync_sites", "compiled_graphs")
    keys = sorted(set(flat_a) | set(flat_b))
    return [
        (key, flat_a.get(key), flat_b.get(key))
        for key in keys
        if flat_a.get(key) != flat_b.get(key) and not key.startswith(ignored)
    ]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}{key}."))
        return flat
    if isinstance(value, Sequence) and not isinstance(value, str):
        flat = {}
        for index, inner in enumerate(value):
            flat.update(_flatten(inner, f"{prefix}{index}."))
        return flat
    return {prefix.rstrip("."): value}
