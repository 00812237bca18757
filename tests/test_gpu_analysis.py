"""Classification on the GPU from device truth, probe to verdict, on the simulated device.

Each scenario is a training loop played on tests/simdevice.py's simulated CUDA stream through a
real StepProbe; its datagrams go through the daemon's ingest, and the step records (host phases
and device timing from the probe's markers) with the NVML samples of the same GPU go through
the real analysis: ``diagnose``, the daemon's live analyser, and the offline report.
"""

from __future__ import annotations

import html
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import simdevice as sim
from simdevice import Run, Scenario, run_scenario

from profilerd.analysis.context import gpu_frame
from profilerd.analysis.diagnosis import Observation, diagnose
from profilerd.analysis.features import steps_frame
from profilerd.analysis.peaks import dtype_in_use, peak_tflops
from profilerd.analysis.recommendations import removed
from profilerd.analysis.rules import load_rules
from profilerd.analysis.verdict import Verdict
from profilerd.model import GpuSample, ProbeSession, StepRecord
from profilerd_probes.schema import GPU_TIMING_FIELDS
from tests.conftest import run_cli
from tests.test_diagnosis import BASE_CONFIG

RULES, _ = load_rules()
# The healthy configuration of the rule tests, on CUDA and not compiled (so compute has advice).
CONFIG: dict[str, Any] = {
    **BASE_CONFIG,
    "device_type": "cuda",
    "models": [{**BASE_CONFIG["models"][0], "compiled": False}],
}


def scenario(loop: Scenario, ranks: int = 1, steps: int = 120) -> tuple[list[StepRecord], list[GpuSample], Run]:
    """Step records of every rank (rank r is PID 100 + r on GPU r), NVML samples of their GPUs,
    and rank 0's run (its ground truth)."""
    records: list[StepRecord] = []
    samples: list[GpuSample] = []
    runs = [run_scenario(loop, steps, rank=rank, pid=100 + rank, job="simjob") for rank in range(ranks)]
    for run in runs:
        records += run.records
        samples += run.nvml_samples()
    return records, samples, runs[0]


def verdict_of(records: list[StepRecord], samples: list[GpuSample], config: dict[str, Any] | None = None) -> Verdict:
    pids = {r.pid for r in records}
    gpus = gpu_frame(samples, pids)
    return diagnose(Observation.whole_run(steps_frame(records), config=config or CONFIG, gpus=gpus), RULES)


def host_only(records: list[StepRecord]) -> list[StepRecord]:
    """The same steps as a probe without device timing reports them."""
    return [replace(r, **dict.fromkeys(GPU_TIMING_FIELDS)) for r in records]


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


def steady_truth(run: Run) -> tuple[float, float, float]:
    """The simulated device's own busy share, idle share during the data wait and step time."""
    truths = run.truths[5:]
    step = sum(t.end_s - t.start_s for t in truths)
    return sum(t.busy_s for t in truths) / step, sum(t.idle_data_wait_s for t in truths) / step, step / len(truths)


def test_data_starved_gpu_is_data_bound_with_the_idle_share_as_evidence() -> None:
    records, samples, run = scenario(sim.DATA_STARVED)
    verdict = verdict_of(records, samples)
    assert verdict.primary == "data" and verdict.severity == "critical"
    wait = finding(verdict, "data.input_wait")
    device = verdict.features.device
    assert device is not None and device.steps_timed >= verdict.features.steps - 2
    # A step is the 60 ms wait and 0.5 ms of launches; the GPU works off the 32 ms of kernels
    # queued before the wait and idles the rest of it: what the simulated device really did.
    busy, idle_waiting, _ = steady_truth(run)
    assert wait.metrics["gpu_idle_data_wait_fraction"] == pytest.approx(idle_waiting, abs=0.01)
    assert wait.metrics["gpu_busy_fraction"] == pytest.approx(busy, abs=0.01)
    assert wait.metrics["host_data_wait_fraction"] > 0.98
    assert f"the GPU is idle {idle_waiting:.0%} of step time while the loop waits for batches" in wait.evidence
    assert f"NVML: utilization {busy:.0%}" in wait.evidence  # NVML of the same GPU agrees with the clock
    # Half the wait is hidden behind the queued work, and the evidence says only that half.
    bound = finding(verdict, "compute.bound")
    assert f"{0.99 - idle_waiting:.0%} of step time of the loop's wait for batches (99%)" in bound.evidence
    assert_bounded(verdict)


def test_compute_bound_gpu_is_compute_with_its_busy_share() -> None:
    verdict = verdict_of(*scenario(sim.COMPUTE_BOUND)[:2])
    assert verdict.primary == "compute"
    bound = finding(verdict, "compute.bound")
    assert bound.metrics["gpu_busy_fraction"] > 0.97
    assert verdict.features.device is not None and not verdict.features.device.busy_is_lower_bound
    assert "the GPU is busy 100% of step time (device clock)" in bound.evidence
    assert {r.id for r in bound.recommendations} == {"torch.compile"}
    assert_bounded(verdict)


def test_compute_bound_gpu_printing_loss_item_every_step_is_compute_not_algorithm() -> None:
    records, samples, _ = scenario(sim.COMPUTE_BOUND_ITEM)
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
    records, samples, _ = scenario(sim.LOADER_OVERLAPPED)
    assert verdict_of(host_only(records), samples).primary == "data"  # what host timing concludes
    verdict = verdict_of(records, samples)
    assert verdict.primary == "compute"
    assert not any(f.category == "data" for f in verdict.findings)
    bound = finding(verdict, "compute.bound")
    assert bound.metrics["host_data_wait_fraction"] > 0.2
    assert bound.metrics["gpu_idle_data_wait_fraction"] < 0.01
    assert bound.metrics["gpu_busy_fraction"] <= 1.0
    waited = bound.metrics["host_data_wait_fraction"]
    assert f"the loop's wait for batches ({waited:.0%}) is hidden behind GPU work" in bound.evidence


def test_launch_bound_gpu_is_host_overhead_not_compute_and_says_busy_is_a_lower_bound() -> None:
    records, samples, run = scenario(sim.LAUNCH_BOUND)
    assert verdict_of(host_only(records), samples).primary == "compute"  # host timers see launches
    verdict = verdict_of(records, samples)
    assert verdict.primary == "algorithm" and verdict.severity == "critical"
    overhead = finding(verdict, "algorithm.host_overhead")
    device = verdict.features.device
    assert device is not None and device.busy_is_lower_bound
    busy, _, _ = steady_truth(run)
    # The markers see almost none of the ~14% the tiny kernels really take: a lower bound, and
    # the evidence says so instead of claiming the GPU is busy 0%.
    assert overhead.metrics["gpu_busy_fraction"] <= busy < 0.2
    assert overhead.metrics["host_ahead_s_p50"] == pytest.approx(0.0, abs=1e-4)  # never ahead
    assert "waiting for the host to launch work (launch-bound" in overhead.evidence
    idle = verdict.features.fractions["other"]
    assert f"idle up to {idle:.0%}" in overhead.evidence
    assert f"busy time is known only as a lower bound (at least {device.busy_fraction:.0%})" in overhead.evidence
    assert "NVML: utilization 14%" in overhead.evidence  # NVML's figure beside it, close to the truth
    graphs = next(r for r in overhead.recommendations if r.id == "torch.compile")
    assert 'mode="reduce-overhead"' in graphs.how
    # Half the measured idle removed, and the idle in its reason is the one in the evidence.
    assert graphs.estimated_speedup == pytest.approx(removed(idle * 0.5))
    assert f"up to {idle:.0%}" in graphs.why
    assert_bounded(verdict)
    document = verdict.to_json("r")
    assert document["device"]["busy_is_lower_bound"] is True


def test_ddp_job_waiting_for_collectives_is_communication_bound_per_rank() -> None:
    """The stream waits 60 ms a step for DDP's all-reduce: the markers count that wait busy,
    the probe moves DDP's exposed share of the backward pass (on the device clock) to
    communication, so busy is the kernels and communication lies within the idle."""
    records, samples, run = scenario(sim.DDP_COMM_BOUND, ranks=2)
    verdict = verdict_of(records, samples)
    assert verdict.primary == "communication" and verdict.severity == "critical"
    exposed = finding(verdict, "communication.exposed")
    busy, _, step_s = steady_truth(run)
    assert exposed.metrics["communication_fraction"] == pytest.approx(0.06 / step_s, abs=0.02)
    assert exposed.metrics["gpu_busy_fraction"] == pytest.approx(busy, abs=0.02)
    busy, comm = exposed.metrics["gpu_busy_fraction"], exposed.metrics["communication_fraction"]
    assert f"the GPU computes {busy:.0%} of the step and waits for collectives {comm:.0%}" in exposed.evidence
    # Each rank joined with the NVML samples of its own GPU.
    per_rank = verdict.features.device.per_rank.set_index("rank")  # type: ignore[union-attr]
    assert per_rank.loc[0, "gpu_index"] == 0 and per_rank.loc[1, "gpu_index"] == 1
    assert per_rank.loc[1, "nvml_utilization_ratio"] == pytest.approx(busy, abs=0.03)
    assert_bounded(verdict)


def test_steps_without_device_timing_are_judged_on_the_host_clock_exactly_as_before() -> None:
    records, samples = scenario(sim.COMPUTE_BOUND_ITEM)[:2]
    mixed = [r if r.step % 2 else replace(r, **dict.fromkeys(GPU_TIMING_FIELDS)) for r in records]
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
    records, samples = scenario(sim.COMPUTE_BOUND)[:2]
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

    records, samples = scenario(sim.COMPUTE_BOUND_ITEM, steps=200)[:2]
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

    records, samples = scenario(sim.LAUNCH_BOUND, steps=200)[:2]
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
    assert document["device"]["steps_timed"] >= document["steps"] - 1  # the last may end unreached
    assert document["device"]["busy_fraction"] < 0.15
    assert "launch-bound" in document["summary"]
    for fmt in ("text", "md", "html"):
        shown = run_cli("report", str(path), "--format", fmt, env=profilerd_env, timeout=120)
        assert shown.returncode == 0, shown.stderr
        busy, idle = document["device"]["busy_fraction"], document["device"]["idle_fraction"]
        timed, steps = document["device"]["steps_timed"], document["steps"]
        text = html.unescape(shown.stdout).replace("\n", " ")
        # Launch-bound: the busy share is a lower bound, and the line says so.
        assert f"On the GPU's clock ({timed} of {steps} steps): busy at least {busy:.0%}, idle up to {idle:.0%}" in text


def test_a_simulated_gpu_job_through_a_real_daemon_and_profilerd_report(profilerd_env: dict[str, str]) -> None:
    """The probe's own datagrams (this process's pid: the daemon checks the sender) over the
    daemon's socket, late device timing included; the run it records is reported by the CLI."""
    import os
    import socket
    import time

    from profilerd.config import load
    from profilerd.daemon import Daemon
    from profilerd.gpu import NoGpuBackend
    from profilerd_probes import wire

    run = run_scenario(sim.COMPUTE_BOUND_ITEM, 60, job="sim-daemon")
    assert run.probe.ident["pid"] == os.getpid()
    late = [d for d in run.datagrams if isinstance(m := wire.decode(d), wire.JsonMessage) and m.kind == "step_timing"]
    assert late  # the first steps' device timing came after them
    config, problems = load()
    assert problems == []
    daemon = Daemon(config, RULES, gpu_backend=NoGpuBackend("no GPU in tests"))
    daemon.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            for datagram in run.datagrams:
                sock.sendto(datagram, str(config.socket_path))
            end = {"pid": os.getpid(), "run_id": "sim-daemon", "exit_code": 0}
            sock.sendto(wire.encode_json(wire.KIND_RUN_END, end), str(config.socket_path))
        deadline = time.monotonic() + 60
        while daemon.store.runs.get("sim-daemon") is None or daemon.store.runs["sim-daemon"].state != "closed":
            assert time.monotonic() < deadline, "the run was not closed"
            time.sleep(0.05)
    finally:
        daemon.stop()
    result = run_cli("report", "sim-daemon", "--format", "json", env=profilerd_env, timeout=120)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["primary"] == "compute", document["summary"]
    assert document["device"]["busy_fraction"] > 0.95
    assert document["device"]["steps_timed"] >= document["steps"] - 1  # the first steps too, sent late
    text = run_cli("report", "sim-daemon", env=profilerd_env, timeout=120)
    assert f"busy {document['device']['busy_fraction']:.0%}" in text.stdout.replace("\n", " ")
