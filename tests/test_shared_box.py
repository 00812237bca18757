"""Safe on a shared GPU box (issue 18): another local user cannot blind the daemon with idle
connections, settings that would break the daemon are refused at load, and damaged or newer
recordings say so instead of looking healthy. (Command-line secrets: tests/test_security.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import selectors
import signal
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from profilerd.exporters.http import MAX_CONNECTIONS, MAX_WORKERS
from tests.conftest import run_cli
from tests.fixtures.make_fixture import FIXTURE
from tests.reliability_helpers import Served, get_json, http_get, metrics, wait_for
from tests.test_report import _corrupted, _truncated

ATTACKER_UID = 12345
SLOWLORIS_CONNECTIONS = 1000


# ---- slowloris -------------------------------------------------------------------------------------
def hold_idle_connections(port: int, count: int, ready_fd: int) -> None:  # pragma: no cover - a forked child
    """Hold ``count`` connections that never finish their request head, reopening every one the
    daemon closes, until killed; one byte on ``ready_fd`` once all are open. Runs as another
    user when started as root. (benchmarks/bench_slowloris.py uses it too.)"""
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(ATTACKER_UID)
        os.setuid(ATTACKER_UID)
    resource.setrlimit(resource.RLIMIT_NOFILE, (count + 256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    selector = selectors.DefaultSelector()

    def open_one() -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        except OSError:
            time.sleep(0.01)

    for _ in range(count):
        open_one()
    os.write(ready_fd, b"1")
    while True:
        for key, _ in selector.select(timeout=0.5):
            selector.unregister(key.fileobj)
            key.fileobj.close()  # closed by the daemon: open another
            open_one()


def _daemon_resources(pid: int) -> tuple[int, int]:
    """(open descriptors, threads) of a process, as the kernel counts them."""
    descriptors = len(os.listdir(f"/proc/{pid}/fd"))
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
    return descriptors, threads


def test_a_slowloris_of_1000_idle_connections_leaves_metrics_answering_and_the_sampler_sampling(
    profilerd_env: dict[str, str],
) -> None:
    served = Served(profilerd_env, "--gpu", "none")
    attacker = 0
    try:
        pid = served.process.pid
        # The daemon under the descriptor limit the issue found it at (1,024), whatever the CI's.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (1024, resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]))
        port = int(served.url.rsplit(":", 1)[1])
        before = metrics(served.url)
        read_fd, write_fd = os.pipe()
        attacker = os.fork()
        if attacker == 0:  # pragma: no cover - the child
            try:
                hold_idle_connections(port, SLOWLORIS_CONNECTIONS, write_fd)
            finally:
                os._exit(1)
        os.close(write_fd)
        assert os.read(read_fd, 1) == b"1", "the attacker could not open its connections"
        os.close(read_fd)
        first_host = get_json(f"{served.url}/api/v1/host", timeout=30)["host"]["ts_unix_s"]
        for _ in range(5):  # under attack, scrapes are answered (a generous 30 s to answer at all)
            status, body = http_get(f"{served.url}/metrics", timeout=30)
            assert status == 200 and b"profilerd_build_info" in body
            descriptors, threads = _daemon_resources(pid)
            assert descriptors < MAX_CONNECTIONS + 40, descriptors  # far from the 1,024 limit
            assert threads < MAX_WORKERS + 20, threads  # idle connections hold no thread
            time.sleep(0.5)
        wait_for(
            lambda: get_json(f"{served.url}/api/v1/host", timeout=30)["host"]["ts_unix_s"] > first_host + 1,
            timeout=30,
            what="the host sampler keeps sampling",
        )
        after = metrics(served.url)
        key = 'profilerd_sampler_errors_total{sampler="host"}'
        assert after.get(key, 0) == before.get(key, 0), "the host sampler failed under the attack"
        assert "Too many open files" not in served.stderr
    finally:
        if attacker:
            os.kill(attacker, signal.SIGKILL)
            os.waitpid(attacker, 0)
        assert served.terminate() == 0


def test_a_connection_that_never_finishes_its_request_is_closed(profilerd_env: dict[str, str]) -> None:
    served = Served(profilerd_env, "--gpu", "none")
    try:
        port = int(served.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            assert sock.recv(1) == b""  # the daemon hung up (after its 10 s request deadline)
        # a request sent in pieces, as long as it completes in time, is answered
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            for piece in (b"GET /heal", b"thz HTTP/1.1\r\nHo", b"st: x\r\n", b"\r\n"):
                sock.sendall(piece)
                time.sleep(0.2)
            response = b""
            while chunk := sock.recv(65536):  # until the daemon closes: one request per connection
                response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head
        assert json.loads(body)["status"] == "ok"
    finally:
        assert served.terminate() == 0


# ---- settings ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("window_steps = 100000000000000000000", "window_steps must be between 20 and 100000 steps"),
        ("window_steps = 1e20", "'window_steps' must be int between 20 and 100000 steps"),
        ("retention_days = inf", "retention_days must be between 0 and 36500 days"),
        ("retention_days = nan", "retention_days must be between 0 and 36500 days"),
        ("window_s = inf", "window_s must be between 1 and 86400 s"),
        ("host_interval_s = 0", "host_interval_s must be between 0.05 and 60 s"),
        ("analysis_interval_s = 1e9", "analysis_interval_s must be between 0.05 and 60 s"),
        ("gpu_interval_s = -1", "gpu_interval_s must be between 0.1 (10 Hz) and 60 s"),
        ("max_jobs = 0", "max_jobs must be between 1 and 10000"),
        ("http_port = 70000", "http_port must be between 0 (any free port) and 65535"),
        ("allowed_uids = [4294967295]", "'allowed_uids' must be a list of user ids (integers 0 to 4294967294)"),
        ('argv_safe_flags = ["lr", 3]', "'argv_safe_flags' must be a list of flag names"),
    ],
)
def test_out_of_range_settings_exit_2_naming_the_key_and_the_range(
    line: str, message: str, profilerd_env: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "profilerd.toml"
    config.write_text(f"[daemon]\n{line}\n")
    env = {k: v for k, v in profilerd_env.items() if k != "PROFILERD_HTTP_PORT"}  # the file's port, not the env's
    result = run_cli("serve", "--config", str(config), env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"{config}: " in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# ---- damaged and newer recordings ---------------------------------------------------------------------
def _runs_dir(env: dict[str, str]) -> Path:
    path = Path(env["PROFILERD_DATA_DIR"]) / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _snapshot(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("make", [_truncated, _corrupted])
def test_a_damaged_recording_says_so_in_the_header_and_exits_3(make: Any, profilerd_env: dict[str, str]) -> None:
    directory = _runs_dir(profilerd_env)
    path = make(directory)
    before = _snapshot(directory)
    result = run_cli("report", str(path), env=profilerd_env, timeout=60)
    assert result.returncode == 3, result.stderr
    header = result.stdout.splitlines()[0]
    assert "DAMAGED RECORDING" in header
    assert "steps over" in result.stdout  # what could be read is still shown
    assert "Data quality: recording DAMAGED" in result.stdout
    assert f"{path} is damaged" in result.stderr and "Traceback" not in result.stderr
    document = json.loads(run_cli("report", str(path), "--format", "json", env=profilerd_env, timeout=60).stdout)
    assert document["damaged"] and document["steps"] > 0
    diff = run_cli("diff", str(FIXTURE), str(path), env=profilerd_env, timeout=60)
    assert diff.returncode == 3 and "is damaged" in diff.stderr, diff.stderr
    assert _snapshot(directory) == before  # reading changed nothing


def test_an_intact_recording_still_exits_0(profilerd_env: dict[str, str]) -> None:
    result = run_cli("report", str(FIXTURE), env=profilerd_env, timeout=60)
    assert result.returncode == 0 and "DAMAGED" not in result.stdout, result.stderr


def test_a_recording_of_a_newer_schema_is_refused_clearly(profilerd_env: dict[str, str]) -> None:
    directory = _runs_dir(profilerd_env)
    path = directory / "newer.sqlite"
    path.write_bytes(FIXTURE.read_bytes())
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    before = _snapshot(directory)
    result = run_cli("report", str(path), env=profilerd_env, timeout=60)
    assert result.returncode == 2
    assert "newer profilerd (recording schema 99" in result.stderr and "upgrade profilerd" in result.stderr
    assert "Traceback" not in result.stderr
    listing = json.loads(run_cli("runs", "--json", env=profilerd_env, timeout=60).stdout)
    assert [(r["state"], "schema 99" in r["problem"]) for r in listing] == [("newer", True)]
    assert _snapshot(directory) == before


def test_runs_lists_unreadable_files_and_never_prunes_them(profilerd_env: dict[str, str]) -> None:
    directory = _runs_dir(profilerd_env)
    (directory / "good.sqlite").write_bytes(FIXTURE.read_bytes())
    (directory / "empty.sqlite").write_bytes(b"")
    (directory / "garbage.sqlite").write_bytes(b"not a database at all, really not" * 20)
    _truncated(directory)
    listing = run_cli("runs", env=profilerd_env, timeout=60)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()[1:]
    assert len(lines) == 4, listing.stdout  # nothing hidden
    rows = {line.split()[0]: line for line in lines}
    assert "unreadable" in rows["empty"] and "is empty" in rows["empty"]
    assert "unreadable" in rows["garbage"] and "not a profilerd recording" in rows["garbage"]
    document = json.loads(run_cli("runs", "--json", env=profilerd_env, timeout=60).stdout)
    states = {Path(r["path"]).name: r["state"] for r in document}
    assert states == {
        "good.sqlite": "closed",
        "empty.sqlite": "unreadable",
        "garbage.sqlite": "unreadable",
        "truncated.sqlite": "damaged",
    }
    pruned = run_cli("runs", "--keep", "0", env=profilerd_env, timeout=60)
    assert pruned.returncode == 0, pruned.stderr
    assert sorted(p.name for p in directory.iterdir()) == ["empty.sqlite", "garbage.sqlite"]
