"""Device-side NCCL timing is armed only where NCCL can run, under the name torch reads."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from profilerd_probes.signals import NCCL_TIMING_ENV, arm_nccl_device_timing, flight_recorder_variable
from tests.conftest import run_cli


def fake_torch(cuda: str | None = "12.8", version: str = "2.13.0+cu128", initialized: bool = False) -> Any:
    dist = SimpleNamespace(is_available=lambda: True, is_initialized=lambda: initialized)
    return SimpleNamespace(version=SimpleNamespace(cuda=cuda), __version__=version, distributed=dist)


@pytest.mark.parametrize(
    ("version", "name"),
    [
        ("2.13.0+cu128", "TORCH_FR_BUFFER_SIZE"),
        ("2.9.1", "TORCH_FR_BUFFER_SIZE"),
        ("2.8.0+cu126", "TORCH_NCCL_TRACE_BUFFER_SIZE"),
        ("2.5.1", "TORCH_NCCL_TRACE_BUFFER_SIZE"),
        ("nightly", "TORCH_FR_BUFFER_SIZE"),
    ],
)
def test_flight_recorder_variable_follows_the_torch_version(version: str, name: str) -> None:
    assert flight_recorder_variable(version) == name


def test_a_gpu_rank_under_profilerd_run_gets_timing_and_the_flight_recorder() -> None:
    environ = {NCCL_TIMING_ENV: "1"}
    assert arm_nccl_device_timing(fake_torch(), environ, nvidia_devices=True) == "TORCH_FR_BUFFER_SIZE"
    assert environ["TORCH_NCCL_ENABLE_TIMING"] == "1"
    assert environ["TORCH_FR_BUFFER_SIZE"] == "2000"
    assert "TORCH_NCCL_TRACE_BUFFER_SIZE" not in environ  # setting both makes torch warn


@pytest.mark.parametrize(
    ("torch", "environ", "devices"),
    [
        (fake_torch(cuda=None, version="2.13.0+cpu"), {NCCL_TIMING_ENV: "1"}, True),  # CPU build
        (fake_torch(), {NCCL_TIMING_ENV: "1"}, False),  # no NVIDIA device on this node
        (fake_torch(), {}, True),  # probes installed by hand, not by `profilerd run`
        (fake_torch(), {NCCL_TIMING_ENV: "0"}, True),  # the user turned it off
        (fake_torch(initialized=True), {NCCL_TIMING_ENV: "1"}, True),  # too late (attach)
    ],
)
def test_nothing_is_armed_where_nccl_cannot_be_timed(torch: Any, environ: dict[str, str], devices: bool) -> None:
    before = dict(environ)
    assert arm_nccl_device_timing(torch, environ, nvidia_devices=devices) is None
    assert environ == before


def test_the_users_own_flight_recorder_size_wins() -> None:
    environ = {NCCL_TIMING_ENV: "1", "TORCH_NCCL_TRACE_BUFFER_SIZE": "50"}
    assert arm_nccl_device_timing(fake_torch(), environ, nvidia_devices=True) is None
    assert environ == {NCCL_TIMING_ENV: "1", "TORCH_NCCL_TRACE_BUFFER_SIZE": "50", "TORCH_NCCL_ENABLE_TIMING": "1"}


def test_profilerd_run_on_a_cpu_only_machine_leaves_the_flight_recorder_off(
    profilerd_env: dict[str, str], short_tmp: Path
) -> None:
    """On CPU-only nodes the job's gloo collectives must not run with torch's flight recorder."""
    script = short_tmp / "env_after_torch.py"
    script.write_text(
        textwrap.dedent("""
            import json, os, sys
            import torch
            import profilerd_probes as probes
            names = ("TORCH_NCCL_ENABLE_TIMING", "TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")
            print(json.dumps({"installed": probes.installed(), "set": [n for n in names if n in os.environ]}))
        """)
    )
    result = run_cli("run", "--no-status", "--", "python", str(script), env=profilerd_env, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert seen == {"installed": True, "set": []}
    assert "deprecated" not in result.stderr
