"""Real CPU workloads under `profilerd run`: convergence, syncs, communication, stragglers."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLES, run_cli

needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")


def run_example(env: dict[str, str], rules: Path, out: Path, *cmd: str) -> dict[str, Any]:
    result = run_cli("run", "--rules", str(rules), "--json", str(out), "--", *cmd, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def rules_of(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["rule"]: f for f in document["findings"]}


def test_learning_rate_too_high_is_an_algorithm_verdict(profilerd_env, fast_rules: Path, short_tmp: Path) -> None:
    document = run_example(
        profilerd_env,
        fast_rules,
        short_tmp / "lr.json",
        sys.executable,
        str(EXAMPLES / "diverging.py"),
        "--seconds",
        "4",
    )
    assert document["primary"] == "algorithm"
    finding = rules_of(document)["algorithm.loss_nonfinite"]
    assert finding["severity"] == "critical"
    assert "NaN or inf" in finding["evidence"]
    assert any(r["id"].startswith("convergence.") for r in finding["recommendations"])
    assert "lr=" in finding["recommendations"][0]["how"]


def test_item_and_print_every_step_is_a_sync_finding(profilerd_env, fast_rules: Path, short_tmp: Path) -> None:
    document = run_example(
        profilerd_env,
        fast_rules,
        short_tmp / "sync.json",
        sys.executable,
        str(EXAMPLES / "sync_every_step.py"),
        "--seconds",
        "4",
    )
    finding = rules_of(document)["algorithm.sync_in_loop"]
    assert finding["metrics"]["syncs_per_step"] >= 1.0
    assert "sync_every_step.py:" in finding["evidence"]  # the line that syncs is named
    assert finding["recommendations"][0]["id"] == "loop.defer_syncs"


@needs_torchrun
def test_allreduce_heavy_job_is_communication_bound(profilerd_env, fast_rules: Path, short_tmp: Path) -> None:
    document = run_example(
        profilerd_env,
        fast_rules,
        short_tmp / "comm.json",
        "torchrun",
        "--nproc-per-node",
        "2",
        str(EXAMPLES / "ddp_cpu.py"),
        "--seconds",
        "5",
        "--width",
        "2048",
        "--batch-size",
        "2",
    )
    assert document["primary"] == "communication", document["summary"]
    ids = {r["id"] for r in rules_of(document)["communication.exposed"]["recommendations"]}
    assert "ddp.grad_compression" in ids
    assert "communication.straggler" not in rules_of(document)


@needs_torchrun
def test_slow_loader_on_rank_1_is_named_the_straggler(profilerd_env, fast_rules: Path, short_tmp: Path) -> None:
    document = run_example(
        profilerd_env,
        fast_rules,
        short_tmp / "straggler.json",
        "torchrun",
        "--nproc-per-node",
        "2",
        str(EXAMPLES / "ddp_cpu.py"),
        "--seconds",
        "5",
        "--slow-rank",
        "1",
    )
    finding = rules_of(document)["communication.straggler"]
    assert finding["metrics"]["straggler_rank"] == 1
    assert "rank 1 is the straggler" in finding["evidence"]
    assert "data loading" in finding["recommendations"][0]["title"]
    ranks = {r["rank"]: r for r in document["per_rank"]}
    assert ranks[1]["fractions"]["data_wait"] > ranks[0]["fractions"]["data_wait"]
    assert ranks[0]["fractions"]["communication"] > ranks[1]["fractions"]["communication"]


@needs_torchrun
def test_balanced_job_has_no_communication_finding(profilerd_env, fast_rules: Path, short_tmp: Path) -> None:
    document = run_example(
        profilerd_env,
        fast_rules,
        short_tmp / "balanced.json",
        "torchrun",
        "--nproc-per-node",
        "2",
        str(EXAMPLES / "ddp_cpu.py"),
        "--seconds",
        "5",
        "--device-ms",
        "50",
        "--width",
        "64",
        "--batch-size",
        "16",
    )
    found = rules_of(document)
    assert "communication.exposed" not in found, document["summary"]
    assert "communication.straggler" not in found
    assert document["ranks"] == 2
