"""The daemon as a service: ingest, metrics, the JSON API, recording, lifecycle."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from profilerd.analysis.rules import load_rules
from profilerd.config import load
from profilerd.daemon import Daemon, DaemonError
from profilerd.gpu import NoGpuBackend
from profilerd.recordings.schema import recording_file
from profilerd_probes import wire
from tests.wire_helpers import step_datagram

RULES, _ = load_rules()


@pytest.fixture
def daemon(profilerd_env: dict[str, str]) -> Iterator[Daemon]:
    config, problems = load()
    assert problems == []
    instance = Daemon(config, RULES, gpu_backend=NoGpuBackend("no GPU in tests"))
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def get(daemon: Daemon, path: str) -> tuple[int, bytes]:
    host, port = daemon.http_address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def send(daemon: Daemon, *datagrams: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        for datagram in datagrams:
            sock.sendto(datagram, str(daemon.config.socket_path))


def hello(pid: int | None = None, rank: int = 0, run_id: str = "run-a", job: str = "job-a") -> bytes:
    """A hello from this process: the daemon accepts only the sender's own pid (SCM_CREDENTIALS)."""
    return wire.encode_json(
        wire.KIND_HELLO,
        {
            "pid": os.getpid() if pid is None else pid,
            "job": job,
            "run_id": run_id,
            "rank": rank,
            "world_size": 1,
            "hostname": "h",
            "argv": ["train.py", "--hf-token", "hf_abcdefghijklmnop"],
            "started_unix_s": time.time(),
        },
    )


def steps(n: int, pid: int | None = None, rank: int = 0, data: float = 0.06, step_s: float = 0.1) -> list[bytes]:
    pid = os.getpid() if pid is None else pid
    start = time.time() - n * step_s
    return [
        step_datagram(
            pid=pid,
            rank=rank,
            seq=i + 1,
            step=i + 1,
            end_unix_s=start + (i + 1) * step_s,
            step_s=step_s,
            data_wait_s=data,
            forward_s=0.01,
            backward_s=0.02,
            optimizer_s=0.005,
        )
        for i in range(n)
    ]


def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_socket_directory_is_private(daemon: Daemon) -> None:
    assert daemon.config.runtime_dir.stat().st_mode & 0o777 == 0o700
    assert daemon.config.socket_path.stat().st_mode & 0o777 == 0o600


def test_steps_become_metrics_and_a_verdict(daemon: Daemon) -> None:
    send(daemon, hello(), *steps(150))
    wait_for(lambda: daemon.store.received["step"] == 150)
    wait_for(
        lambda: daemon.store.jobs["job-a"].verdict is not None and daemon.store.jobs["job-a"].verdict.primary == "data"
    )
    status, body = get(daemon, "/metrics")
    text = body.decode()
    assert status == 200
    assert 'profilerd_step_duration_seconds_count{job="job-a",rank="0"} 150.0' in text
    assert 'profilerd_verdict{category="data",job="job-a"} 1.0' in text
    assert 'profilerd_step_phase_seconds_total{job="job-a",phase="data_wait",rank="0"}' in text
    assert 'profilerd_probe_messages_received_total{kind="step"} 150.0' in text
    assert "profilerd_recommendation_estimated_speedup_ratio" in text
    assert "hostname" not in text and "pid=" not in text  # low-cardinality labels only


def test_unknown_senders_and_garbage_are_counted_not_fatal(daemon: Daemon) -> None:
    send(daemon, b"", b"XX\x01\x02", b"PF\x09\x02" + b"\0" * 80, *steps(3))  # steps before any hello
    send(daemon, hello(), *steps(5))
    wait_for(lambda: daemon.store.received["step"] == 5)
    dropped = daemon.store.dropped
    assert dropped["unknown_sender"] == 3
    assert dropped["bad_magic"] == 1
    assert dropped["bad_version"] == 1
    assert dropped["truncated"] == 1


def test_sequence_gaps_and_sender_drops_are_accounted(daemon: Daemon) -> None:
    records = steps(10)
    send(daemon, hello(), *records[:3], *records[6:])  # 3 lost in between
    wait_for(lambda: daemon.store.received["step"] == 7)
    assert daemon.store.dropped["sequence_gap"] == 3


def test_api_documents_and_errors(daemon: Daemon) -> None:
    send(daemon, hello(), *steps(30))
    wait_for(lambda: daemon.store.received["step"] == 30)
    status, body = get(daemon, "/api/v1/jobs")
    assert status == 200
    assert json.loads(body)["jobs"][0]["job"] == "job-a"
    status, body = get(daemon, "/api/v1/jobs/job-a?steps=5")
    document = json.loads(body)
    assert len(document["rank_detail"][0]["recent_steps"]) == 5
    assert "hf_abcdefghijklmnop" not in body.decode()  # secrets in argv are redacted
    for path, code in (
        ("/api/v1/jobs/nope", 404),
        ("/api/v1/whatever", 404),
        ("/nope", 404),
        ("/api/v1/jobs/job-a?steps=abc", 400),
        ("/api/v1/jobs/job-a?steps=-1", 400),
    ):
        status, body = get(daemon, path)
        assert status == code, path
        assert "error" in json.loads(body)
    status, body = get(daemon, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_run_end_closes_the_recording(daemon: Daemon) -> None:
    send(daemon, hello(run_id="run-rec"), *steps(40))
    send(daemon, wire.encode_json(wire.KIND_RUN_END, {"pid": os.getpid(), "run_id": "run-rec", "exit_code": 0}))
    wait_for(lambda: daemon.store.runs["run-rec"].state == "closed")
    path = Path(daemon.store.runs["run-rec"].recording_path or "")
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM steps").fetchone()[0] == 40
    assert dict(conn.execute("SELECT key, value FROM meta").fetchall())["state"] == "closed"


def test_a_hello_refused_for_a_full_job_table_leaves_no_recording(profilerd_env: dict[str, str]) -> None:
    """The store comes first in the fan-out: what it refuses never reaches the recording."""
    config, _ = load()
    instance = Daemon(replace(config, max_jobs=1), RULES, gpu_backend=NoGpuBackend("no GPU in tests"))
    instance.start()
    try:
        send(instance, hello(run_id="run-kept", job="job-kept"), *steps(5))
        wait_for(lambda: instance.store.message_counts()[0].get("step") == 5)
        send(instance, hello(run_id="run-refused", job="job-refused"))
        wait_for(lambda: instance.store.message_counts()[1].get("bad_field") == 1)
    finally:
        instance.stop()
    assert "job-refused" not in instance.store.jobs
    assert recording_file(config.runs_dir, "run-kept").exists()
    assert not recording_file(config.runs_dir, "run-refused").exists()


def test_a_second_daemon_refuses_clearly(daemon: Daemon) -> None:
    config, _ = load()
    second = Daemon(config, RULES, gpu_backend=NoGpuBackend("test"))
    with pytest.raises(DaemonError, match="already running"):
        second.start()
    # the first one still works
    assert get(daemon, "/healthz")[0] == 200


def test_stale_socket_is_replaced(profilerd_env: dict[str, str]) -> None:
    config, _ = load()
    config.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(config.socket_path))
    stale.close()  # the file stays behind, as after a crash
    instance = Daemon(config, RULES, gpu_backend=NoGpuBackend("test"))
    instance.start()
    try:
        send(instance, hello(), *steps(2))
        wait_for(lambda: instance.store.received["step"] == 2)
    finally:
        instance.stop()


def _serve(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """A `profilerd serve` subprocess and the URL it serves on."""
    process = subprocess.Popen(
        [sys.executable, "-m", "profilerd", "serve", "--gpu", "none"], env=env, stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    line = process.stderr.readline()
    url = re.search(r"serving (http://[^/\s]+)", line)
    assert url, line
    return process, url.group(1)


def _received_steps(url: str) -> int:
    with urllib.request.urlopen(f"{url}/api/v1/status", timeout=5) as response:
        return json.load(response)["messages_received"].get("step", 0)


def _committed_steps(recording: Path) -> int:
    if not recording.exists():
        return 0
    with contextlib.closing(sqlite3.connect(recording)) as conn:
        try:
            return conn.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
        except sqlite3.OperationalError:  # the table is not there yet
            return 0


def test_sigterm_flushes_and_exits_zero(profilerd_env: dict[str, str]) -> None:
    process, url = _serve(profilerd_env)
    socket_path = Path(profilerd_env["XDG_RUNTIME_DIR"]) / "profilerd" / "ingest.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        for datagram in [hello(run_id="run-term"), *steps(25)]:
            sock.sendto(datagram, str(socket_path))
    wait_for(lambda: _received_steps(url) == 25, timeout=30)  # received, perhaps not yet committed
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0  # well inside systemd's default stop timeout (90 s)
    recording = Path(profilerd_env["PROFILERD_DATA_DIR"]) / "runs" / "run-term.sqlite"
    assert sqlite3.connect(recording).execute("SELECT COUNT(*) FROM steps").fetchone()[0] == 25
    assert not socket_path.exists()


def test_kill_9_leaves_a_readable_recording(profilerd_env: dict[str, str]) -> None:
    process, _ = _serve(profilerd_env)
    socket_path = Path(profilerd_env["XDG_RUNTIME_DIR"]) / "profilerd" / "ingest.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        for datagram in [hello(run_id="run-kill"), *steps(50)]:
            sock.sendto(datagram, str(socket_path))
    recording = Path(profilerd_env["PROFILERD_DATA_DIR"]) / "runs" / "run-kill.sqlite"
    wait_for(lambda: _committed_steps(recording) == 50, timeout=30)  # commits happen every 0.25 s
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=5)
    assert sqlite3.connect(recording).execute("SELECT COUNT(*) FROM steps").fetchone()[0] == 50
    # and a new daemon starts despite the stale socket and lock file
    again, _ = _serve(profilerd_env)
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=10) == 0
