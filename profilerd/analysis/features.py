"""Features of a window of steps: pure, vectorised functions over tidy pandas frames.

A step frame has one row per step and rank, durations in seconds (columns in STEP_COLUMNS).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from profilerd.analysis.history import LossSummary, loss_readings, summarize_losses
from profilerd.analysis.peaks import Mfu, estimate_mfu
from profilerd.model import GpuContext, StepRecord
from profilerd.vocabulary import COMPUTE_PHASES, Fraction, Phase
from profilerd_probes import schema
from profilerd_probes.wire import (
    FLAG_GPU_BUSY_LOWER_BOUND,
    FLAG_GRAD_SCALER_SKIPPED,
    FLAG_HAS_GRAD_NORM,
    FLAG_HAS_LR,
    FLAG_HAS_SCALE,
)

# Device timing per step (CUDA events); NaN for a step without it (CPU, events not complete yet).
STEP_COLUMNS = list(schema.STEP_COLUMNS)


def steps_frame(records: Iterable[StepRecord]) -> pd.DataFrame:
    frame = pd.DataFrame([s.as_row() for s in records], columns=STEP_COLUMNS)
    frame[list(schema.GPU_TIMING_FIELDS)] = frame[list(schema.GPU_TIMING_FIELDS)].astype(float)  # None -> NaN
    return frame


def device_timed(steps: pd.DataFrame) -> pd.Series:
    """The steps that carry device timing (busy and idle time from CUDA events)."""
    if "gpu_busy_s" not in steps or "gpu_idle_s" not in steps:
        return pd.Series(False, index=steps.index)
    return steps["gpu_busy_s"].notna() & steps["gpu_idle_s"].notna()


def on_device(frame: pd.DataFrame) -> pd.DataFrame:
    """Phases of device-timed steps (a ``with_phases`` frame) re-cut by what the GPU did.

    On a GPU the host's phase timers measure when work was queued, so the step is split by the
    device's own clock instead: compute is the GPU busy, data wait is the GPU idle while the
    training thread waited for the batch (a wait the GPU spends on queued work costs nothing),
    communication is the exposed collective time (device time on NCCL), taken from the idle
    time, and other is the rest of the idle: the GPU waiting for the host to launch work.
    """
    out = frame.copy()
    idle = out["gpu_idle_s"] = frame["gpu_idle_s"].clip(lower=0.0)
    data = frame["gpu_idle_data_wait_s"].fillna(0.0).clip(lower=0.0)
    data = data.where(data <= idle, idle)
    out["data_wait_s"] = data
    # A step's device work can outlast its host span while a backlog drains; a share of the
    # step is at most all of it.
    out["compute_s"] = (
        frame["gpu_busy_s"].clip(lower=0.0).where(frame["gpu_busy_s"] <= frame["step_s"], frame["step_s"])
    )
    for phase in COMPUTE_PHASES:
        out[f"{phase}_s"] = frame[f"gpu_{phase}_s"].fillna(0.0).clip(lower=0.0)
    # Exposed communication is time the GPU waited for a collective: it lies within the idle
    # time left after the data wait (a host-timed collective also counts the device's drain).
    comm = frame["comm_s"].clip(lower=0.0)
    out["comm_s"] = comm.where(comm <= idle - data, idle - data)
    out["other_s"] = idle - data - out["comm_s"]
    return out


def with_phases(steps: pd.DataFrame) -> pd.DataFrame:
    """Add compute_s and other_s; other is what the probes did not attribute, never negative."""
    frame = steps.copy()
    frame["compute_s"] = frame["forward_s"] + frame["backward_s"] + frame["optimizer_s"]
    measured = frame["data_wait_s"] + frame["compute_s"] + frame["comm_s"]
    frame["other_s"] = (frame["step_s"] - measured).clip(lower=0.0)
    frame["own_s"] = frame["step_s"] - frame["comm_s"]  # a rank's own work, without waiting on others
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
    gpu: GpuContext = field(default_factory=GpuContext)
    # NVML means per training process on the GPU it uses (the rank-GPU attribution), by PID.
    gpu_by_pid: dict[int, dict[str, float]] = field(default_factory=dict)

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
class Signals:
    """Training-health signals of a window: loss, gradients, GradScaler, syncs, compiles, LR.

    What must not depend on the window (a non-finite or runaway loss) is in ``LossSummary``.
    """

    loss_samples: int = 0
    loss_recent: float | None = None  # median of the last half of the window's finite losses
    loss_relative_spread: float | None = None  # (max - min) / |median| over the last half
    grad_norm_samples: int = 0
    grad_norm_nonfinite: int = 0
    grad_norm_median: float | None = None
    grad_norm_max: float | None = None
    grad_norm_spike_ratio: float | None = None  # largest sample over the median of those before it
    scaler_skipped_steps: int = 0
    scaler_scale_min: float | None = None
    syncs_per_step: float = 0.0
    sync_fraction: float = 0.0
    new_graphs: int = 0  # torch.compile graphs produced during the window
    lr_start: float | None = None
    lr_end: float | None = None
    comm_ops_per_step: float = 0.0
    comm_bytes_per_step: float = 0.0

    @property
    def lr_constant(self) -> bool | None:
        if self.lr_start is None or self.lr_end is None:
            return None
        return self.lr_start == self.lr_end


@dataclass(frozen=True)
class DeviceTiming:
    """What the GPU did with the window's device-timed steps, as shares of their step time."""

    steps_timed: int
    steps: int  # usable steps in the window, timed or not
    busy_fraction: float
    phase_busy_fractions: dict[str, float]  # forward, backward, optimizer
    idle_fraction: float
    idle_data_wait_fraction: float  # the GPU idle while the training thread waited for the batch
    host_data_wait_fraction: float  # the training thread's own wait for batches, same steps
    host_ahead_s_p50: float | None  # how far the host ran ahead of the device at the step's end
    nvml_utilization_ratio: float | None = None  # NVML, the job's GPUs over the same window
    nvml_sm_active_ratio: float | None = None  # GPM (Hopper+), where available
    per_rank: pd.DataFrame = field(default_factory=pd.DataFrame)
    # Most timed steps say their busy time is a lower bound (FLAG_GPU_BUSY_LOWER_BOUND: the GPU
    # kept pace with the host, its work between launches unseen); idle is then an upper bound.
    busy_is_lower_bound: bool = False

    @property
    def at_least(self) -> str:
        """The qualifier a busy share is stated with."""
        return "at least " if self.busy_is_lower_bound else ""

    @property
    def up_to(self) -> str:
        """The qualifier an idle share (and what is cut from it) is stated with."""
        return "up to " if self.busy_is_lower_bound else ""

    def to_json(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None or not np.isfinite(value) else round(float(value), 4)

        document: dict[str, Any] = {
            "clock": "device (CUDA events)",
            "steps_timed": self.steps_timed,
            "steps": self.steps,
            "busy_fraction": rounded(self.busy_fraction),
            "phase_busy_fractions": {k: rounded(v) for k, v in self.phase_busy_fractions.items()},
            "idle_fraction": rounded(self.idle_fraction),
            "idle_data_wait_fraction": rounded(self.idle_data_wait_fraction),
            "host_data_wait_fraction": rounded(self.host_data_wait_fraction),
            "host_ahead_s_p50": rounded(self.host_ahead_s_p50),
            "nvml_utilization_ratio": rounded(self.nvml_utilization_ratio),
            "nvml_sm_active_ratio": rounded(self.nvml_sm_active_ratio),
            "busy_is_lower_bound": self.busy_is_lower_bound,
        }
        if not self.per_rank.empty:
            document["per_rank"] = [
                {key: (int(value) if key in ("rank", "gpu_index") else rounded(value)) for key, value in row.items()}
                for row in self.per_rank.to_dict("records")
            ]
        return document


def _share(frame: pd.DataFrame, column: str) -> float:
    total = float(frame["step_s"].sum())
    return float(frame[column].sum()) / total if total > 0 else 0.0


def device_timing(host: pd.DataFrame, device: pd.DataFrame, steps: int, context: Context) -> DeviceTiming:
    """``host`` and ``device`` are the same timed steps, cut by the host's timers and by the
    device's clock (``on_device``); the NVML means are joined per rank through the PIDs."""
    ahead = host["host_ahead_s"].dropna()
    rows = []
    for rank, group in device.groupby("rank"):
        nvml = context.gpu_by_pid.get(int(group.sort_values("end_unix_s")["pid"].iloc[-1]), {})
        rank_ahead = group["host_ahead_s"].dropna()
        rows.append(
            {
                "rank": int(rank),
                "gpu_busy_fraction": _share(group, "compute_s"),
                "gpu_idle_fraction": _share(group, "gpu_idle_s"),
                "gpu_idle_data_wait_fraction": _share(group, "data_wait_s"),
                "host_ahead_s_p50": float(rank_ahead.median()) if not rank_ahead.empty else np.nan,
                "gpu_index": nvml.get("gpu_index", -1),
                "nvml_utilization_ratio": nvml.get("utilization_ratio", np.nan),
                "nvml_sm_active_ratio": nvml.get("sm_active_ratio", np.nan),
            }
        )
    return DeviceTiming(
        steps_timed=len(device),
        steps=steps,
        busy_fraction=_share(device, "compute_s"),
        phase_busy_fractions={str(p): _share(device, f"{p}_s") for p in COMPUTE_PHASES},
        idle_fraction=_share(device, "gpu_idle_s"),
        idle_data_wait_fraction=_share(device, "data_wait_s"),
        host_data_wait_fraction=_share(host, "data_wait_s"),
        host_ahead_s_p50=float(ahead.median()) if not ahead.empty else None,
        nvml_utilization_ratio=context.gpu.get("gpu_utilization_ratio"),
        nvml_sm_active_ratio=context.gpu.get("gpu_sm_active_ratio"),
        per_rank=pd.DataFrame(rows),
        busy_is_lower_bound=bool(((host["flags"] & FLAG_GPU_BUSY_LOWER_BOUND) != 0).mean() > 0.5),
    )


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
    signals: Signals = field(default_factory=Signals)
    losses: LossSummary = field(default_factory=LossSummary)  # the whole run so far, warm-up included
    # Set when steps carry device timing: then the fractions above are the device's (on_device).
    device: DeviceTiming | None = None
    mfu: Mfu | None = None  # an estimate, where the FLOPs per step, the GPU and the dtype are known


def empty_features(context: Context | None = None, losses: LossSummary | None = None) -> Features:
    zero = {str(key): 0.0 for key in Fraction}
    return Features(
        0,
        0,
        0.0,
        zero,
        {str(phase): 0.0 for phase in Phase},
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        pd.DataFrame(),
        context or Context(),
        losses=losses or LossSummary(),
    )


def compute_features(
    steps: pd.DataFrame, context: Context, warmup_steps: int = 2, losses: LossSummary | None = None
) -> Features:
    """Fractions of step time and step-time statistics, after dropping each rank's warm-up.

    ``losses`` is the run-wide loss evidence; without it, it is taken from ``steps`` (warm-up
    included: a loss that is NaN from the first step is still a NaN loss).
    """
    losses = losses if losses is not None else summarize_losses(steps)
    usable = steps[steps["step"] > warmup_steps]
    if usable.empty:
        return empty_features(context, losses)
    frame = with_phases(usable)
    total = float(frame["step_s"].sum())
    if total <= 0:
        return empty_features(context, losses)
    # Device truth where the steps carry it, over those steps; the host's timers otherwise.
    timed = device_timed(frame)
    phased = on_device(frame[timed]) if timed.any() else frame
    sums = phased[[f.column for f in Fraction] + [p.column for p in COMPUTE_PHASES]].sum()
    # Normalise by the attributed sum so the four fractions add up to exactly 1 even when the
    # probes' phases overlap a little (nested timers, clock granularity).
    attributed = float(sums["data_wait_s"] + sums["compute_s"] + sums["comm_s"] + sums["other_s"])
    scale = attributed if attributed > 0 else total
    fractions = {str(f): float(sums[f.column]) / scale for f in Fraction}
    phases = {str(p): float(sums[p.column]) / scale for p in Phase}
    span = float(frame["end_unix_s"].max() - (frame["end_unix_s"] - frame["step_s"]).min())
    ranks = int(frame["rank"].nunique())
    median_wait = float(phased["data_wait_s"].median())
    spikes = phased["data_wait_s"] > max(10 * median_wait, 0.05)
    spike_fraction = float(phased.loc[spikes, "data_wait_s"].sum()) / scale
    step_times = frame["step_s"].to_numpy()
    device = device_timing(frame[timed], phased, len(frame), context) if timed.any() else None
    step_mean = float(step_times.mean())
    return Features(
        steps=len(frame),
        ranks=ranks,
        duration_s=span,
        fractions=fractions,
        phase_fractions=phases,
        step_time_p50_s=float(np.percentile(step_times, 50)),
        step_time_p95_s=float(np.percentile(step_times, 95)),
        step_time_mean_s=step_mean,
        steps_per_s=len(frame) / ranks / span if span > 0 else 0.0,
        data_wait_spike_fraction=spike_fraction,
        per_rank=per_rank_summary(phased),
        context=context,
        signals=compute_signals(frame, scale if device is None else total),
        losses=losses,
        device=device,
        mfu=estimate_mfu(context.config, context.gpu, step_mean),
    )


def _spike_ratio(values: pd.Series, history: int = 5) -> float | None:
    """How far a value jumps above the median of the values before it (norms fall steeply at
    the start of training, so comparing with the whole window's median would flag every run)."""
    if len(values) <= history:
        return None
    # A rolling median keeps this linear on 10-hour recordings; 200 samples of history is plenty.
    prior = values.rolling(200, min_periods=history).median().shift(1)
    ratios = (values / prior).iloc[history:]
    ratios = ratios[np.isfinite(ratios)]
    return float(ratios.max()) if not ratios.empty else None


def compute_signals(frame: pd.DataFrame, total_s: float) -> Signals:
    """Convergence and hygiene signals; losses under GradScaler are unscaled first."""
    ordered = frame.sort_values("end_unix_s")
    flags = ordered["flags"].astype(int)
    # The flags say which values were measured: a NaN loss is a finding, a missing one is not.
    loss = loss_readings(ordered)["loss"]
    finite_loss = loss[np.isfinite(loss)]
    spread = recent = None
    if len(finite_loss) >= 8:
        half = finite_loss.iloc[len(finite_loss) // 2 :]
        recent = float(half.median())
        spread = float(half.max() - half.min()) / abs(recent) if recent else None
    grads = ordered.loc[(flags & FLAG_HAS_GRAD_NORM) > 0, "grad_norm"].astype(float)
    finite_grads = grads[np.isfinite(grads)]
    scales = ordered.loc[(flags & FLAG_HAS_SCALE) > 0, "scaler_scale"].astype(float).dropna()
    lrs = ordered.loc[(flags & FLAG_HAS_LR) > 0, "lr"].astype(float).dropna()
    skipped = int(((flags & FLAG_GRAD_SCALER_SKIPPED) > 0).sum())
    graphs = ordered.groupby("rank")["graph_compiles"].agg(lambda g: int(g.max() - g.min()))
    steps = len(ordered)
    return Signals(
        loss_samples=len(loss),
        loss_recent=recent,
        loss_relative_spread=spread,
        grad_norm_samples=len(grads),
        grad_norm_nonfinite=int((~np.isfinite(grads)).sum()),
        grad_norm_median=float(finite_grads.median()) if not finite_grads.empty else None,
        grad_norm_max=float(finite_grads.max()) if not finite_grads.empty else None,
        grad_norm_spike_ratio=_spike_ratio(finite_grads),
        scaler_skipped_steps=skipped,
        scaler_scale_min=float(scales.min()) if not scales.empty else None,
        syncs_per_step=float(ordered["sync_count"].mean()) if steps else 0.0,
        sync_fraction=float(ordered["sync_s"].sum()) / total_s if total_s > 0 else 0.0,
        new_graphs=int(graphs.max()) if not graphs.empty else 0,
        lr_start=float(lrs.iloc[0]) if not lrs.empty else None,
        lr_end=float(lrs.iloc[-1]) if not lrs.empty else None,
        comm_ops_per_step=float(ordered["comm_ops"].mean()) if steps else 0.0,
        comm_bytes_per_step=float(ordered["comm_bytes"].mean()) if steps else 0.0,
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
        own_s_mean=("own_s", "mean"),
    )
    for fraction in Fraction:
        summary[f"{fraction}_fraction"] = summary[f"{fraction.column}_total"] / summary["step_s_total"]
    return summary.reset_index()
