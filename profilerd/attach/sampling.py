"""What an attach observes without probes: thread CPU (L0, psutil) and Python stacks (L1, py-spy)."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from profilerd.attach.target import PTRACE_HELP, AttachError
from profilerd.samplers.host import DATALOADER_WORKER_NAME


# ---- L0: psutil ------------------------------------------------------------------------------
@dataclass
class L0Summary:
    seconds: float = 0.0
    samples: int = 0
    main_thread_cores: float = 0.0  # the training (main) thread, 1.0 = one full core
    other_threads_cores: float = 0.0  # intra-op threads and the rest
    workers: int = 0
    workers_cores: float = 0.0
    worker_max_ratio: float | None = None
    host_busy_cores: float = 0.0
    cpu_count: int = 1
    iowait_ratio: float | None = None
    exited: bool = False

    def to_json(self) -> dict[str, float | int | bool | None]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class L0Sampler:
    """CPU of the target's threads and DataLoader workers, and the host, over an interval."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.proc = psutil.Process(pid)
        self._threads = self._thread_times()
        self._workers: dict[int, psutil.Process] = {}
        self._worker_ratios: list[float] = []
        self._last_ratios: list[float] = []
        self._start = time.monotonic()
        self._main = self._other = self._workers_total = self._host = 0.0
        self._ticks = 0
        self.summary = L0Summary(cpu_count=psutil.cpu_count() or 1)
        psutil.cpu_percent(None)
        self._discover_workers()

    def worker_pids(self) -> list[int]:
        return list(self._workers)

    def worker_ratios(self) -> list[float]:
        """The workers' CPU over the last tick, 1.0 = one full core, in worker_pids() order."""
        return list(self._last_ratios)

    def _thread_times(self) -> dict[int, float]:
        return {t.id: t.user_time + t.system_time for t in self.proc.threads()}

    def _discover_workers(self) -> None:
        for child in self.proc.children():
            with contextlib.suppress(psutil.Error):
                if child.pid not in self._workers and child.name() == DATALOADER_WORKER_NAME:
                    child.cpu_percent(None)
                    self._workers[child.pid] = child

    def tick(self, interval: float) -> bool:
        """Sample once after ``interval`` seconds; False once the target has exited."""
        try:
            before = self._threads
            time.sleep(interval)
            if self.proc.status() == psutil.STATUS_ZOMBIE:
                raise psutil.ZombieProcess(self.pid)
            now = self._thread_times()
            self._discover_workers()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            self.summary.exited = True
            return False
        main = (now.get(self.pid, 0.0) - before.get(self.pid, 0.0)) / interval
        other = sum(v - before.get(tid, v) for tid, v in now.items() if tid != self.pid) / interval
        ratios = []
        for pid, worker in list(self._workers.items()):
            try:
                ratios.append(worker.cpu_percent(None) / 100.0)
            except psutil.Error:
                del self._workers[pid]
        self._threads = now
        self._last_ratios = ratios
        self._ticks += 1
        self._main += main
        self._other += other
        self._workers_total += sum(ratios)
        self._worker_ratios.extend(ratios)
        self._host += psutil.cpu_percent(None) / 100.0 * (psutil.cpu_count() or 1)
        s = self.summary
        s.samples = self._ticks
        s.seconds = time.monotonic() - self._start
        s.main_thread_cores = self._main / self._ticks
        s.other_threads_cores = self._other / self._ticks
        s.workers = len(self._workers)
        s.workers_cores = self._workers_total / self._ticks
        s.worker_max_ratio = float(np.percentile(self._worker_ratios, 90)) if self._worker_ratios else None
        s.host_busy_cores = self._host / self._ticks
        times = psutil.cpu_times_percent(None)
        s.iowait_ratio = getattr(times, "iowait", None)
        return True


# ---- L1: py-spy ---------------------------------------------------------------------------------
PHASE_PATTERNS = (
    ("communication", re.compile(r"\(torch/distributed/|Work\.wait|distributed_c10d")),
    ("data_wait", re.compile(r"_BaseDataLoaderIter\.__next__ \(torch/utils/data/")),
    ("backward", re.compile(r"\(torch/autograd/__init__\.py|_engine_run_backward|Tensor\.backward \(torch/")),
    ("optimizer", re.compile(r"\(torch/optim/")),
    ("forward", re.compile(r"Module\._call_impl \(torch/nn/modules/module\.py")),
)


def py_spy_path() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).with_name("py-spy")
    return str(candidate) if candidate.exists() else None


IMPORTING = re.compile(r"_find_and_load \(<frozen importlib")


def phase_of(stack: str) -> str:
    """The step phase of one stack (root first; communication wins wherever it appears).

    A stack that is importing a module is "other" whatever imports it: ``import
    torch.distributed`` during start-up is not communication."""
    if IMPORTING.search(stack):
        return "other"
    if PHASE_PATTERNS[0][1].search(stack):
        return "communication"
    frames = stack.split(";")
    for frame in frames:
        for phase, pattern in PHASE_PATTERNS[1:]:
            if pattern.search(frame):
                return phase
    return "other"


def parse_raw(text: str) -> dict[str, Counter[str]]:
    """py-spy's raw (collapsed) output → per-thread counts of samples per phase."""
    threads: dict[str, Counter[str]] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        head, _, frames = stack.partition(";")
        name = head.split(": ", 1)[-1] if ": " in head else head
        threads.setdefault(name, Counter())[phase_of(frames)] += int(count)
    return threads


def training_thread(threads: dict[str, Counter[str]]) -> Counter[str]:
    """The thread that does the training: most samples in training phases, MainThread on ties."""
    if not threads:
        return Counter()

    def score(item: tuple[str, Counter[str]]) -> tuple[int, bool]:
        name, counts = item
        return (sum(v for k, v in counts.items() if k != "other"), name == "MainThread")

    return max(threads.items(), key=score)[1]


class PySpySampler:
    """Runs `py-spy record` in the background for the attach duration."""

    def __init__(self, pid: int, rate_hz: int, duration_s: float) -> None:
        exe = py_spy_path()
        if exe is None:
            raise AttachError("py-spy is not installed (pip install py-spy)")
        self.output = Path(tempfile.mkstemp(prefix="profilerd-pyspy-", suffix=".txt")[1])
        self.process = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--nonblocking",
                "--idle",
                "--threads",
                "--rate",
                str(rate_hz),
                "--duration",
                str(max(1, round(duration_s))),
                "--format",
                "raw",
                "-o",
                str(self.output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(2)  # SIGINT: py-spy writes what it has and exits

    def result(self, timeout: float) -> tuple[Counter[str] | None, str | None]:
        """Phase counts of the training thread, or (None, why) when sampling was refused."""
        try:
            _, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
        try:
            text = self.output.read_text()
        finally:
            self.output.unlink(missing_ok=True)
        if not text.strip():
            reason = (stderr or "").strip().splitlines()
            message = reason[-1] if reason else "py-spy produced no samples"
            if "ermission" in (stderr or "") or "ptrace" in (stderr or "").lower():
                message = f"{message}; {PTRACE_HELP}"
            return None, message
        return training_thread(parse_raw(text)), None
