"""Device-side step timing on a real CUDA device: run with `python -m pytest -m gpu` on a GPU machine.

Each test runs a small training script in a fresh interpreter with the probes installed and
reads the step records it sends (tests/probe_helpers.Receiver), as the daemon would.
"""

from __future__ import annotations

import statistics

import pytest

from profilerd_probes import wire
from tests.probe_helpers import Receiver, run_python, short_socket_dir, write_script

torch = pytest.importorskip("torch")
# Skipped, not left out, without CUDA: the tests still collect (`pytest -m gpu --collect-only`).
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PRELUDE = """
    import os, sys, time, torch
    import profilerd_probes
    assert profilerd_probes.install(os.environ["PROFILERD_SOCKET"])
    from torch import nn
    from torch.utils.data import DataLoader, Dataset
    torch.manual_seed(0)
"""

COMPUTE = (
    PRELUDE
    + """
    model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(8)]).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(2048, 4096, device="cuda")
    for i in range(60):
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ITEM:
            print(loss.item())
    torch.cuda.synchronize()
"""
)

STARVED = (
    PRELUDE
    + """
    class Slow(Dataset):
        def __len__(self): return 10_000
        def __getitem__(self, i):
            time.sleep(0.03)
            return torch.randn(256), torch.randint(0, 10, ())
    loader = DataLoader(Slow(), batch_size=None)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for i, (x, y) in enumerate(loader):
        loss = nn.functional.cross_entropy(model(x.cuda()[None]), y.cuda()[None])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i == 60:
            break
"""
)

NO_SYNC = (
    PRELUDE
    + """
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    x = torch.randn(512, 1024, device="cuda")
    y = torch.randint(0, 10, (512,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call from here on raises
    for i in range(80):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
"""
)


def _steps(source: str) -> tuple[list[wire.StepMessage], str]:
    directory = short_socket_dir()
    with Receiver(directory / "ingest.sock") as rx:
        script = write_script(directory, source)
        result = run_python([str(script)], rx.path, cwd=directory, timeout=300)
        rx.close()  # reads what is still queued
        steps = rx.steps()
    return steps, result.stderr


def _timed(steps: list[wire.StepMessage]) -> list[wire.StepMessage]:
    return [s for s in steps if s.flags & wire.FLAG_HAS_GPU_TIMING and s.step > 3]


@pytest.mark.parametrize("item", [False, True], ids=["async", "item-every-step"])
def test_a_compute_bound_job_is_busy_on_the_device(item: bool) -> None:
    steps, stderr = _steps(COMPUTE.replace("ITEM", str(item)))
    assert "profilerd:" not in stderr
    timed = _timed(steps)
    assert len(timed) >= 30, f"{len(timed)} of {len(steps)} steps carry device timing"
    busy_share = statistics.median(s.gpu_busy_s / s.step_s for s in timed)
    assert busy_share > 0.8
    for s in timed:
        assert s.gpu_busy_s == pytest.approx(s.gpu_forward_s + s.gpu_backward_s + s.gpu_optimizer_s)
        assert s.gpu_backward_s > s.gpu_forward_s  # backward does about twice the forward's work
    if item:
        assert statistics.median(s.host_ahead_s for s in timed) < 0.002


def test_a_data_starved_job_shows_the_device_idle_during_the_wait() -> None:
    steps, stderr = _steps(STARVED)
    assert "profilerd:" not in stderr
    timed = _timed(steps)
    assert len(timed) >= 30
    assert statistics.median(s.gpu_idle_data_wait_s / s.data_wait_s for s in timed) > 0.8
    assert statistics.median(s.gpu_idle_s / s.step_s for s in timed) > 0.8


def test_the_event_path_never_synchronises() -> None:
    """With torch's sync debug mode at "error", a synchronising call in the probe would raise,
    disable the probe and say so on stderr; the steps must carry device timing anyway."""
    steps, stderr = _steps(NO_SYNC)
    assert "profilerd:" not in stderr, stderr
    assert len(_timed(steps)) >= 40
