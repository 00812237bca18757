"""Checks that need a real NVIDIA GPU: run with `python -m pytest -m gpu` on a GPU machine."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.gpu

NCCL_WORLD_OF_ONE = textwrap.dedent("""
    import os, time, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 10)).cuda())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    end = time.monotonic() + 6
    while time.monotonic() < end:
        x = torch.randn(256, 1024, device="cuda")
        loss = model(x).square().mean()
        opt.zero_grad(); loss.backward(); opt.step()
        t = torch.ones(1 << 20, device="cuda"); dist.all_reduce(t)
    dist.destroy_process_group()
""")


def test_nccl_collectives_get_device_time_without_syncs(profilerd_env, fast_rules: Path, short_tmp: Path) -> None:
    script = short_tmp / "nccl.py"
    script.write_text(NCCL_WORLD_OF_ONE)
    out = short_tmp / "nccl.json"
    result = run_cli(
        "run",
        "--rules",
        str(fast_rules),
        "--json",
        str(out),
        "--",
        sys.executable,
        str(script),
        env=profilerd_env,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert document["steps"] > 20
    config_note = json.dumps(document)
    assert "nccl_device_timing" not in config_note or '"off' not in config_note


def test_real_gpus_are_sampled(profilerd_env) -> None:
    result = run_cli("doctor", env=profilerd_env, timeout=60)
    assert result.returncode == 0
    assert "no-GPU" not in result.stdout


CUDA_FP32 = textwrap.dedent("""
    import time, torch
    model = torch.nn.Sequential(torch.nn.Linear(2048, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 2048)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randn(512, 2048, device="cuda")
    end = time.monotonic() + 6
    while time.monotonic() < end:
        loss = model(data).square().mean()
        opt.zero_grad(); loss.backward(); opt.step()
""")


def test_fp32_cuda_training_gets_amp_and_gpu_numbers(profilerd_env, fast_rules: Path, short_tmp: Path) -> None:
    script = short_tmp / "cuda_fp32.py"
    script.write_text(CUDA_FP32)
    out = short_tmp / "cuda.json"
    result = run_cli(
        "run",
        "--rules",
        str(fast_rules),
        "--json",
        str(out),
        "--",
        sys.executable,
        str(script),
        env=profilerd_env,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert document["gpu"]["gpu_count"] >= 1
    assert document["gpu"]["gpu_utilization_ratio"] > 0.3
    assert "amp.autocast" in {r["id"] for r in document["recommendations"]}
