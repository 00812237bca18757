"""Helpers for the reliability, security and fuzz tests: daemons in-process and as a
subprocess, scraping, polling with deadlines, and sending as another user."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from profilerd_probes import wire

_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll until ``predicate()`` is truthy and return its value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not met within {timeout} s: {what or predicate}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(url: str, timeout: float = 5.0) -> Any:
    status, body = http_get(url, timeout)
    return json.loads(body) if status == 200 else None


def parse_metrics(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` for every sample line of a Prometheus text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SERIES.match(line)
        if match:
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def metrics(url: str) -> dict[str, float]:
    status, body = http_get(f"{url}/metrics")
    assert status == 200, status
    return parse_metrics(body.decode())


def hello(pid: int | None = None, *, job: str = "job", run_id: str = "run", rank: int = 0, **extra: Any) -> bytes:
    body = {
        "pid": os.getpid() if pid is None else pid,
        "job": job,
        "run_id": run_id,
        "rank": rank,
        "world_size": 1,
        "hostname": "host",
        "argv": ["train.py"],
        "started_unix_s": time.time(),
        **extra,
    }
    return wire.encode_json(wire.KIND_HELLO, body)


def step_records(first_seq: int, count: int, pid: int | None = None, rank: int = 0, dropped: int = 0) -> list[bytes]:
    """Packed step records (for a batch) with sequence numbers first_seq, first_seq + 1, ..."""
    pid = os.getpid() if pid is None else pid
    now = time.time()
    phases = (0.01, 0.002, 0.003, 0.003, 0.001, 0.0)  # step, data wait, forward, backward, optimizer, comm
    signals = (0.0, 0.0, 0.0, 0.0, 0, 0.0, 0.0, 0, 0, 0)
    return [
        wire.pack_step_record(pid, rank, seq, seq, now, *phases, dropped, 0, *signals)
        for seq in range(first_seq, first_seq + count)
    ]


def step_batch(first_seq: int, count: int, pid: int | None = None, rank: int = 0, dropped: int = 0) -> bytes:
    return wire.encode_step_batch(step_records(first_seq, count, pid, rank, dropped))


def send(path: Path, *datagrams: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        for datagram in datagrams:
            sock.sendto(datagram, str(path))


def send_as(uid: int, path: Path, build: Callable[[int], Iterable[bytes]]) -> int:
    """Fork, become ``uid`` (no root left), send ``build(own_pid)`` to ``path`` and exit.

    Returns the child's exit status: 0 sent, 13 refused by the file system (EACCES), 1 other.
    A fork rather than a new interpreter: the other user may not be able to run this Python.
    """
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                for datagram in build(os.getpid()):
                    sock.sendto(datagram, str(path))
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


class Served:
    """`profilerd serve` in a subprocess; stderr is collected by a thread so it never blocks."""

    def __init__(self, env: dict[str, str], *args: str, timeout: float = 30.0, as_user: Sequence[str] = ()) -> None:
        """``as_user``: a command prefix that runs the daemon as another user (tests/test_shared_box.py)."""
        self.process = subprocess.Popen(
            [*as_user, sys.executable, "-m", "profilerd", "serve", *args],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        self.lines: list[str] = []
        first = self.process.stderr.readline()
        if "serving http://" not in first:
            self.process.kill()
            rest = self.process.stderr.read()
            raise AssertionError(f"daemon did not start: {first}{rest}")
        self.lines.append(first)
        self.url = first.split("serving ")[1].split("/metrics")[0]
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout=timeout)
