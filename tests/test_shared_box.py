"""Safe on a shared GPU box (issue 18): another local user cannot capture a run through a
runtime directory they created, cannot blind the daemon with idle connections, settings that
would break the daemon are refused at load, and damaged or newer recordings say so instead of
looking healthy. (Command-line secrets: tests/test_security.py.)"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pwd
import resource
import secrets
import selectors
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from profilerd.exporters.http import MAX_CONNECTIONS, MAX_WORKERS
from profilerd_probes.transport import DatagramSender
from tests.conftest import EXAMPLES, REPO, run_cli
from tests.fixtures.make_fixture import FIXTURE
from tests.reliability_helpers import Served, get_json, http_get, metrics, wait_for
from tests.test_attach import TARGET as ATTACH_TARGET
from tests.test_attach import logged_steps
from tests.test_attach import start as start_target
from tests.test_launch import STEPS
from tests.test_report import _corrupted, _truncated

ATTACKER_UID = 12345
SLOWLORIS_CONNECTIONS = 1000


# ---- a runtime directory another user created ---------------------------------------------------
@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path

    def command(self) -> list[str]:
        """A prefix that runs a command as this user. The one capability kept, to read and search
        any file, only lets it run this checkout's interpreter (under /root, mode 0700, on CI);
        it grants no write and no ownership, which is all the checks under test are about."""
        caps = "+dac_read_search"
        ids = [f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
        return ["setpriv", *ids, f"--inh-caps={caps}", f"--ambient-caps={caps}"]

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """The user's own environment: no XDG_RUNTIME_DIR (ssh without pam_systemd, Slurm), so the
        runtime directory is /tmp/profilerd-<uid>."""
        env = {k: v for k, v in base.items() if k not in ("XDG_RUNTIME_DIR", "TMPDIR")}
        env.update({"HOME": str(self.home), "PROFILERD_DATA_DIR": str(self.home / "data"), "USER": self.name})
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        return env


def _make_user(base: Path) -> User:
    name = f"pd{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name], check=True)
    entry = pwd.getpwnam(name)
    home = base / name
    home.mkdir(mode=0o700)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    return User(name, entry.pw_uid, entry.pw_gid, home)


def _processes_of(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    pids.append(int(name))
            except OSError:
                continue
    return pids


@pytest.fixture
def two_users(short_tmp: Path) -> Iterator[tuple[User, User]]:
    """Two fresh local users, A (the victim) and B (the other user of the box), removed after."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create two local users (CI runs as root)")
    if not (shutil.which("useradd") and shutil.which("userdel") and shutil.which("setpriv")):
        pytest.skip("needs useradd, userdel and setpriv (util-linux) to run commands as other users")
    os.chmod(short_tmp, 0o755)
    users: list[User] = []
    try:
        users = [_make_user(short_tmp), _make_user(short_tmp)]
        yield users[0], users[1]
    finally:
        for user in users:
            # A daemon started for runs lingers a moment after its last run: wait for it to leave.
            deadline = time.monotonic() + 15
            while _processes_of(user.uid) and time.monotonic() < deadline:
                time.sleep(0.1)
            for pid in _processes_of(user.uid):
                os.kill(pid, signal.SIGKILL)
            for path in [f"/tmp/profilerd-{user.uid}", *glob.glob(f"/tmp/profilerd-{user.uid}-*")]:
                shutil.rmtree(path, ignore_errors=True)
            subprocess.run(["userdel", user.name], check=False, capture_output=True)


def test_another_user_cannot_capture_a_run_through_a_runtime_directory_they_created(
    two_users: tuple[User, User], profilerd_env: dict[str, str]
) -> None:
    """Issue 18's capture: B creates /tmp/profilerd-<uid of A> open to all, runs B's own daemon
    there (accepting A's uid) and leaves its lock and address readable. A's run says, in one
    line, that it does not use that directory, is recorded by A's own daemon in a private one,
    and keeps the training's exit code; B's daemon receives nothing."""
    victim, other = two_users
    taken = Path(f"/tmp/profilerd-{victim.uid}")
    shutil.rmtree(taken, ignore_errors=True)
    taken.mkdir()
    os.chown(taken, other.uid, other.gid)
    os.chmod(taken, 0o777)
    b_env = other.env(profilerd_env) | {"PROFILERD_ALLOWED_UIDS": str(victim.uid)}
    trap = Served(b_env, "--gpu", "none", "--socket", str(taken / "ingest.sock"), as_user=other.command())
    try:
        os.chmod(taken, 0o777)  # B's daemon made it 0711; B opens it again, files readable
        for name in ("daemon.lock", "daemon.json"):
            os.chmod(taken / name, 0o644)
        script = victim.home / "train.py"
        script.write_text(STEPS)
        os.chown(script, victim.uid, victim.gid)
        verdict = victim.home / "verdict.json"
        result = subprocess.run(
            [*victim.command(), sys.executable, "-m", "profilerd", "run", "--no-status", "--json", str(verdict),
             "--", sys.executable, str(script), "30", "--api-key=SECRET"],
            env=victim.env(profilerd_env), cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        told = [line for line in result.stderr.splitlines() if str(taken) in line]
        assert len(told) == 1, result.stderr
        assert f"not using {taken}: {taken} belongs to uid {other.uid}" in told[0]
        private = told[0].rsplit("this run uses ", 1)[1].split()[0]
        assert private.startswith(f"/tmp/profilerd-{victim.uid}-")
        assert os.stat(private).st_uid == victim.uid and os.stat(private).st_mode & 0o777 == 0o700
        recording = Path(json.loads(verdict.read_text())["recording"])
        assert recording.is_relative_to(victim.home / "data")  # A's own daemon recorded it
        with sqlite3.connect(recording) as db:
            assert [row[0] for row in db.execute("SELECT step FROM steps ORDER BY step")] == list(range(1, 31))
        status = get_json(f"{trap.url}/api/v1/status")
        assert get_json(f"{trap.url}/api/v1/runs")["runs"] == [], "B's daemon heard of A's run"
        assert get_json(f"{trap.url}/api/v1/jobs")["jobs"] == []
        assert status["messages_received"] == {} and status["messages_dropped"] == {}, status
        assert not list((other.home / "data").glob("runs/*.sqlite")), "B's daemon recorded something"
    finally:
        assert trap.terminate() == 0, trap.stderr


def test_probes_never_send_to_a_socket_in_a_directory_others_can_write(short_tmp: Path) -> None:
    """A listening socket in a directory open to others (anyone could have put it there, or may
    replace it) gets nothing; the same socket in a private directory gets the message."""
    for mode, expected in ((0o777, None), (0o700, b"hello")):
        directory = short_tmp / f"mode-{mode:o}"
        directory.mkdir()
        os.chmod(directory, mode)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(str(directory / "ingest.sock"))
            listener.setblocking(False)
            sender = DatagramSender(directory / "ingest.sock")
            sender.send(b"hello")
            try:
                received = listener.recv(100)
            except BlockingIOError:
                received = None
            assert received == expected, mode
            assert (sender.refused is None) == (expected is not None)
            if expected is None:
                assert "is writable by other users" in (sender.refused or "")
                assert sender.held == 1  # kept, never raised into the training
            sender.close()


def _open_runtime_dir(profilerd_env: dict[str, str]) -> Path:
    """The env's runtime directory, created open to every user (mode 0777)."""
    taken = Path(profilerd_env["XDG_RUNTIME_DIR"]) / "profilerd"
    taken.mkdir()
    os.chmod(taken, 0o777)
    return taken


def test_tui_refuses_a_runtime_directory_others_can_write_in_one_line(profilerd_env: dict[str, str]) -> None:
    taken = _open_runtime_dir(profilerd_env)
    result = run_cli("tui", env=profilerd_env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[0] == (
        f"profilerd: error: not using {taken}: {taken} is writable by other users (mode 0777) "
        "(another user may have created it)"
    ), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb missing (needed to inject the probes)")
def test_attach_skips_a_runtime_directory_others_can_write_in_one_line(
    profilerd_env: dict[str, str], short_tmp: Path
) -> None:
    """`attach --inject-experimental` starts its daemon in a private directory instead, and the
    injected probes report there: the verdict comes from their steps (L2)."""
    taken = _open_runtime_dir(profilerd_env)
    script = short_tmp / "target.py"
    script.write_text(ATTACH_TARGET.format(examples=str(EXAMPLES), log=str(short_tmp / "target.log")))
    target = start_target(sys.executable, str(script), env=profilerd_env)
    try:
        logged_steps(short_tmp / "target.log", at_least=3)  # in the loop, as the injection test waits
        out = short_tmp / "attach.json"
        result = run_cli(
            "attach", str(target.pid), "--once", "--duration", "8", "--json", str(out),
            "--inject-experimental", "--no-stacks", "--rate=10", env=profilerd_env, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        told = [line for line in result.stderr.splitlines() if str(taken) in line]
        assert len(told) == 1 and "is writable by other users" in told[0] and "this run uses" in told[0], result.stderr
        document = json.loads(out.read_text())
        assert document["attach_layer"] == "L2", document["layers"]
        assert not (taken / "ingest.sock").exists()  # nothing was put in the open directory
    finally:
        target.kill()
        target.wait(timeout=10)


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
