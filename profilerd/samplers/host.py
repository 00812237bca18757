"""Host and training-process sampling through psutil (the only psutil user in the daemon)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import psutil

from profilerd.model import HostSample, ProbeSession, ProcessSample
from profilerd.samplers.sinks import HostRecords

log = logging.getLogger(__name__)

DATALOADER_WORKER_NAME = "pt_data_worker"


class HostSampler:
    def __init__(self) -> None:
        psutil.cpu_percent(percpu=True)  # the first call only primes the counters
        psutil.cpu_times_percent()

    def sample(self, now_unix_s: float) -> HostSample:
        per_core = tuple(p / 100.0 for p in psutil.cpu_percent(percpu=True))
        times = psutil.cpu_times_percent()
        memory = psutil.virtual_memory()
        try:
            load1: float | None = os.getloadavg()[0]
        except OSError:
            load1 = None
        iowait = getattr(times, "iowait", None)
        return HostSample(
            ts_unix_s=now_unix_s,
            cpu_count=len(per_core),
            cpu_per_core_ratio=per_core,
            cpu_ratio=sum(per_core) / len(per_core) if per_core else 0.0,
            iowait_ratio=iowait / 100.0 if iowait is not None else None,
            memory_used_bytes=int(memory.total - memory.available),
            memory_total_bytes=int(memory.total),
            load1=load1,
        )


class ProcessSampler:
    """CPU and memory of each training process and of its DataLoader worker children.

    psutil's cpu_percent needs the same Process object across calls, so they are cached per
    pid; a pid that disappears is reported once as not alive (which the store takes as its
    exit) and forgotten.
    """

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def _proc(self, pid: int) -> psutil.Process:
        proc = self._procs.get(pid)
        if proc is None:
            proc = self._procs[pid] = psutil.Process(pid)
            proc.cpu_percent(None)
        return proc

    @staticmethod
    def _workers_by_parent(parents: set[int]) -> dict[int, list[int]]:
        """DataLoader workers of each parent, from one pass over the process table per tick
        (psutil's children() scans every process once per parent: quadratic with many ranks)."""
        workers: dict[int, list[int]] = {}
        if not parents:
            return workers
        for proc in psutil.process_iter(["ppid", "name"]):
            info = proc.info
            if info["ppid"] in parents and info["name"] == DATALOADER_WORKER_NAME:
                workers.setdefault(info["ppid"], []).append(proc.pid)
        return workers

    def sample(self, now_unix_s: float, sessions: dict[int, ProbeSession]) -> list[ProcessSample]:
        samples = []
        live: set[int] = set()
        workers_of = self._workers_by_parent(set(sessions))
        for pid, session in sessions.items():
            try:
                proc = self._proc(pid)
                with proc.oneshot():
                    cpu = proc.cpu_percent(None) / 100.0
                    rss = proc.memory_info().rss
                    threads = proc.num_threads()
                live.add(pid)
                workers = []
                ratios = []
                for child_pid in workers_of.get(pid, ()):
                    try:
                        worker = self._proc(child_pid)
                        ratios.append(worker.cpu_percent(None) / 100.0)
                        workers.append(child_pid)
                        live.add(child_pid)
                    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                        continue
                samples.append(
                    ProcessSample(
                        now_unix_s,
                        pid,
                        session.job,
                        session.rank,
                        True,
                        cpu,
                        rss,
                        threads,
                        tuple(workers),
                        tuple(ratios),
                    )
                )
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                samples.append(ProcessSample(now_unix_s, pid, session.job, session.rank, False, None, None, None))
            except psutil.AccessDenied:
                samples.append(ProcessSample(now_unix_s, pid, session.job, session.rank, True, None, None, None))
                live.add(pid)
        for pid in list(self._procs):
            if pid not in live:
                del self._procs[pid]
        return samples


class NodeSampler:
    """The host sampler's cycle: the host, then each training process ``training_pids()`` names."""

    def __init__(self, training_pids: Callable[[], dict[int, ProbeSession]]) -> None:
        self._host = HostSampler()
        self._processes = ProcessSampler()
        self._training_pids = training_pids

    def sample(self, now_unix_s: float) -> HostRecords:
        host = self._host.sample(now_unix_s)
        return HostRecords(host, self._processes.sample(now_unix_s, self._training_pids()))
