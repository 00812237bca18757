"""Classification on the GPU from device truth, on the simulated device (tests/gpu_sim.py).

Each scenario is a training loop played against a simulated CUDA stream; its step records
(host phases and CUDA-event device timing) and the NVML samples of the same GPU go through the
real analysis: ``diagnose``, the daemon's live analyser, and the offline report of a recording.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from profilerd.analysis.context import gpu_frame
from profilerd.analysis.diagnosis import Observation, diagnose
from profilerd.analysis.features import DEVICE_COLUMNS, steps_frame
from profilerd.analysis.peaks import dtype_in_use, peak_tflops
from profilerd.analysis.recommendations import removed
from profilerd.analysis.rules import load_rules
from profilerd.analysis.verdict import Verdict
from profilerd.model import GpuSample, ProbeSession, StepRecord
from tests.conftest import run_cli
from tests.gpu_sim import Loop, nvml_samples, simulate
from tests.test_diagnosis import BASE_CONFIG

RULES, _ = load_rules()
# The healthy configuration of the rule tests, on CUDA and not compiled (so compute has advice).
CONFIG: dict[str, Any] = {
    **BASE_CONFIG,
    "device_type": "cuda",
    "models": [{**BASE_CONFIG["models"][0], "compiled": False}],
}
SCENARIOS = {
    # 60 ms per batch from the loader, 30 ms of kernels: the GPU idles half the step in the wait.
    "data_starved": Loop(data_wait_s=0.06, forward=(10, 1e-3), backward=(20, 1e-3), optimizer=(5, 0.0)),
    # 130 ms of kernels per step, launched in 3 ms: the host runs ahead, the GPU never waits.
    "compute_bound": Loop(),
    # The same, printing loss.item() every step: the host blocks in the sync (host "other").
    "compute_bound_item": Loop(item_every_step=True),
    # A 40 ms loader wait in the loop, spent by the GPU on the queue the host ran ahead with.
    "loader_wait_overlapped": Loop(data_wait_s=0.04),
    # 700 tiny kernels at 40 µs of Python each: the GPU waits for the host between launches.
    "launch_bound": Loop(launch_s=40e-6, forward=(200, 5e-6), backward=(400, 5e-6), optimizer=(100, 5e-6)),
    # DDP: the stream waits 80 ms a step for the gradient all-reduce after backward.
    "ddp_comm_bound": Loop(exposed_comm_s=0.08),
}


def scenario(loop: Loop, ranks: int = 1, steps: int = 300) -> tuple[list[StepRecord], list[GpuSample]]:
    """Step records of every rank (rank r is PID 100 + r on GPU r) and NVML samples of their GPUs."""
    records: list[StepRecord] = []
    samples: list[GpuSample] = []
    start = 1e6
    for rank in range(ranks):
        mine, busy = simulate(loop, steps, rank=rank, pid=100 + rank, start_unix_s=start)
        records += mine
        samples += nvml_samples(busy, rank, 100 + rank, start, max(r.end_unix_s for r in mine))
    return records, samples


def verdict_of(records: list[StepRecord], samples: list[GpuSample], config: dict[str, Any] | None = None) -> Verdict:
    pids = {r.pid for r in records}
    gpus = gpu_frame((asdict(s) for s in samples), pids)
    return diagnose(Observation.whole_run(steps_frame(records), config=config or CONFIG, gpus=gpus), RULES)


def host_only(records: list[StepRecord]) -> list[StepRecord]:
    """The same steps as a probe without device timing reports them."""
    return [replace(r, **dict.fromkeys(DEVICE_COLUMNS)) for r in records]


def finding(verdict: Verdict, rule: str) -> Any:
    return next(f for f in verdict.findings if f.rule == rule)


def assert_bounded(verdict: Verdict) -> None:
    """No estimate exceeds what removing the whole of its category's measured share could give."""
    shares = {
        "data": "data_wait",
        "compute": "compute",
        "communication": "communication",
        "algorithm": "other",
    }
    for f in verdict.findings:
        for rec in f.recommendations:
            bound = removed(verdict.features.fractions[shares[f.category]])
            assert 1.0 <= rec.estimated_speedup <= bound + 1e-9, (rec.id, rec.estimated_speedup, bound)


def test_data_starved_gpu_is_data_bound_with_the_idle_share_as_evidence() -> None:
    verdict = verdict_of(*scenario(SCENARIOS["data_starved"]))
    assert verdict.primary == "data" and verdict.severity == "critical"
    wait = finding(verdict, "data.input_wait")
    device = verdict.features.device
    assert device is not None and device.steps_timed == verdict.features.steps
    # A step is the 60 ms wait and 0.9 ms of launches and Python; the GPU works off the 30 ms
    # of kernels queued before the wait and idles the rest of it.
    step_s = 0.06 + 35 * 20e-6 + 0.2e-3
    assert wait.metrics["gpu_idle_data_wait_fraction"] == pytest.approx((step_s - 0.03) / step_s, abs=0.02)
    assert wait.metrics["host_data_wait_fraction"] == pytest.approx(0.06 / step_s, abs=0.01)
    assert "the GPU is idle 51% of step time while the loop waits for batches" in wait.evidence
    assert "NVML: utilization 49%" in wait.evidence  # NVML of the same GPU agrees with the clock
    assert_bounded(verdict)


def test_compute_bound_gpu_is_compute_with_its_busy_share() -> None:
    verdict = verdict_of(*scenario(SCENARIOS["compute_bound"]))
    assert verdict.primary == "compute"
    bound = finding(verdict, "compute.bound")
    assert bound.metrics["gpu_busy_fraction"] > 0.97
    assert "the GPU is busy 100% of step time (device clock)" in bound.evidence
    assert {r.id for r in bound.recommendations} == {"torch.compile"}
    assert_bounded(verdict)


def test_compute_bound_gpu_printing_loss_item_every_step_is_compute_not_algorithm() -> None:
    records, samples = scenario(SCENARIOS["compute_bound_item"])
    # On the host's clock the step is almost all sync ("other"): today's host path says algorithm.
    on_host = verdict_of(host_only(records), samples)
    assert on_host.primary == "algorithm" and on_host.features.fractions["other"] > 0.9
    verdict = verdict_of(records, samples)
    assert verdict.primary == "compute"
    assert finding(verdict, "compute.bound").metrics["gpu_busy_fraction"] > 0.95
    syncs = finding(verdict, "algorithm.sync_in_loop")
    # The sync is still named, but as what it costs the GPU (the idle after it), not host time.
    assert syncs.severity == "info"
    assert syncs.metrics["sync_fraction"] > 0.9 and syncs.metrics["sync_cost"] < 0.05
    assert "while the GPU works" in syncs.evidence
    assert_bounded(verdict)


def test_loader_wait_hidden_behind_gpu_work_is_not_data_bound() -> None:
    records, samples = scenario(SCENARIOS["loader_wait_overlapped"])
    assert verdict_of(host_only(records), samples).primary == "data"  # what host timing concludes
    verdict = verdict_of(records, samples)
    assert verdict.primary == "compute"
    assert not any(f.category == "data" for f in verdict.findings)
    bound = finding(verdict, "compute.bound")
    assert bound.metrics["host_data_wait_fraction"] > 0.25
    assert bound.metrics["gpu_idle_data_wait_fraction"] < 0.01
    waited = bound.metrics["host_data_wait_fraction"]
    assert f"the loop's wait for batches ({waited:.0%}) is hidden behind GPU work" in bound.evidence


def test_launch_bound_gpu_is_host_overhead_not_compute() -> None:
    records, samples = scenario(SCENARIOS["launch_bound"])
    assert verdict_of(host_only(records), samples).primary == "compute"  # host timers see launches
    verdict = verdict_of(records, samples)
    assert verdict.primary == "algorithm" and verdict.severity == "critical"
    overhead = finding(verdict, "algorithm.host_overhead")
    assert overhead.metrics["gpu_busy_fraction"] < 0.15
    assert overhead.metrics["host_ahead_s_p50"] == pytest.approx(0.0, abs=1e-4)  # never ahead
    assert "waiting for the host to launch work (launch-bound" in overhead.evidence
    graphs = next(r for r in overhead.recommendations if r.id == "torch.compile")
    assert 'mode="reduce-overhead"' in graphs.how
    # Half the measured idle removed, and the idle in its reason is the one in the evidence.
    idle = verdict.features.fractions["other"]
    assert graphs.estimated_speedup == pytest.approx(removed(idle * 0.5))
    assert f"{idle:.0%}" in graphs.why and f"{idle:.0%}" in overhead.evidence
    assert_bounded(verdict)


def test_ddp_job_waiting_for_collectives_is_communication_bound_per_rank() -> None:
    records, samples = scenario(SCENARIOS["ddp_comm_bound"], ranks=2)
    verdict = verdict_of(records, samples)
    assert verdict.primary == "communication" and verdict.severity == "critical"
    exposed = finding(verdict, "communication.exposed")
    assert exposed.metrics["communication_fraction"] == pytest.approx(0.08 / 0.2133, abs=0.03)
    assert exposed.metrics["gpu_busy_fraction"] == pytest.approx(0.13 / 0.2133, abs=0.03)
    busy, comm = exposed.metrics["gpu_busy_fraction"], exposed.metrics["communication_fraction"]
    assert f"the GPU computes {busy:.0%} of the step and waits for collectives {comm:.0%}" in exposed.evidence
    # Each rank joined with the NVML samples of its own GPU.
    per_rank = verdict.features.device.per_rank.set_index("rank")  # type: ignore[union-attr]
    assert per_rank.loc[0, "gpu_index"] == 0 and per_rank.loc[1, "gpu_index"] == 1
    assert per_rank.loc[1, "nvml_utilization_ratio"] == pytest.approx(0.61, abs=0.03)
    assert_bounded(verdict)


def test_steps_without_device_timing_are_judged_on_the_host_clock_exactly_as_before() -> None:
    records, samples = scenario(SCENARIOS["compute_bound_item"])
    mixed = [r if r.step % 2 else replace(r, **dict.fromkeys(DEVICE_COLUMNS)) for r in records]
    verdict = verdict_of(mixed, samples)
    assert verdict.primary == "compute"  # the timed half decides, on the device's clock
    assert verdict.features.device is not None
    assert verdict.features.device.steps_timed == verdict.features.steps // 2
    untimed = verdict_of(host_only(records), samples)
    assert untimed.features.device is None and "device" not in untimed.to_json("r")
    assert "clock" not in json.dumps([f.to_json() for f in untimed.findings])


# ---- MFU ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", ("H100 SXM", 989.4)),
        ("NVIDIA H100 PCIe", "bf16", ("H100 PCIe", 756.5)),
        ("NVIDIA H200", "tf32", ("H200 SXM", 494.7)),
        ("NVIDIA A100-SXM4-80GB", "fp16", ("A100", 312.0)),
        ("NVIDIA L4", "bf16", ("L4", 121.0)),
        ("NVIDIA L40S", "bf16", ("L40S", 362.05)),
        ("NVIDIA A10", "fp32", ("A10", 31.2)),
        ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 tensor cores
        ("NVIDIA A10G", "bf16", None),  # not in the table: no guess
        ("NVIDIA H100 80GB HBM3", "fp8", None),
    ],
)
def test_peak_table_by_nvml_name_and_dtype(name: str, dtype: str, expected: tuple[str, float] | None) -> None:
    assert peak_tflops(name, dtype) == expected


def test_dtype_in_use_follows_autocast_then_parameters_and_omits_fp8() -> None:
    assert dtype_in_use(CONFIG) == "bf16"
    fp32 = {**CONFIG, "autocast": {"enabled": False}}
    assert dtype_in_use(fp32) == "tf32"
    assert dtype_in_use({**fp32, "tf32": {"matmul": False, "float32_matmul_precision": "highest"}}) == "fp32"
    fp8 = {**fp32, "models": [{"parameter_dtypes": {"float8_e4m3fn": 4}}]}
    assert dtype_in_use(fp8) is None


def test_mfu_is_an_estimate_in_the_compute_evidence_and_the_verdict_document() -> None:
    records, samples = scenario(SCENARIOS["compute_bound"])
    step_s = records[-1].step_s
    flops = 0.4 * 989.4e12 * step_s  # 40% of an H100's bf16 peak
    verdict = verdict_of(records, samples, {**CONFIG, "flops_per_step": flops})
    assert verdict.primary == "compute"  # MFU is evidence, never a class of its own
    bound = finding(verdict, "compute.bound")
    assert bound.metrics["mfu_estimate"] == pytest.approx(0.4, abs=0.01)
    assert "MFU ≈ 40% (estimate: 39" in bound.evidence and "bf16 peak on H100 SXM" in bound.evidence
    document = verdict.to_json("r")
    assert document["mfu"]["estimate"] is True and document["mfu"]["device"] == "H100 SXM"
    assert document["device"]["busy_fraction"] > 0.97
    # Unknown where any input is: no figure, an FP8 model, a device not in the table, an
    # impossible figure (over the peak).
    for config, gpu_name in (
        (CONFIG, "NVIDIA H100 80GB HBM3"),
        ({**CONFIG, "flops_per_step": flops, "autocast": {"enabled": True, "dtype": "float8_e4m3fn"}}, None),
        ({**CONFIG, "flops_per_step": flops}, "Some Future GPU"),
        ({**CONFIG, "flops_per_step": flops * 10}, None),
    ):
        renamed = [replace(s, name=gpu_name) for s in samples] if gpu_name else samples
        other = verdict_of(records, renamed, config)
        assert other.features.mfu is None and "mfu" not in other.to_json("r")
        assert "MFU" not in finding(other, "compute.bound").evidence


# ---- the live and offline paths -----------------------------------------------------------------
def test_live_analyser_judges_the_item_loop_on_the_device_clock() -> None:
    from profilerd.analysis.live import LiveAnalyzer
    from profilerd.store import Store

    records, samples = scenario(SCENARIOS["compute_bound_item"], steps=200)
    store = Store(window_steps=1000, window_s=1e9)
    store.add_session(ProbeSession(100, "simjob", "run-1", 0, 0, 1, "node", ("train.py",), 1e6, "test"))
    store.set_config(100, CONFIG)
    for seq, record in enumerate(records):
        store.add_step(record, seq, 0)
    store.set_gpus(samples, [], 0)
    analyzer = LiveAnalyzer(store, RULES)
    verdict = analyzer.analyse("simjob", records[-1].end_unix_s)
    assert verdict.primary == "compute"
    assert verdict.features.device is not None and verdict.features.device.nvml_utilization_ratio > 0.9
    # /metrics: the device's busy share and the MFU estimate beside the verdict.
    from prometheus_client import CollectorRegistry, generate_latest

    from profilerd.exporters.prometheus import ProfilerdCollector

    store.set_verdict("simjob", verdict)
    registry = CollectorRegistry()
    registry.register(ProfilerdCollector(store))
    text = generate_latest(registry).decode()
    busy = next(line for line in text.splitlines() if line.startswith('profilerd_step_gpu_busy_ratio{job="simjob"}'))
    assert float(busy.split()[-1]) == pytest.approx(verdict.features.device.busy_fraction)
    assert 'profilerd_mfu_ratio{job="simjob"}' not in text  # no FLOPs figure given: no estimate


def test_offline_report_of_a_recording_uses_the_recorded_device_timing(
    tmp_path: Path, profilerd_env: dict[str, str]
) -> None:
    from profilerd.recordings import schema, writer

    records, samples = scenario(SCENARIOS["launch_bound"], steps=200)
    recorder = writer.Recorder(tmp_path)
    recorder.start()
    try:
        recorder.start_run("run-1", {"job": "simjob", "hostname": "node"})
        recorder.session(ProbeSession(100, "simjob", "run-1", 0, 0, 1, "node", ("train.py",), 1e6, "test"))
        recorder.config("run-1", 100, 0, CONFIG)
        for record in records:
            recorder.step("run-1", record)
        for sample in samples:
            recorder.gpu(["run-1"], sample)
        recorder.close_run("run-1", "finished", 0)
    finally:
        recorder.stop()
    path = schema.recording_file(tmp_path, "run-1")
    result = run_cli("report", str(path), "--format", "json", env=profilerd_env, timeout=120)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["primary"] == "algorithm"
    assert document["device"]["steps_timed"] == document["steps"]
    assert document["device"]["busy_fraction"] < 0.15
    assert "launch-bound" in document["summary"]
    for fmt in ("text", "md", "html"):
        shown = run_cli("report", str(path), "--format", fmt, env=profilerd_env, timeout=120)
        assert shown.returncode == 0, shown.stderr
        busy = document["device"]["busy_fraction"]
        timed = document["device"]["steps_timed"]
        text = html.unescape(shown.stdout).replace("\n", " ")
        assert f"On the GPU's clock ({timed} of {timed} steps): busy {busy:.0%}" in text
