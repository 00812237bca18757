"""Context for the rules from host and process samples; shared by the live and offline paths."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import pandas as pd

from profilerd.analysis.features import Context
from profilerd.model import HOST_TABLE, PROCESS_TABLE, GpuContext, GpuSample, HostSample, ProcessSample
from profilerd.vocabulary import POWER_REASONS, THERMAL_REASONS

# The frames' columns are the recorded tables' (``profilerd.model``): live samples and a
# recording's rows make the same frame.
HOST_COLUMNS = HOST_TABLE.frame_columns
PROCESS_COLUMNS = PROCESS_TABLE.frame_columns


def host_frame(samples: Iterable[HostSample]) -> pd.DataFrame:
    return pd.DataFrame([HOST_TABLE.frame_row(s) for s in samples], columns=HOST_COLUMNS)


def process_frame(samples: Iterable[ProcessSample]) -> pd.DataFrame:
    return pd.DataFrame([PROCESS_TABLE.frame_row(s) for s in samples], columns=PROCESS_COLUMNS)


def build_context(
    config: dict[str, Any] | None,
    hosts: pd.DataFrame,
    processes: pd.DataFrame,
    since_unix_s: float | None = None,
    gpus: pd.DataFrame | None = None,
) -> Context:
    """Means over the samples taken since ``since_unix_s`` (the analysed window)."""
    if since_unix_s is not None:
        hosts = hosts[hosts["ts_unix_s"] >= since_unix_s]
        processes = processes[processes["ts_unix_s"] >= since_unix_s]
    cpu_count = busy = None
    if not hosts.empty:
        cpu_count = int(hosts["cpu_count"].iloc[-1])
        busy = float((hosts["cpu_ratio"] * hosts["cpu_count"]).mean())
    trainer = workers = worker_max = None
    workers_seen = None
    alive = processes[processes["alive"] == 1].dropna(subset=["cpu_ratio"]) if not processes.empty else processes
    if not alive.empty:
        per_tick = alive.groupby("ts_unix_s").agg(
            trainer=("cpu_ratio", "sum"),
            workers=("workers_cpu_ratio", "sum"),
            workers_seen=("num_workers", "sum"),
        )
        trainer = float(per_tick["trainer"].mean())
        workers = float(per_tick["workers"].mean())
        workers_seen = int(per_tick["workers_seen"].max())
        if workers_seen > 0:
            worker_max = float(alive["worker_cpu_max_ratio"].dropna().mean())
    return Context(
        config=config,
        cpu_count=cpu_count,
        host_busy_cores=busy,
        trainer_cpu_cores=trainer,
        workers_cpu_cores=workers,
        worker_cpu_max_ratio=worker_max,
        workers_seen=workers_seen,
        gpu=gpu_context(gpus, since_unix_s) if gpus is not None else GpuContext(),
        gpu_by_pid=gpu_by_pid(gpus, since_unix_s) if gpus is not None else {},
    )


def gpu_frame(samples: Iterable[GpuSample], job_pids: set[int]) -> pd.DataFrame:
    """One row per GPU sample of the GPUs the job uses (all GPUs if none can be attributed).

    Live samples come from the store, offline ones from the recording (``GpuSample.from_json``),
    so both paths share this code.
    """
    rows = []
    for s in samples:
        if s.lost:
            continue
        pids = {p.pid for p in s.processes}
        reasons = set(s.clock_event_reasons or ())
        total = s.memory_total_bytes
        used = s.memory_used_bytes
        sm = s.sm_clock_hertz
        sm_max = s.sm_clock_max_hertz
        throttle_known = s.clock_event_reasons is not None
        rows.append(
            (
                s.ts_unix_s,
                s.index,
                s.name,
                bool(pids & job_pids),
                tuple(sorted(pids & job_pids)),
                s.utilization_gpu_ratio,
                used / total if used is not None and total else None,
                s.tensor_active_ratio,
                s.sm_active_ratio,
                sm / sm_max if sm and sm_max else None,
                float(bool(reasons & THERMAL_REASONS)) if throttle_known else None,
                float(bool(reasons & POWER_REASONS)) if throttle_known else None,
                _sum_or_none(s.pcie_tx_bytes_per_second, s.pcie_rx_bytes_per_second),
                _sum_or_none(s.nvlink_tx_bytes_per_second, s.nvlink_rx_bytes_per_second),
            )
        )
    frame = pd.DataFrame(rows, columns=GPU_COLUMNS)
    if not frame.empty and frame["job_present"].any():
        used_gpus = frame.loc[frame["job_present"], "gpu_index"].unique()
        frame = frame[frame["gpu_index"].isin(used_gpus)]
    return frame


GPU_COLUMNS = [
    "ts_unix_s",
    "gpu_index",
    "name",
    "job_present",
    "job_pids",  # the job's processes on this GPU: the rank-GPU attribution
    "utilization_ratio",
    "memory_ratio",
    "tensor_active_ratio",
    "sm_active_ratio",
    "sm_clock_ratio",
    "thermal_throttle",
    "power_throttle",
    "pcie_bytes_per_second",
    "nvlink_bytes_per_second",
]


def _sum_or_none(a: float | None, b: float | None) -> float | None:
    return None if a is None and b is None else (a or 0.0) + (b or 0.0)


def gpu_context(frame: pd.DataFrame, since_unix_s: float | None = None) -> GpuContext:
    """Means over the window of the job's GPUs; absent keys mean "not measured"."""
    if since_unix_s is not None and not frame.empty:
        frame = frame[frame["ts_unix_s"] >= since_unix_s]
    if frame.empty:
        return GpuContext()
    means = (
        frame[
            [
                "utilization_ratio",
                "tensor_active_ratio",
                "sm_active_ratio",
                "sm_clock_ratio",
                "thermal_throttle",
                "power_throttle",
                "pcie_bytes_per_second",
                "nvlink_bytes_per_second",
            ]
        ]
        .astype(float)
        .mean()
    )
    result = GpuContext(gpu_count=int(frame["gpu_index"].nunique()))
    measured = {f"gpu_{key}": float(value) for key, value in means.items() if pd.notna(value)}
    result.update(cast(GpuContext, measured))  # the keys are GpuContext's: gpu_ and the columns above
    names = frame["name"].dropna()
    if not names.empty:
        result["gpu_name"] = str(names.mode().iloc[0])
    memory = frame["memory_ratio"].astype(float).max()
    if pd.notna(memory):
        result["gpu_memory_max_ratio"] = float(memory)
    if frame["utilization_ratio"].notna().any():
        idle = frame[frame["job_present"] & (frame["utilization_ratio"].astype(float) < 0.05)]
        present = int(frame["job_present"].sum())
        result["gpu_idle_while_held_fraction"] = len(idle) / present if present else 0.0
    return result


def gpu_by_pid(frame: pd.DataFrame, since_unix_s: float | None = None) -> dict[int, dict[str, float]]:
    """NVML means of the GPU each of the job's processes runs on, over the window, by PID: the
    device side of the rank-GPU attribution (a process on several GPUs gets the busiest)."""
    if since_unix_s is not None and not frame.empty:
        frame = frame[frame["ts_unix_s"] >= since_unix_s]
    held = frame[frame["job_present"]] if not frame.empty else frame
    if held.empty:
        return {}
    per_pid = held.explode("job_pids").dropna(subset=["job_pids"])
    means = per_pid.groupby(["job_pids", "gpu_index"])[["utilization_ratio", "sm_active_ratio"]].agg(
        lambda values: values.astype(float).mean()
    )
    result: dict[int, dict[str, float]] = {}
    for (pid, index), row in means.iterrows():
        utilization = float(row["utilization_ratio"]) if pd.notna(row["utilization_ratio"]) else -1.0
        known = result.get(int(pid))
        if known is not None and known.get("utilization_ratio", -1.0) >= utilization:
            continue
        entry = {"gpu_index": float(index)}
        for key in ("utilization_ratio", "sm_active_ratio"):
            if pd.notna(row[key]):
                entry[key] = float(row[key])
        result[int(pid)] = entry
    return result
