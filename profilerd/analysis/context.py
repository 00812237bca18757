"""Context for the rules from host and process samples; shared by the live and offline paths."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

from profilerd.analysis.features import Context
from profilerd.model import HostSample, ProcessSample

HOST_COLUMNS = ["ts_unix_s", "cpu_count", "cpu_ratio"]
PROCESS_COLUMNS = [
    "ts_unix_s",
    "pid",
    "rank",
    "alive",
    "cpu_ratio",
    "num_workers",
    "workers_cpu_ratio",
    "worker_cpu_max_ratio",
]


def host_frame(samples: Iterable[HostSample]) -> pd.DataFrame:
    return pd.DataFrame([(s.ts_unix_s, s.cpu_count, s.cpu_ratio) for s in samples], columns=HOST_COLUMNS)


def process_frame(samples: Iterable[ProcessSample]) -> pd.DataFrame:
    rows = [
        (
            s.ts_unix_s,
            s.pid,
            s.rank,
            int(s.alive),
            s.cpu_ratio,
            len(s.worker_pids),
            s.workers_cpu_ratio,
            max(s.worker_cpu_ratios) if s.worker_cpu_ratios else None,
        )
        for s in samples
    ]
    return pd.DataFrame(rows, columns=PROCESS_COLUMNS)


def build_context(
    config: dict[str, Any] | None,
    hosts: pd.DataFrame,
    processes: pd.DataFrame,
    since_unix_s: float | None = None,
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
    )
