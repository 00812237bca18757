"""Faults: the daemon killed and restarted under a live training job, the training process
killed, a GPU lost, the disk full while recording, and kill -9 of the daemon.

One training process lives through the first three (it is the slow part): daemon A sees its
first steps and is killed with SIGKILL; the job trains on without it; daemon B starts, the
probes find it and the run goes on in the same recording; then the training process is
killed and B closes the run as aborted.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from profilerd_probes import wire
from profilerd_probes.transport import RECONNECT_INTERVAL_S
from tests.conftest import REPO, run_cli
from tests.reliability_helpers import Served, get_json, hello, metrics, send, send_as, step_batch, wait_for
from tests.wire_helpers import step_datagram

pytestmark = pytest.mark.slow

JOB, RUN = "fault-job", "fault-run"
FAST_DAEMON = "[daemon]\nhost_interval_s = 0.25\nanalysis_interval_s = 0.5\n"

TRAIN = textwrap.dedent("""
    import json, os, signal, sys, time
    import torch
    import profilerd_probes as probes, profilerd_probes.core

    torch.set_num_threads(1)
    assert probes.install()
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(32, 256)
    phases = os.environ["PHASE_DIR"]
    log = open(os.path.join(phases, "steps.log"), "w", buffering=1)
    sender = probes.core.active().sender
    phase, i, entered = "up", 0, {}
    while phase != "stop":
        i += 1
        if i % 10 == 0:
            for name in ("stop", "back", "down"):
                if os.path.exists(os.path.join(phases, name)):
                    if name != phase:
                        entered[name] = (time.monotonic(), sender.connect_attempts)
                    phase = name
                    break
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        log.write(f"{phase}\\n")
        time.sleep(0.001)
    summary = {"steps": i, "installed": probes.installed(), "dropped": dict(sender.dropped), "entered": entered}
    print(json.dumps(summary), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the training process is killed mid-run
""")


def private_env(root: Path) -> dict[str, str]:
    """What the profilerd_env fixture gives a test, for a module-scoped scenario."""
    runtime = root / "run"
    runtime.mkdir(mode=0o700)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PROFILERD_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    config = root / "profilerd.toml"
    config.write_text(FAST_DAEMON)
    env.update(
        XDG_RUNTIME_DIR=str(runtime),
        PROFILERD_DATA_DIR=str(root / "data"),
        PROFILERD_HTTP_PORT="0",
        PROFILERD_CONFIG=str(config),
        PYTHONUNBUFFERED="1",
    )
    return env


def job_steps(url: str) -> int:
    document = get_json(f"{url}/api/v1/jobs/{JOB}?steps=0")
    return int(document["steps_total"]) if document else 0


@dataclass
class FaultRun:
    root: Path
    env: dict[str, str]
    seen_by_a: int = 0
    a_killed_unix_s: float = 0.0
    resumed_after_s: float = 0.0
    seen_by_b: int = 0
    trainer_returncode: int | None = None
    trainer_stdout: str = ""
    trainer_stderr: str = ""
    steps_by_phase: Counter[str] = field(default_factory=Counter)
    run_state: dict[str, Any] = field(default_factory=dict)
    aborted_after_kill_s: float = 0.0
    b_exit_code: int | None = None
    b_stderr: str = ""


@pytest.fixture(scope="module")
def fault_run() -> Iterator[FaultRun]:
    root = Path(tempfile.mkdtemp(prefix="pd-", dir="/tmp"))
    env = private_env(root)
    phases = root / "phases"
    phases.mkdir()
    script = root / "train.py"
    script.write_text(TRAIN)
    result = FaultRun(root, env)
    trainer_env = dict(env, PHASE_DIR=str(phases), PROFILERD_JOB_ID=JOB, PROFILERD_RUN_ID=RUN, PYTHONPATH=str(REPO))
    a = Served(env, "--gpu", "none")
    b: Served | None = None
    trainer = subprocess.Popen(
        [sys.executable, str(script)], env=trainer_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        result.seen_by_a = wait_for(lambda: (n := job_steps(a.url)) >= 200 and n, timeout=60, what="steps at A")
        result.a_killed_unix_s = time.time()
        a.kill()  # SIGKILL: no flush, no goodbye
        (phases / "down").touch()
        log = phases / "steps.log"
        wait_for(lambda: log.read_text().count("down") >= 300, timeout=30, what="steps without a daemon")
        b = Served(env, "--gpu", "none")
        ready = time.monotonic()
        (phases / "back").touch()
        wait_for(lambda: job_steps(b.url) > 0, timeout=10, interval=0.01, what="steps at B")
        result.resumed_after_s = time.monotonic() - ready
        result.seen_by_b = wait_for(lambda: (n := job_steps(b.url)) >= 100 and n, timeout=30, what="steps at B")
        (phases / "stop").touch()
        result.trainer_stdout, result.trainer_stderr = trainer.communicate(timeout=30)
        killed = time.monotonic()
        result.trainer_returncode = trainer.returncode
        url = b.url
        result.run_state = wait_for(
            lambda: (run := get_json(f"{url}/api/v1/runs/{RUN}")) and run["state"] == "aborted" and run,
            timeout=20,
            what="run closed as aborted",
        )
        result.aborted_after_kill_s = time.monotonic() - killed
        result.steps_by_phase = Counter(log.read_text().split())
        result.b_exit_code = b.terminate()
        result.b_stderr = b.stderr
        yield result
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        for daemon in (a, b):
            if daemon is not None and daemon.process.poll() is None:
                daemon.kill()
        shutil.rmtree(root, ignore_errors=True)


def recording(run: FaultRun) -> sqlite3.Connection:
    return sqlite3.connect(Path(run.env["PROFILERD_DATA_DIR"]) / "runs" / f"{RUN}.sqlite")


def test_training_carries_on_without_exception_when_the_daemon_is_killed(fault_run: FaultRun) -> None:
    summary = json.loads(fault_run.trainer_stdout.strip().splitlines()[-1])
    assert summary["installed"] is True  # the probe never disabled itself
    assert summary["dropped"].get("daemon_absent", 0) > 0  # it noticed, counted, and carried on
    assert fault_run.trainer_stderr == ""  # no exception, no warning
    assert fault_run.steps_by_phase["down"] >= 300


def test_a_missing_daemon_costs_a_connect_attempt_per_interval_not_per_step(fault_run: FaultRun) -> None:
    """Why training does not slow down without a daemon: the probe retries on a clock, never
    per step, and otherwise only counts the drop. (The CPU cost per step, daemon gone versus
    there, is measured side by side in benchmarks/bench_probe_overhead.py.)"""
    summary = json.loads(fault_run.trainer_stdout.strip().splitlines()[-1])
    (down_at, attempts_at_down), (back_at, attempts_at_back) = summary["entered"]["down"], summary["entered"]["back"]
    attempts = attempts_at_back - attempts_at_down
    allowed = (back_at - down_at) / RECONNECT_INTERVAL_S + 2
    assert 1 <= attempts <= allowed, (attempts, allowed)
    assert fault_run.steps_by_phase["down"] > 10 * attempts  # hundreds of steps, a handful of attempts


def test_probes_resume_within_2_s_of_a_daemon_restart(fault_run: FaultRun) -> None:
    assert fault_run.resumed_after_s < 2.0


def test_the_run_continues_in_the_same_recording(fault_run: FaultRun) -> None:
    conn = recording(fault_run)
    rows = conn.execute("SELECT step, end_unix_s FROM steps ORDER BY step").fetchall()
    steps = [step for step, _ in rows]
    sessions = conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
    assert sessions == 2  # the hello to A, and the hello to B
    from_a = [(step, end) for step, end in rows if end < fault_run.a_killed_unix_s]
    assert [step for step, _ in from_a] == list(range(1, len(from_a) + 1))  # no hole
    assert fault_run.a_killed_unix_s - from_a[-1][1] <= 1.0  # kill -9 of A lost at most ~1 s
    after = [step for step in steps if step > fault_run.seen_by_a + 300]  # past those sent with no daemon
    assert len(after) >= fault_run.seen_by_b  # everything B heard is there
    assert len(steps) == len(set(steps))  # nothing twice


def test_a_killed_training_process_closes_its_run_as_aborted(fault_run: FaultRun) -> None:
    assert fault_run.trainer_returncode == -signal.SIGKILL
    assert fault_run.run_state["state"] == "aborted"
    meta = dict(recording(fault_run).execute("SELECT key, value FROM meta").fetchall())
    assert meta["state"] == "aborted"
    assert fault_run.b_exit_code == 0


def test_the_aborted_recording_is_reportable(fault_run: FaultRun) -> None:
    result = run_cli("report", RUN, "--format", "json", env=fault_run.env, timeout=60)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert RUN in json.dumps(document)


# ---- kill -9 -----------------------------------------------------------------------------------------
def test_kill_9_loses_at_most_about_the_last_second(profilerd_env: dict[str, str]) -> None:
    daemon = Served(profilerd_env, "--gpu", "none")
    path = Path(profilerd_env["XDG_RUNTIME_DIR"]) / "profilerd" / "ingest.sock"
    stop = threading.Event()
    sent: list[float] = []

    def stream() -> None:  # 200 steps/s, each stamped with the time it was sent
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(hello(job="k", run_id="run-k9"), str(path))
            seq = 0
            while not stop.is_set():
                seq += 1
                now = time.time()
                with contextlib.suppress(OSError):  # the daemon is gone at the end
                    step = step_datagram(pid=os.getpid(), seq=seq, step=seq, end_unix_s=now, step_s=0.005)
                    sock.sendto(step, str(path))
                    sent.append(now)
                time.sleep(0.005)

    sender = threading.Thread(target=stream)
    sender.start()
    try:
        wait_for(lambda: len(sent) >= 400, timeout=30)
        killed_at = time.time()
        daemon.kill()
    finally:
        stop.set()
        sender.join()
    conn = sqlite3.connect(Path(profilerd_env["PROFILERD_DATA_DIR"]) / "runs" / "run-k9.sqlite")
    recorded = [t for (t,) in conn.execute("SELECT end_unix_s FROM steps ORDER BY end_unix_s")]
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    lost_s = killed_at - max(recorded)
    assert lost_s <= 1.0, lost_s
    assert len(recorded) == len([t for t in sent if t <= max(recorded)])  # no hole before the end


# ---- a GPU lost mid-run -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler (cc) to build the simulated NVML library")
    from profilerd.gpu.simnvml import build_library

    return build_library(tmp_path_factory.mktemp("simnvml"))


def test_a_lost_gpu_leaves_the_other_gpus_and_the_probes_working(
    profilerd_env: dict[str, str], sim_library: Path, short_tmp: Path
) -> None:
    from profilerd.gpu.simnvml import Scenario

    # GPU 0 stops answering (NVML_ERROR_GPU_IS_LOST) after its first samples, for good.
    scenario = Scenario(gpus=[{"lost_after_calls": 150}, {}]).write(short_tmp / "scenario.txt")
    config = short_tmp / "gpu.toml"
    config.write_text("[daemon]\ngpu_interval_s = 0.1\n")
    env = dict(
        profilerd_env,
        PROFILERD_NVML_LIBRARY=str(sim_library),
        SIMNVML_SCENARIO=str(scenario),
        PROFILERD_CONFIG=str(config),
    )
    daemon = Served(env)
    path = Path(env["XDG_RUNTIME_DIR"]) / "profilerd" / "ingest.sock"
    try:
        send(path, hello(job="g", run_id="g"), step_batch(1, 10))

        def gpus() -> dict[int, dict[str, Any]]:
            return {g["index"]: g for g in get_json(f"{daemon.url}/api/v1/gpus")["gpus"]}

        wait_for(lambda: gpus().get(0, {}).get("lost"), timeout=20, what="GPU 0 lost")
        lost_at = gpus()[1]["ts_unix_s"]
        send(path, step_batch(11, 10))  # the probes go on
        wait_for(lambda: gpus()[1]["ts_unix_s"] >= lost_at + 0.5, timeout=10, what="GPU 1 still sampled")
        after = gpus()
        assert after[0]["lost"] and after[0]["utilization_gpu_ratio"] is None
        assert not after[1]["lost"] and after[1]["utilization_gpu_ratio"] is not None
        series = metrics(daemon.url)
        assert series['profilerd_probe_messages_received_total{kind="step"}'] == 20
        assert series['profilerd_sampler_errors_total{sampler="gpu"}'] == 0
        assert any(k.startswith('profilerd_gpu_lost{gpu="0"') and v == 1 for k, v in series.items())
        assert any(k.startswith('profilerd_gpu_utilization_ratio{gpu="1"') for k in series)
        assert not any(k.startswith('profilerd_gpu_utilization_ratio{gpu="0"') for k in series)
        assert daemon.terminate() == 0
    finally:
        if daemon.process.poll() is None:
            daemon.kill()


# ---- disk full while recording -------------------------------------------------------------------------
class FullDisk:
    """A small file system for the recordings that a test can fill up and free again.

    A real tmpfs of 4 MiB when this process may mount one; otherwise the daemon's own file size
    limit (RLIMIT_FSIZE through prlimit), which makes its writes fail with EFBIG the same way.
    """

    def __init__(self, root: Path) -> None:
        self.mount = root / "disk"
        self.mount.mkdir()
        self.filler = self.mount / "filler"
        self.mounted = False
        self.pid: int | None = None
        if os.geteuid() == 0 and shutil.which("mount"):
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(self.mount)],
                capture_output=True,
            )
            self.mounted = done.returncode == 0

    def attach(self, pid: int) -> None:
        self.pid = pid

    def fill(self) -> None:
        if not self.mounted:
            assert self.pid is not None
            wal = max((p.stat().st_size for p in self.mount.rglob("*.sqlite-wal")), default=0)
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (wal, resource.RLIM_INFINITY))
            return
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for chunk in (65536, 4096, 512, 1):
                with contextlib.suppress(OSError):  # ENOSPC ends each size
                    while os.write(fd, b"\0" * chunk):
                        pass
        finally:
            os.close(fd)
        assert os.statvfs(self.mount).f_bavail == 0

    def free(self) -> None:
        if not self.mounted:
            assert self.pid is not None
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            return
        self.filler.unlink()

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)


def test_a_full_disk_pauses_recording_and_the_live_view_carries_on(
    profilerd_env: dict[str, str], short_tmp: Path
) -> None:
    disk = FullDisk(short_tmp)
    env = dict(profilerd_env, PROFILERD_DATA_DIR=str(disk.mount / "data"))
    daemon = Served(env, "--gpu", "none")
    disk.attach(daemon.process.pid)
    path = Path(env["XDG_RUNTIME_DIR"]) / "profilerd" / "ingest.sock"
    runs = disk.mount / "data" / "runs"
    sent = 0

    def send_steps(count: int) -> None:
        nonlocal sent
        for _ in range(count // 10):
            send(path, step_batch(sent + 1, 10))
            sent += 10

    def status() -> dict[str, Any]:
        return get_json(f"{daemon.url}/api/v1/status")

    def steps_live() -> float:
        return metrics(daemon.url).get('profilerd_step_duration_seconds_count{job="d",rank="0"}', 0.0)

    try:
        send(path, hello(job="d", run_id="disk-run"))
        send_steps(100)
        wait_for(lambda: (runs / "disk-run.sqlite-wal").exists() and steps_live() == 100, timeout=10)
        time.sleep(0.6)  # committed
        disk.fill()
        send_steps(100)
        paused = wait_for(lambda: status()["recording_paused"], timeout=10, what="recording paused")
        assert "disk-run" in paused
        assert metrics(daemon.url)["profilerd_recording_paused"] == 1
        wait_for(lambda: "recording paused" in daemon.stderr, timeout=5)
        assert "recording resumes when there is room again" in daemon.stderr
        # the live view carries on: metrics and API see every step, and a new run can start
        send_steps(100)
        assert send_as(os.getuid(), path, lambda pid: [hello(pid, job="late", run_id="late-run")]) == 0
        wait_for(lambda: steps_live() == 300, timeout=10, what="live steps while paused")
        assert get_json(f"{daemon.url}/api/v1/jobs/d?steps=0")["steps_total"] == 300
        disk.free()
        wait_for(lambda: status()["recording_paused"] is None, timeout=10, what="recording resumed")
        assert "recording resumed" in daemon.stderr
        assert metrics(daemon.url)["profilerd_recording_paused"] == 0
        send(path, wire.encode_json(wire.KIND_RUN_END, {"pid": os.getpid(), "run_id": "disk-run", "exit_code": 0}))
        wait_for(lambda: get_json(f"{daemon.url}/api/v1/runs/disk-run")["state"] == "closed", timeout=10)
        assert daemon.terminate() == 0
        conn = sqlite3.connect(runs / "disk-run.sqlite")
        assert conn.execute("SELECT COUNT(*) FROM steps").fetchone()[0] == 300  # nothing lost
        assert dict(conn.execute("SELECT key, value FROM meta").fetchall())["state"] == "closed"
        late = dict(sqlite3.connect(runs / "late-run.sqlite").execute("SELECT key, value FROM meta").fetchall())
        assert late["job"] == "late"  # a run started while paused keeps its metadata
    finally:
        if daemon.process.poll() is None:
            daemon.kill()
        disk.close()


def test_recorder_keeps_every_row_and_the_run_metadata_through_a_failed_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that fails after the file was opened (here: a broken statement standing in for
    the disk filling up mid-transaction) must keep the run's metadata and rows for the retry."""
    from profilerd.model import StepRecord
    from profilerd.recordings import schema, writer

    monkeypatch.setattr(writer, "RETRY_INTERVAL_S", 0.1)
    states: list[str | None] = []
    recorder = writer.Recorder(tmp_path, on_status=states.append)
    recorder.start()
    try:
        broken = dict(writer.INSERTS, steps="INSERT INTO no_such_table VALUES (?)")
        monkeypatch.setattr(writer, "INSERTS", broken)
        recorder.start_run("r", {"job": "j", "hostname": "h"})
        for i in range(50):
            recorder.step("r", StepRecord("j", 0, 1, i, 1.0 + i, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0))
        wait_for(lambda: recorder.paused_reason, timeout=5)
        monkeypatch.undo()
        wait_for(lambda: recorder.paused_reason is None and recorder.rows_written == 50, timeout=5)
    finally:
        recorder.stop()
    assert states[0] and "no_such_table" in states[0] and states[-1] is None
    conn = sqlite3.connect(schema.recording_file(tmp_path, "r"))
    assert conn.execute("SELECT COUNT(*) FROM steps").fetchone()[0] == 50
    assert dict(conn.execute("SELECT key, value FROM meta").fetchall())["job"] == "j"
