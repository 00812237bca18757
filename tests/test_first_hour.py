"""The first hour, end to end: short, fast and broken jobs under `profilerd run`, default rules.

Each job runs for a few seconds at most and must get the right verdict: a 2-second data-starved
job, a 40 ms diverging one (named at its exact first non-finite step), a DDP job at ~200
steps/s per rank (live on /metrics and at the end), a loader that saturates the host, a loss
that runs away without a NaN, and a job at a learning rate of 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from profilerd.daemon import read_running_daemon
from tests.conftest import EXAMPLES, REPO, run_cli

pytestmark = pytest.mark.slow
needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")


def run_job(env: dict[str, str], out: Path, *cmd: str) -> tuple[dict[str, Any], str]:
    """`profilerd run --no-status --json OUT -- CMD`, as a user types it: the verdict and what the
    terminal showed (the job's output and profilerd's)."""
    result = run_cli("run", "--no-status", "--json", str(out), "--", *cmd, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout + result.stderr


def findings_of(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["rule"]: f for f in document["findings"]}


def all_recommendations(document: dict[str, Any]) -> set[str]:
    ids = {r["id"] for r in document["recommendations"] + document["minor_recommendations"]}
    return ids | {r["id"] for f in document["findings"] for r in f["recommendations"]}


def test_a_2_second_data_starved_job_is_data_bound(profilerd_env: dict[str, str], short_tmp: Path) -> None:
    document, output = run_job(
        profilerd_env,
        short_tmp / "data.json",
        sys.executable,
        str(EXAMPLES / "data_starved.py"),
        "--seconds",
        "2",
        "--channels",
        "16",
    )
    assert document["primary"] == "data", document["summary"]
    evidence = document["evidence"]
    assert evidence["steps"] >= 20 and evidence["seconds"] < 10
    assert evidence["basis"].startswith(f"{evidence['steps']} steps over ")
    assert "confidence" in output and "Not enough evidence" not in output


def test_a_40_ms_diverging_job_names_its_first_non_finite_step(profilerd_env: dict[str, str], short_tmp: Path) -> None:
    """The loss is read every early step, so the first NaN/inf is exact however short the run.

    The example counts the step itself, from losses it kept on the device (no sync)."""
    document, output = run_job(
        profilerd_env, short_tmp / "nan.json", sys.executable, str(EXAMPLES / "diverging.py"), "--steps", "50"
    )
    match = re.search(r"first non-finite loss at step (\d+)", output)
    assert match, output[-2000:]
    first = int(match.group(1))
    assert document["primary"] == "algorithm", document["summary"]
    finding = findings_of(document)["algorithm.loss_nonfinite"]
    assert finding["metrics"]["first_nonfinite_step"] == first
    assert f"first at step {first}" in finding["evidence"]
    assert document["recommendations"][0]["id"] == "convergence.nonfinite"


def train_at(env: dict[str, str], tmp: Path, lr: str) -> dict[str, Any]:
    """The learning-rate example for 2 s at ``lr``: its verdict."""
    command = (sys.executable, str(EXAMPLES / "learning_rate.py"), "--lr", lr, "--seconds", "2")
    return run_job(env, tmp / f"lr{lr}.json", *command)[0]


def test_a_runaway_finite_loss_is_an_algorithm_verdict(profilerd_env: dict[str, str], short_tmp: Path) -> None:
    """Adam at lr=3: the loss goes from ~2.3 to thousands and never becomes NaN."""
    document = train_at(profilerd_env, short_tmp, "3")
    assert document["primary"] == "algorithm", document["summary"]
    finding = findings_of(document)["algorithm.loss_diverging"]
    assert finding["metrics"]["loss_start"] == pytest.approx(2.3, abs=0.2)
    assert finding["metrics"]["ratio"] >= 10
    assert "algorithm.loss_nonfinite" not in findings_of(document)


def test_a_job_at_learning_rate_0_is_not_learning(profilerd_env: dict[str, str], short_tmp: Path) -> None:
    document = train_at(profilerd_env, short_tmp, "0")
    assert document["primary"] == "algorithm", document["summary"]
    finding = findings_of(document)["algorithm.loss_stuck"]
    assert "the learning rate is 0" in finding["evidence"]
    assert "algorithm.loss_plateau" not in findings_of(document)
    assert document["recommendations"][0]["id"] == "convergence.not_learning"


@pytest.mark.skipif((os.cpu_count() or 1) > 16, reason="saturating a larger host takes too many worker processes")
def test_a_loader_that_saturates_the_host_is_data_bound_without_more_workers(
    profilerd_env: dict[str, str], short_tmp: Path
) -> None:
    """A worker per core, each decoding for 6 ms of CPU per sample: no core is left for another."""
    workers = os.cpu_count() or 1
    document, _ = run_job(
        profilerd_env,
        short_tmp / "saturated.json",
        sys.executable,
        str(EXAMPLES / "data_starved.py"),
        "--seconds",
        "4",
        "--cpu-ms",
        "6",
        "--sleep-ms",
        "0",
        "--channels",
        "4",
        "--num-workers",
        str(workers),
    )
    assert document["primary"] == "data", document["summary"]
    assert "the input pipeline is CPU-bound" in document["summary"]
    ids = all_recommendations(document)
    assert "dataloader.num_workers" not in ids
    assert "dataloader.prefetch_factor" not in ids
    assert document["recommendations"][0]["id"] == "dataloader.cheaper_samples"


def live_verdicts(runtime_dir: Path, job_ended: subprocess.Popen[str], timeout_s: float) -> list[str]:
    """The categories the daemon's /metrics exported as the verdict while the job ran."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while job_ended.poll() is None and time.monotonic() < deadline:
        daemon = read_running_daemon(runtime_dir)
        if daemon is not None:
            try:
                url = f"http://{daemon['http_host']}:{daemon['http_port']}/metrics"
                with urllib.request.urlopen(url, timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                text = ""
            seen += re.findall(r'profilerd_verdict\{[^}]*category="(\w+)"[^}]*\} 1\.0', text)
        time.sleep(0.5)
    return seen


@needs_torchrun
def test_a_200_steps_per_second_ddp_job_is_communication_bound_live_and_at_the_end(
    profilerd_env: dict[str, str], short_tmp: Path
) -> None:
    """2 ranks on gloo with a tiny model and batch: all-reduce dominates, a step takes ~5 ms."""
    out = short_tmp / "ddp.json"
    command = [sys.executable, "-m", "profilerd", "run", "--no-status", "--json", str(out), "--"]
    command += ["torchrun", "--nproc-per-node", "2", str(EXAMPLES / "ddp_cpu.py"), "--seconds", "6"]
    command += ["--width", "256", "--batch-size", "2"]
    log = short_tmp / "ddp.log"
    with log.open("w") as sink:
        job = subprocess.Popen(command, env=profilerd_env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, text=True)
        try:
            seen = live_verdicts(Path(profilerd_env["XDG_RUNTIME_DIR"]) / "profilerd", job, timeout_s=120)
            job.wait(timeout=120)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    assert job.returncode == 0, log.read_text()[-3000:]
    assert "communication" in seen, seen  # the live verdict, exported while the job ran
    document = json.loads(out.read_text())
    assert document["primary"] == "communication", document["summary"]
    assert document["steps_per_s"] >= 100  # a fast job: its window is time, not 500 steps
