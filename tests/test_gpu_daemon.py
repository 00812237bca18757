"""The daemon in a subprocess against the simulated NVML library: metrics, rank attribution,
unsupported fields left out, `profilerd doctor`, and the GPU findings in a verdict."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from profilerd.gpu.simnvml import GIB, Scenario, build_library
from profilerd_probes import wire
from tests.conftest import run_cli
from tests.wire_helpers import step_datagram


def gpu_step(pid: int, i: int, now: float) -> bytes:
    """Step i + 1 of a 0.1 s step, ending in the last 3 seconds."""
    return step_datagram(
        pid=pid,
        seq=i + 1,
        step=i + 1,
        end_unix_s=now - 3 + 0.1 * i,
        step_s=0.1,
        data_wait_s=0.01,
        forward_s=0.03,
        backward_s=0.05,
        optimizer_s=0.01,
    )


@pytest.fixture(scope="module")
def sim_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler (cc) to build the simulated NVML library")
    return build_library(tmp_path_factory.mktemp("simnvml"))


@pytest.fixture
def gpu_env(profilerd_env: dict[str, str], sim_library: Path, short_tmp: Path) -> dict[str, str]:
    scenario = Scenario(
        gpus=[
            {"util_gpu": 3, "mem_used": 79 * 2**30, "clock_reasons": 0x20, "sm_clock": 990},  # idle, full, hot
            {"not_supported": "nvmlDeviceGetPowerUsage"},
        ],
        processes=[(0, os.getpid(), 2 * GIB, 40)],  # this test process stands in for rank 0
    )
    path = scenario.write(short_tmp / "scenario.txt")
    return dict(profilerd_env, PROFILERD_NVML_LIBRARY=str(sim_library), SIMNVML_SCENARIO=str(path))


@pytest.fixture
def gpu_daemon(gpu_env: dict[str, str]) -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "profilerd", "serve"], env=gpu_env, stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    line = process.stderr.readline()
    assert "serving http://" in line and "no-GPU" not in line, line
    url = line.split("serving ")[1].split("/metrics")[0]
    try:
        yield url
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        return response.read().decode()


def wait_for_text(url: str, needles: list[str], timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = scrape(url)
        if all(n in text for n in needles):
            return text
        time.sleep(0.2)
    missing = [n for n in needles if n not in text]
    raise AssertionError(f"missing from /metrics: {missing}")


def test_gpu_metrics_and_rank_attribution(gpu_daemon: str, gpu_env: dict[str, str]) -> None:
    sock_path = Path(gpu_env["XDG_RUNTIME_DIR"]) / "profilerd" / "ingest.sock"
    pid = os.getpid()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        hello = {"pid": pid, "job": "gpujob", "run_id": "gpu-run", "rank": 0, "world_size": 1}
        sock.sendto(wire.encode_json(wire.KIND_HELLO, hello), str(sock_path))
        now = time.time()
        for i in range(30):
            sock.sendto(gpu_step(pid, i, now), str(sock_path))
    text = wait_for_text(
        gpu_daemon,
        [
            'profilerd_gpu_utilization_ratio{gpu="0"',
            'profilerd_rank_gpu_info{gpu="0",job="gpujob",rank="0"',
            'profilerd_rank_gpu_memory_used_bytes{gpu="0",job="gpujob",rank="0"} 2.147483648e+09',
            'profilerd_gpu_clock_event_reason{gpu="0",reason="sw_thermal"',
            "profilerd_gpu_sampling_available 1.0",
        ],
    )
    assert 'profilerd_gpu_power_watts{gpu="0"' in text
    assert 'profilerd_gpu_power_watts{gpu="1"' not in text  # NotSupported: left out, not 0
    assert "NaN" not in text
    assert 'profilerd_rank_gpu_info{gpu="1"' not in text  # rank 0 holds no memory on GPU 1


def test_doctor_prints_the_capability_matrix(gpu_env: dict[str, str]) -> None:
    result = run_cli("doctor", env=gpu_env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "570.124.06" in result.stdout  # the driver version
    assert "H100" in result.stdout


def test_doctor_without_a_driver_says_why(profilerd_env: dict[str, str], short_tmp: Path) -> None:
    env = dict(profilerd_env, PROFILERD_NVML_LIBRARY=str(short_tmp / "missing" / "libnvidia-ml.so.1"))
    result = run_cli("doctor", env=env, timeout=60)
    assert result.returncode == 0
    assert "no" in result.stdout.lower() and "gpu" in result.stdout.lower()


def test_gpu_events_are_recorded_in_the_run_and_reported(
    profilerd_env: dict[str, str], sim_library: Path, short_tmp: Path
) -> None:
    """An XID error during a run reaches the run's recording and its report, not only /metrics."""
    scenario = Scenario(gpus=[{}, {}], xids=[(1, 79, 2500)]).write(short_tmp / "scenario.txt")
    env = dict(profilerd_env, PROFILERD_NVML_LIBRARY=str(sim_library), SIMNVML_SCENARIO=str(scenario))
    process = subprocess.Popen([sys.executable, "-m", "profilerd", "serve"], env=env, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    try:
        line = process.stderr.readline()
        assert "serving http://" in line, line
        url = line.split("serving ")[1].split("/metrics")[0]
        sock_path = Path(env["XDG_RUNTIME_DIR"]) / "profilerd" / "ingest.sock"
        pid = os.getpid()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            hello = {"pid": pid, "job": "xidjob", "run_id": "xid-run", "rank": 0, "world_size": 1}
            sock.sendto(wire.encode_json(wire.KIND_HELLO, hello), str(sock_path))
            now = time.time()
            for i in range(30):
                sock.sendto(gpu_step(pid, i, now), str(sock_path))
        wait_for_text(url, ['profilerd_gpu_events_total{gpu="1"'], timeout=20)
        time.sleep(0.6)  # past the recorder's next commit (every 0.25 s)
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
    recording = Path(env["PROFILERD_DATA_DIR"]) / "runs" / "xid-run.sqlite"
    rows = sqlite3.connect(recording).execute("SELECT kind, detail FROM events WHERE kind = 'xid'").fetchall()
    assert len(rows) == 1
    detail = json.loads(rows[0][1])
    assert detail["gpu_index"] == 1 and "Xid 79" in detail["detail"] and detail["uuid"]
    report = run_cli("report", "xid-run", "--format", "md", env=env, timeout=60)
    assert report.returncode == 0, report.stderr
    assert "Xid 79" in report.stdout
