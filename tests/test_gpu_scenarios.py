"""Issue #15's scenarios as real training jobs on CUDA: `profilerd run` classifies each one from
the device's clock. Run with `python -m pytest -m gpu` on a GPU machine (about 40 s in all);
without CUDA the module is skipped, and it still collects (`pytest -m gpu --collect-only`).

The same scenarios run on the simulated device in CI (tests/test_gpu_analysis.py); these check
that a real stream behaves as the simulation says.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli

torch = pytest.importorskip("torch")
# Skipped, not left out, without CUDA: the tests still collect (`pytest -m gpu --collect-only`).
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Every job trains for SECONDS of wall time, so each test takes about as long on any GPU.
PRELUDE = """
    import sys, time, torch
    from torch import nn
    torch.manual_seed(0)
    SECONDS = 6.0  # of training, counted from the end of the set-up (CUDA's start-up included)
"""

SCRIPTS = {
    # A loader that sleeps 25 ms per batch in the training process; a small model.
    "data_starved": """
    from torch.utils.data import DataLoader, Dataset
    class Slow(Dataset):
        def __len__(self): return 100_000
        def __getitem__(self, i):
            time.sleep(0.025)
            return torch.randn(64, 512), torch.randint(0, 10, (64,))
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    end = time.monotonic() + SECONDS
    for x, y in DataLoader(Slow(), batch_size=None):
        loss = nn.functional.cross_entropy(model(x.cuda()), y.cuda())
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        if time.monotonic() > end:
            break
""",
    # Large fp32 matmuls, launched far ahead of the device; with ``_item`` the loss is printed
    # every step: the host blocks in .item() while the GPU works.
    **{
        f"compute_bound{suffix}": f"""
    model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(8)]).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    x = torch.randn(2048, 4096, device="cuda")
    end = time.monotonic() + SECONDS
    while time.monotonic() < end:
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        {print_loss}
"""
        for suffix, print_loss in (("", "pass"), ("_item", "print(loss.item(), file=sys.stderr)"))
    },
    # Hundreds of tiny kernels per step: the GPU waits for Python to launch them.
    "launch_bound": """
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.ReLU()) for _ in range(60)]).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=False)
    x = torch.randn(8, 32, device="cuda")
    end = time.monotonic() + SECONDS
    while time.monotonic() < end:
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
""",
}


def _profile(name: str, env: dict[str, str], rules: Path, directory: Path) -> dict[str, Any]:
    """`profilerd run --json` of the scenario's training script: the run's verdict document."""
    script = directory / f"{name}.py"
    script.write_text(textwrap.dedent(PRELUDE) + textwrap.dedent(SCRIPTS[name]))
    out = directory / f"{name}.json"
    result = run_cli(
        "run", "--rules", str(rules), "--json", str(out), "--", sys.executable, str(script), env=env, timeout=180
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    device = document.get("device")
    assert device is not None, "no step carried device timing"
    assert device["steps_timed"] >= 0.9 * document["steps"], device  # short runs are timed too
    return document


def test_a_data_starved_job_is_data_bound_with_the_gpu_idle_in_the_wait(
    profilerd_env: dict[str, str], fast_rules: Path, short_tmp: Path
) -> None:
    document = _profile("data_starved", profilerd_env, fast_rules, short_tmp)
    assert document["primary"] == "data", document["summary"]
    assert document["device"]["idle_data_wait_fraction"] > 0.7


@pytest.mark.parametrize("name", ["compute_bound", "compute_bound_item"])
def test_a_compute_bound_job_is_compute_with_or_without_loss_item(
    name: str, profilerd_env: dict[str, str], fast_rules: Path, short_tmp: Path
) -> None:
    document = _profile(name, profilerd_env, fast_rules, short_tmp)
    assert document["primary"] == "compute", document["summary"]
    assert document["device"]["busy_fraction"] > 0.85
    assert not document["device"]["busy_is_lower_bound"]


def test_a_launch_bound_job_is_host_overhead_not_compute(
    profilerd_env: dict[str, str], fast_rules: Path, short_tmp: Path
) -> None:
    document = _profile("launch_bound", profilerd_env, fast_rules, short_tmp)
    assert document["primary"] == "algorithm", document["summary"]
    device = document["device"]
    assert device["busy_fraction"] < 0.3 and device["host_ahead_s_p50"] < 1e-3
    overhead = next(f for f in document["findings"] if f["rule"] == "algorithm.host_overhead")
    assert "launch-bound" in overhead["evidence"]
