"""Every rule on synthetic step streams: it fires, it stays quiet, and it stops when the cause goes away."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest

from profilerd.analysis.diagnosis import Observation, diagnose
from profilerd.analysis.features import Context, compute_features, steps_frame
from profilerd.analysis.recommendations import removed
from profilerd.analysis.rules import RATIONALE, REGISTRY, load_rules
from profilerd.analysis.verdict import evaluate
from profilerd.model import GpuSample, StepRecord
from profilerd_probes import wire

RULES, _ = load_rules()
BASE_CONFIG: dict[str, Any] = {
    "device_type": "cpu",
    "dataloader": {"num_workers": 4, "pin_memory": True, "persistent_workers": True, "batch_size": 32},
    "models": [{"class": "Net", "parameters": 10, "parameter_dtypes": {"float32": 10}, "compiled": True}],
    "optimizers": [{"class": "AdamW", "hyperparameters": {"lr": 1e-3, "fused": True}}],
    "autocast": {"enabled": True, "dtype": "bfloat16"},
    "tf32": {"matmul": True, "float32_matmul_precision": "high"},
}


def stream(n: int = 300, step_s: float = 0.1, rank: int = 0, **overrides: Any) -> list[StepRecord]:
    """A healthy, compute-bound stream; keyword overrides are per-step values or callables of i."""
    records = []
    for i in range(n):
        fields: dict[str, Any] = {
            "data_wait_s": 0.01 * step_s,
            "forward_s": 0.35 * step_s,
            "backward_s": 0.5 * step_s,
            "optimizer_s": 0.1 * step_s,
            "comm_s": 0.0,
            "loss": 2.0 / (1 + 0.01 * i),
            "grad_norm": 1.0,
            "lr": 1e-3,
            "flags": wire.FLAG_HAS_LOSS | wire.FLAG_HAS_GRAD_NORM | wire.FLAG_HAS_LR,
        }
        for key, value in overrides.items():
            fields[key] = value(i) if callable(value) else value
        records.append(StepRecord("job", rank, 10 + rank, i + 1, 1e6 + (i + 1) * step_s, step_s, **fields))
    return records


def findings(records: list[StepRecord], config: dict[str, Any] | None = None, **context: Any) -> dict[str, Any]:
    ctx = Context(config=config or BASE_CONFIG, **context)
    verdict = evaluate(compute_features(steps_frame(records), ctx, RULES.warmup_steps), RULES)
    return {f.rule: f for f in verdict.findings} | {"_verdict": verdict}


def cfg(**changes: Any) -> dict[str, Any]:
    return {**BASE_CONFIG, **changes}


def test_a_healthy_stream_has_no_problem_findings() -> None:
    found = findings(stream())
    assert found["_verdict"].primary == "compute"
    problems = [r for r, f in found.items() if r != "_verdict" and f.severity in ("warning", "critical")]
    assert problems == []


@pytest.mark.parametrize(
    ("rule", "bad", "good"),
    [
        ("data.input_wait", {"records": {"data_wait_s": 0.05}}, {}),
        (
            "data.worker_saturation",
            {
                "records": {"data_wait_s": 0.02},
                "context": {"worker_cpu_max_ratio": 0.97, "cpu_count": 8, "host_busy_cores": 7.5},
            },
            {"context": {"worker_cpu_max_ratio": 0.4, "cpu_count": 8, "host_busy_cores": 2.0}},
        ),
        (
            "data.worker_restarts",
            {
                "records": {"data_wait_s": lambda i: 0.09 if i % 10 == 0 else 0.0005},
                "config": {"dataloader": {"num_workers": 4, "persistent_workers": False}},
            },
            {"records": {"data_wait_s": lambda i: 0.09 if i % 10 == 0 else 0.0005}},
        ),
        ("compute.optimizer_unfused", {"config": {"optimizers": [{"class": "Adam", "hyperparameters": {}}]}}, {}),
        (
            "compute.tf32_disabled",
            {
                "config": {
                    "device_type": "cuda",
                    "autocast": {"enabled": False},
                    "tf32": {"matmul": False, "float32_matmul_precision": "highest"},
                }
            },
            {"config": {"device_type": "cuda", "autocast": {"enabled": False}}},
        ),
        (
            "compute.channels_last",
            {
                "config": {
                    "device_type": "cuda",
                    "models": [{"class": "ResNet", "has_conv2d": True, "channels_last": False, "parameter_dtypes": {}}],
                }
            },
            {
                "config": {
                    "device_type": "cuda",
                    "models": [{"class": "ResNet", "has_conv2d": True, "channels_last": True, "parameter_dtypes": {}}],
                }
            },
        ),
        (
            "communication.exposed",
            {"records": {"comm_s": 0.04, "backward_s": 0.02}},
            {"records": {"comm_s": 0.002}},
        ),
        (
            "communication.ddp_find_unused",
            {"config": {"models": [{"class": "DDP", "parameter_dtypes": {}, "ddp": {"find_unused_parameters": True}}]}},
            {
                "config": {
                    "models": [{"class": "DDP", "parameter_dtypes": {}, "ddp": {"find_unused_parameters": False}}]
                }
            },
        ),
        ("algorithm.host_overhead", {"records": {"backward_s": 0.01, "forward_s": 0.01}}, {}),
        ("algorithm.sync_in_loop", {"records": {"sync_count": 2, "sync_s": 0.0001}}, {"records": {"sync_count": 0}}),
        (
            "algorithm.loss_nonfinite",
            {"records": {"loss": lambda i: math.nan if i > 100 else 1.0}},
            {"records": {"loss": 1.0}},
        ),
        (
            "algorithm.loss_diverging",
            {"records": {"loss": lambda i: 1.0 + 0.1 * i}},
            {"records": {"loss": lambda i: 2.0 / (1 + 0.01 * i)}},
        ),
        (
            "algorithm.loss_plateau",
            {"records": {"loss": lambda i: max(0.5, 2.0 - 0.05 * i)}},
            {"records": {"loss": lambda i: max(0.5, 2.0 - 0.05 * i)}, "config": {"lr_scheduler": "CosineAnnealingLR"}},
        ),
        ("algorithm.loss_stuck", {"records": {"loss": 0.5}}, {}),
        (
            "algorithm.grad_norm",
            {"records": {"grad_norm": lambda i: 500.0 if i % 37 == 0 else 1.0}},
            {"records": {"grad_norm": 1.0}},
        ),
        (
            "algorithm.grad_scaler",
            {"records": {"flags": lambda i: wire.FLAG_GRAD_SCALER_SKIPPED if i % 5 == 0 else 0}},
            {"records": {"flags": 0}},
        ),
        (
            "algorithm.recompilation",
            {"records": {"graph_compiles": lambda i: i // 10}},
            {"records": {"graph_compiles": 3}},
        ),
        (
            "algorithm.adam_weight_decay",
            {"config": {"optimizers": [{"class": "Adam", "hyperparameters": {"weight_decay": 0.01, "fused": True}}]}},
            {"config": {"optimizers": [{"class": "AdamW", "hyperparameters": {"weight_decay": 0.01, "fused": True}}]}},
        ),
    ],
)
def test_rule_fires_and_stays_quiet(rule: str, bad: dict[str, Any], good: dict[str, Any]) -> None:
    def build(spec: dict[str, Any]) -> dict[str, Any]:
        records = stream(**{k: v for k, v in spec.get("records", {}).items()})
        return findings(records, cfg(**spec.get("config", {})), **spec.get("context", {}))

    fired = build(bad)
    assert rule in fired, f"{rule} should fire"
    finding = fired[rule]
    assert finding.evidence and finding.thresholds and 0 < finding.confidence <= 1
    assert finding.recommendations, "every finding says what to do"
    assert rule not in build(good), f"{rule} should stay quiet"


def test_finding_stops_when_the_cause_goes_away() -> None:
    """A window that starts data-starved and then is fixed: the live window forgets the cause."""
    starved = stream(200, data_wait_s=0.06, forward_s=0.01, backward_s=0.02)
    fixed = stream(400, data_wait_s=0.001)
    fixed = [replace(s, step=s.step + 200, end_unix_s=s.end_unix_s + 20) for s in fixed]
    assert "data.input_wait" in findings(starved)
    assert "data.input_wait" not in findings(fixed)  # the window after the fix


def test_straggler_names_the_slow_rank_and_its_cause() -> None:
    slow = stream(rank=1, data_wait_s=0.05, comm_s=0.001, forward_s=0.02, backward_s=0.02)
    fast = stream(rank=0, data_wait_s=0.001, comm_s=0.05, forward_s=0.02, backward_s=0.02)
    found = findings(slow + fast)
    straggler = found["communication.straggler"]
    assert "rank 1 is the straggler" in straggler.evidence
    assert straggler.recommendations[0].id == "straggler.rank"
    assert "data loading" in straggler.recommendations[0].title


def test_communication_bound_ranks_alike_are_not_stragglers() -> None:
    ranks = stream(rank=0, comm_s=0.05, backward_s=0.02) + stream(rank=1, comm_s=0.045, backward_s=0.025)
    found = findings(ranks)
    assert found["_verdict"].primary == "communication"
    assert "communication.straggler" not in found
    assert "ddp.grad_compression" in {r.id for r in found["communication.exposed"].recommendations}


def test_nonfinite_loss_outranks_a_data_bottleneck() -> None:
    found = findings(stream(data_wait_s=0.06, forward_s=0.01, loss=math.nan))
    assert found["_verdict"].primary == "algorithm"
    assert found["_verdict"].findings[0].rule == "algorithm.loss_nonfinite"


def test_loss_under_grad_scaler_is_unscaled_before_judging() -> None:
    scaled = stream(
        loss=lambda i: 65536.0 * 2.0 / (1 + 0.01 * i),
        scaler_scale=65536.0,
        flags=wire.FLAG_HAS_LOSS | wire.FLAG_HAS_SCALE | wire.FLAG_HAS_LR,
    )
    assert "algorithm.loss_diverging" not in findings(scaled)


def test_speedups_are_bounds_from_the_measured_fractions() -> None:
    found = findings(
        stream(data_wait_s=0.05, comm_s=0.02, sync_count=3, forward_s=0.01),
        cfg(device_type="cuda", autocast={"enabled": False}),
    )
    fractions = found["_verdict"].features.fractions
    for rule, finding in found.items():
        if rule == "_verdict":
            continue
        for rec in finding.recommendations:
            assert 1.0 <= rec.estimated_speedup <= removed(max(fractions.values())) + 1e-9


def test_each_category_has_at_least_three_rules_with_rationale() -> None:
    by_category: dict[str, int] = {}
    for rule in REGISTRY.values():
        by_category[rule.category] = by_category.get(rule.category, 0) + 1
        assert rule.id in RATIONALE
    assert all(by_category[c] >= 3 for c in ("data", "compute", "communication", "algorithm")), by_category


def gpu_samples(n: int = 60, pid: int = 10, **fields: Any) -> list[dict[str, Any]]:
    base = {
        "index": 0,
        "uuid": "GPU-0",
        "name": "H100",
        "lost": False,
        "utilization_gpu_ratio": 0.9,
        "memory_used_bytes": 40 * 2**30,
        "memory_total_bytes": 80 * 2**30,
        "clock_event_reasons": [],
        "sm_clock_hertz": 1.98e9,
        "sm_clock_max_hertz": 1.98e9,
        "processes": [{"pid": pid}],
    }
    return [dict(base, ts_unix_s=1e6 + i, **fields) for i in range(n)]


def gpu_findings(samples: list[dict[str, Any]]) -> dict[str, Any]:
    from profilerd.analysis.context import gpu_context, gpu_frame

    gpu = gpu_context(gpu_frame(map(GpuSample.from_json, samples), {10}))
    return findings(stream(), cfg(device_type="cuda"), gpu=gpu)


def test_gpu_rules_fire_from_nvml_samples() -> None:
    healthy = gpu_findings(gpu_samples())
    assert not {"gpu.throttling", "gpu.memory_near_full", "gpu.idle_while_held"} & set(healthy)
    hot = gpu_findings(gpu_samples(clock_event_reasons=["sw_thermal"], sm_clock_hertz=1.2e9))
    assert hot["gpu.throttling"].severity == "critical"
    assert "SM clock at 61%" in hot["gpu.throttling"].evidence
    assert hot["gpu.throttling"].recommendations[0].estimated_speedup > 1.0
    full = gpu_findings(gpu_samples(memory_used_bytes=79 * 2**30))
    assert "gpu.memory_near_full" in full
    idle = gpu_findings(gpu_samples(utilization_gpu_ratio=0.01))
    assert idle["gpu.idle_while_held"].severity == "critical"


def test_gpus_of_other_jobs_are_not_blamed() -> None:
    from profilerd.analysis.context import gpu_context, gpu_frame

    mine = gpu_samples()
    theirs = [dict(s, index=1, utilization_gpu_ratio=0.0, processes=[{"pid": 999}]) for s in gpu_samples()]
    gpu = gpu_context(gpu_frame(map(GpuSample.from_json, mine + theirs), {10}))
    assert gpu["gpu_count"] == 1
    assert gpu["gpu_idle_while_held_fraction"] == 0.0


def test_pcie_only_collectives_recommend_the_nccl_topology_fix() -> None:
    from profilerd.analysis.context import gpu_context, gpu_frame

    samples = gpu_samples(pcie_tx_bytes_per_second=8e9, pcie_rx_bytes_per_second=8e9, nvlink_tx_bytes_per_second=0.0)
    samples += [dict(s, index=1) for s in samples]
    gpu = gpu_context(gpu_frame(map(GpuSample.from_json, samples), {10}))
    found = findings(stream(comm_s=0.04, backward_s=0.02), cfg(device_type="cuda"), gpu=gpu)
    ids = {r.id for r in found["communication.exposed"].recommendations}
    assert "nccl.topology" in ids
    nvlinked = [dict(s, nvlink_tx_bytes_per_second=50e9) for s in samples]
    found = findings(
        stream(comm_s=0.04, backward_s=0.02),
        cfg(device_type="cuda"),
        gpu=gpu_context(gpu_frame(map(GpuSample.from_json, nvlinked), {10})),
    )
    assert "nccl.topology" not in {r.id for r in found["communication.exposed"].recommendations}


def test_gradient_norms_falling_early_in_training_are_not_exploding() -> None:
    """Norms drop by orders of magnitude in the first steps; only a jump above the recent past counts."""
    falling = stream(grad_norm=lambda i: 2.0 * 0.98**i + 0.01)
    assert "algorithm.grad_norm" not in findings(falling)


# ---- decisive evidence: the loss over the whole run, read every step --------------------------------
def every_step_loss(n: int, loss: Any, step_s: float = 0.0008, **overrides: Any) -> list[StepRecord]:
    """A short, fast stream whose every record carries the loss, as the probes send early steps."""
    return stream(n, step_s=step_s, loss=loss, flags=wire.FLAG_HAS_LOSS | wire.FLAG_HAS_LR, **overrides)


def test_a_nan_in_a_40_ms_run_is_reported_at_its_exact_first_step() -> None:
    losses = {3: math.inf, 4: 1e30}
    records = every_step_loss(50, lambda i: losses.get(i + 1, math.nan if i + 1 >= 5 else 0.9))
    found = findings(records)
    verdict = found["_verdict"]
    assert verdict.primary == "algorithm" and verdict.severity == "critical"
    finding = found["algorithm.loss_nonfinite"]
    assert finding.metrics["first_nonfinite_step"] == 3
    assert "the loss is inf first at step 3" in finding.evidence
    assert "in 47 of 50 readings" in finding.evidence  # warm-up steps count: the loss is run-wide


def test_a_nan_within_the_warm_up_or_before_min_steps_is_still_reported() -> None:
    found = findings(every_step_loss(12, lambda i: math.nan if i >= 1 else 2.0))
    assert found["_verdict"].primary == "algorithm"  # decisive: no min_steps needed
    assert found["algorithm.loss_nonfinite"].metrics["first_nonfinite_step"] == 2
    assert set(found) == {"_verdict", "algorithm.loss_nonfinite"}  # only decisive rules ran


def test_the_first_nan_is_found_across_the_run_not_the_window() -> None:
    """A window that holds only the steps after the first NaN still names the first NaN step."""
    from profilerd.analysis.history import summarize_losses

    records = every_step_loss(400, lambda i: math.nan if i + 1 >= 7 else 3.0)
    frame = steps_frame(records)
    window = frame[frame["step"] > 300]
    verdict = diagnose(Observation(window, config=BASE_CONFIG, losses=summarize_losses(frame)), RULES)
    finding = next(f for f in verdict.findings if f.rule == "algorithm.loss_nonfinite")
    assert finding.metrics["first_nonfinite_step"] == 7


def test_a_finite_runaway_loss_is_an_algorithm_finding_whenever_it_happened() -> None:
    """nanoGPT at lr=3: 4.9 at first, then 30 to 180 and finite; the window is all after the rise."""
    from profilerd.analysis.history import summarize_losses

    records = every_step_loss(600, lambda i: 4.9 if i < 20 else 30 + (i * 37) % 150, step_s=0.05)
    frame = steps_frame(records)
    late = frame[frame["step"] > 400]
    verdict = diagnose(Observation(late, config=BASE_CONFIG, losses=summarize_losses(frame)), RULES)
    assert verdict.primary == "algorithm"
    finding = next(f for f in verdict.findings if f.rule == "algorithm.loss_diverging")
    assert finding.metrics["loss_start"] == pytest.approx(4.9)
    assert finding.metrics["loss_peak"] > 30
    assert "from 4.9 at the start" in finding.evidence
    assert finding.severity == "critical"


def test_noisy_but_healthy_losses_do_not_diverge() -> None:
    noisy = every_step_loss(400, lambda i: 2.3 / (1 + 0.01 * i) * (1.3 if i % 3 == 0 else 0.8), step_s=0.05)
    assert "algorithm.loss_diverging" not in findings(noisy)


def test_a_learning_rate_of_zero_is_a_not_learning_finding() -> None:
    records = every_step_loss(300, lambda i: 2.3 * (1.04 if i % 2 else 0.97), step_s=0.02, lr=0.0)
    found = findings(records)
    assert found["_verdict"].primary == "algorithm"
    finding = found["algorithm.loss_stuck"]
    assert finding.severity == "critical"
    assert "the learning rate is 0" in finding.evidence
    assert "over 300 steps" in finding.evidence
    assert finding.recommendations[0].id == "convergence.not_learning"
    assert "algorithm.loss_plateau" not in found  # no "add an LR schedule" to a job at lr=0


def test_a_loss_that_never_moves_is_not_learning_and_one_that_fell_and_flattened_is_a_plateau() -> None:
    stuck = findings(every_step_loss(300, 1.75, step_s=0.02))
    assert stuck["algorithm.loss_stuck"].severity == "warning"
    assert "algorithm.loss_plateau" not in stuck
    plateau = findings(every_step_loss(300, lambda i: max(0.5, 2.0 - 0.05 * i), step_s=0.02))
    assert "algorithm.loss_stuck" not in plateau
    assert "after falling from 2 to 0.5" in plateau["algorithm.loss_plateau"].evidence
    short = findings(every_step_loss(150, 1.75, step_s=0.02))
    assert "algorithm.loss_stuck" not in short  # under 200 steps: not yet "hundreds of steps"


def test_readings_spaced_out_in_time_still_cover_hundreds_of_steps() -> None:
    """After the first steps the probe reads the loss by time: 25 readings over 500 steps."""
    records = stream(500, step_s=0.02, loss=1.75, flags=lambda i: wire.FLAG_HAS_LOSS if i % 20 == 0 else 0)
    found = findings(records)
    assert "over 481 steps (25 readings)" in found["algorithm.loss_stuck"].evidence
