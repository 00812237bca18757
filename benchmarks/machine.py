"""What the benchmarks record about the machine, and the load they cannot remove, only see."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    """CPU, Python, torch (if imported) and the AF_UNIX datagram queue limit, with the date."""
    cpu_model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    qlen = None
    with contextlib.suppress(OSError, ValueError):
        qlen = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "nproc": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "net_unix_max_dgram_qlen": qlen,
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
    return info


def _machine_busy_s() -> float:
    """CPU seconds spent by everything on the machine so far (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadWatch:
    """How much CPU other processes used meanwhile, in CPUs.

    This process and its waited-for children are "own"; a helper process still running (a
    receiver) counts as "other".
    """

    def __init__(self) -> None:
        self.busy0, self.own0, self.t0 = _machine_busy_s(), _own_cpu_s(), time.monotonic()

    def others(self) -> float:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        return max(0.0, (_machine_busy_s() - self.busy0) - (_own_cpu_s() - self.own0)) / elapsed

    def result(self) -> dict[str, float]:
        return {"elapsed_s": time.monotonic() - self.t0, "other_processes_cpu_ratio": self.others()}


def wait_quiet(limit_s: float, threshold: float) -> float:
    """Wait (up to limit_s) for a 2-second window in which other processes use < threshold CPUs."""
    deadline = time.monotonic() + limit_s
    while True:
        watch = LoadWatch()
        time.sleep(2.0)
        others = watch.others()
        if others < threshold or time.monotonic() >= deadline:
            return others


def pin(cpu: int | None) -> None:
    """Pin this process to one CPU (children inherit the mask, so a child can pin itself elsewhere)."""
    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError as exc:
            print(f"could not pin to CPU {cpu}: {exc}", file=sys.stderr)


def isolated_env(workdir: Path, **extra: str) -> dict[str, str]:
    """This environment for a profilerd of its own: runtime and data dirs under ``workdir``
    (``workdir/run`` must exist), any free HTTP port, no PROFILERD_* setting of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROFILERD_")}
    env.update(
        XDG_RUNTIME_DIR=str(workdir / "run"),
        PROFILERD_DATA_DIR=str(workdir / "data"),
        PROFILERD_HTTP_PORT="0",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
        **extra,
    )
    return env
