"""The target of an attach: a live Python process that has imported torch, or a clear refusal."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import psutil

PTRACE_HELP = (
    "stack sampling needs ptrace rights over the target: run as the same user with "
    "kernel.yama.ptrace_scope=0 (sudo sysctl kernel.yama.ptrace_scope=0), or grant CAP_SYS_PTRACE "
    "(e.g. docker run --cap-add SYS_PTRACE); profilerd never escalates by itself"
)


class AttachError(Exception):
    """Attaching is impossible; the message says why and what to do (exit code 2)."""


@dataclass(frozen=True)
class Target:
    pid: int
    cmdline: tuple[str, ...]
    python_version: str | None
    has_torch: bool


def inspect_target(pid: int) -> Target:
    """Check the pid is a live Python process with torch loaded, or raise AttachError."""
    try:
        proc = psutil.Process(pid)
        cmdline = tuple(proc.cmdline())
        exe = proc.exe()
    except psutil.NoSuchProcess:
        raise AttachError(f"no process with pid {pid}") from None
    except psutil.ZombieProcess:
        raise AttachError(f"process {pid} has already exited (zombie)") from None
    except psutil.AccessDenied:
        raise AttachError(f"no permission to inspect process {pid}: attach as its user, or as root") from None
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except PermissionError:
        raise AttachError(f"no permission to read /proc/{pid}/maps: attach as the process's user") from None
    except OSError as exc:
        raise AttachError(f"process {pid} is gone or unreadable: {exc.strerror}") from None
    version = _python_version(exe, maps)
    if version is None:
        name = Path(exe).name if exe else (cmdline[0] if cmdline else "?")
        raise AttachError(f"process {pid} ({name}) is not a Python process")
    has_torch = "libtorch" in maps or "/torch/_C" in maps
    if not has_torch:
        raise AttachError(f"process {pid} is Python {version} but has not imported torch: nothing to diagnose")
    return Target(pid, cmdline, version, has_torch)


def _python_version(exe: str, maps: str) -> str | None:
    match = re.search(r"libpython(\d+\.\d+)", maps) or re.search(r"python(\d+\.\d+)", Path(exe).name)
    if match:
        return match.group(1)
    if re.fullmatch(r"python\d*", Path(exe).name):
        return "3"
    return None
