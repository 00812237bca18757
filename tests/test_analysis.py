"""The diagnosis on synthetic windows: categories, evidence, bounds, hysteresis, rules files."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from profilerd.analysis.features import Context, compute_features, steps_frame
from profilerd.analysis.recommendations import removed
from profilerd.analysis.rules import REGISTRY, load_rules
from profilerd.analysis.verdict import VerdictTracker, evaluate
from profilerd.model import StepRecord
from profilerd_probes.wire import FLAG_HAS_LOSS, FLAG_HAS_LR

RULES, _ = load_rules()
CPU_CONFIG = {
    "device_type": "cpu",
    "cpu_capability": "AVX512",
    "dataloader": {"num_workers": 0, "pin_memory": False, "persistent_workers": False, "batch_size": 16},
    "models": [{"class": "Net", "parameters": 1000, "parameter_dtypes": {"float32": 1000}, "compiled": False}],
    "optimizers": [{"class": "AdamW", "hyperparameters": {"lr": 0.001, "foreach": None, "fused": None}}],
    "autocast": {"enabled": False},
}


def make_steps(
    n: int = 200,
    step_s: float = 0.1,
    data: float = 0.0,
    fwd: float = 0.3,
    bwd: float = 0.4,
    opt: float = 0.1,
    comm: float = 0.0,
    rank: int = 0,
    start: float = 1_000_000.0,
) -> list[StepRecord]:
    """n steps whose phases take the given shares of step_s."""
    return [
        StepRecord(
            "job",
            rank,
            100 + rank,
            i + 1,
            start + (i + 1) * step_s,
            step_s,
            data * step_s,
            fwd * step_s,
            bwd * step_s,
            opt * step_s,
            comm * step_s,
        )
        for i in range(n)
    ]


def verdict_for(records: list[StepRecord], config: dict | None = None, **context: float):
    ctx = Context(config=config or CPU_CONFIG, **context)
    return evaluate(compute_features(steps_frame(records), ctx, RULES.warmup_steps), RULES)


def test_data_wait_above_critical_is_data_bound_with_num_workers() -> None:
    verdict = verdict_for(make_steps(data=0.6, fwd=0.1, bwd=0.2, opt=0.05), cpu_count=8, host_busy_cores=1.5)
    assert verdict.primary == "data"
    assert verdict.severity == "critical"
    assert "60% of step time waiting for batches" in verdict.summary
    recs = {r["id"]: r for r in verdict.recommendations()}
    assert "dataloader.num_workers" in recs
    assert "to 6" in recs["dataloader.num_workers"]["title"]  # 6.5 free cores -> 6 workers
    assert 1.0 < recs["dataloader.num_workers"]["estimated_speedup"] <= removed(0.6) + 1e-9


def test_data_wait_between_thresholds_is_a_warning() -> None:
    verdict = verdict_for(make_steps(data=0.15, fwd=0.3, bwd=0.4, opt=0.1))
    finding = next(f for f in verdict.findings if f.rule == "data.input_wait")
    assert finding.severity == "warning"
    assert finding.thresholds == {"warning": 0.10, "critical": 0.20}
    assert finding.metrics["data_wait_fraction"] == pytest.approx(0.15)


def test_low_data_wait_and_busy_compute_is_compute_bound() -> None:
    verdict = verdict_for(make_steps(data=0.03, fwd=0.35, bwd=0.45, opt=0.12))
    assert verdict.primary == "compute"
    assert not any(f.category == "data" for f in verdict.findings)
    ids = {r["id"] for r in verdict.recommendations()}
    assert "torch.compile" in ids
    assert "optimizer.fused" in ids
    assert "amp.autocast" not in ids  # a CPU without AMX gains nothing from bf16 autocast


def test_autocast_is_recommended_for_fp32_on_cuda() -> None:
    config = dict(CPU_CONFIG, device_type="cuda")
    verdict = verdict_for(make_steps(data=0.0, fwd=0.4, bwd=0.5, opt=0.05), config)
    recs = {r["id"]: r for r in verdict.recommendations()}
    assert "amp.autocast" in recs
    assert "torch.autocast" in recs["amp.autocast"]["how"]
    assert verdict.severity == "warning"


def test_unattributed_time_is_algorithm_host_overhead() -> None:
    verdict = verdict_for(make_steps(data=0.02, fwd=0.2, bwd=0.2, opt=0.05))  # 53% other
    assert verdict.primary == "algorithm"
    assert "loop.host_work" in {r["id"] for r in verdict.recommendations()}


def test_exposed_communication_is_communication_bound() -> None:
    verdict = verdict_for(make_steps(data=0.0, fwd=0.2, bwd=0.2, opt=0.05, comm=0.5))
    assert verdict.primary == "communication"


def test_fractions_sum_to_one_and_p95_is_reported() -> None:
    records = make_steps(data=0.3, fwd=0.2, bwd=0.2, opt=0.1)
    verdict = verdict_for(records)
    document = verdict.to_json("run-1")
    assert sum(document["fractions"].values()) == pytest.approx(1.0, abs=0.01)
    assert document["schema"] == "profilerd.verdict/v1"
    assert document["step_time_s"]["p50"] == pytest.approx(0.1)
    assert document["steps"] == len(records) - RULES.warmup_steps


def test_no_verdict_before_enough_steps() -> None:
    few = verdict_for(make_steps(n=15, data=0.9, fwd=0.05, bwd=0.05, opt=0.0))
    assert few.primary == "none"
    assert few.summary == "Not enough evidence yet: 13 of 20 steps observed"


def test_a_short_run_gets_a_verdict_whose_confidence_says_how_much_it_rests_on() -> None:
    """58 steps in 2 s are enough for a verdict; it says so, and is less sure than 10 s of steps."""
    short = verdict_for(make_steps(n=60, step_s=0.035, data=0.9, fwd=0.05, bwd=0.05, opt=0.0))
    long = verdict_for(make_steps(n=300, step_s=0.035, data=0.9, fwd=0.05, bwd=0.05, opt=0.0))
    assert short.primary == long.primary == "data"
    assert short.confidence < long.confidence
    document = short.to_json("run-s")
    assert document["evidence"]["steps"] == 58
    assert document["evidence"]["seconds"] == pytest.approx(58 * 0.035, abs=0.01)
    assert document["evidence"]["basis"].startswith("58 steps over 2.0 s; confidence")
    assert "(low)" in document["evidence"]["basis"] or "(medium)" in document["evidence"]["basis"]
    assert long.to_json("run-l")["evidence"]["basis"].endswith("(high)")


def test_every_estimate_respects_amdahl() -> None:
    for shares in ((0.6, 0.1, 0.2, 0.05, 0.0), (0.02, 0.2, 0.2, 0.05, 0.0), (0.0, 0.4, 0.5, 0.05, 0.0)):
        verdict = verdict_for(
            make_steps(data=shares[0], fwd=shares[1], bwd=shares[2], opt=shares[3]),
            dict(CPU_CONFIG, device_type="cuda"),
            cpu_count=16,
            host_busy_cores=1.0,
        )
        fractions = verdict.features.fractions
        for finding in verdict.findings:
            key = {"data": "data_wait", "compute": "compute", "algorithm": "other"}[finding.category]
            for rec in finding.recommendations:
                assert 1.0 <= rec.estimated_speedup <= removed(fractions[key]) + 1e-9, rec


def test_multi_rank_verdict_has_per_rank_detail() -> None:
    records = make_steps(rank=0, data=0.05) + make_steps(rank=1, data=0.4, fwd=0.2, bwd=0.2, opt=0.05)
    document = verdict_for(records).to_json("run-2")
    assert [r["rank"] for r in document["per_rank"]] == [0, 1]
    assert document["per_rank"][1]["fractions"]["data_wait"] == pytest.approx(0.4, abs=0.01)


def test_hysteresis_holds_the_verdict_until_a_change_persists() -> None:
    tracker = VerdictTracker(RULES.hysteresis_evaluations)
    data = verdict_for(make_steps(data=0.6, fwd=0.1, bwd=0.2, opt=0.05))
    compute = verdict_for(make_steps(data=0.0, fwd=0.35, bwd=0.45, opt=0.12))
    assert tracker.update(data).primary == "data"
    assert tracker.update(compute).primary == "data"  # one evaluation is not enough
    assert tracker.update(data).primary == "data"
    shown = [tracker.update(compute).primary for _ in range(RULES.hysteresis_evaluations)]
    assert shown[-1] == "compute"
    assert shown[0] == "data"


def test_rules_file_overrides_thresholds(tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text('[rules."data.input_wait"]\nwarning = 0.5\ncritical = 0.7\n')
    strict, problems = load_rules(rules_file)
    assert problems == []
    records = make_steps(data=0.3, fwd=0.3, bwd=0.3, opt=0.05)
    ctx = Context(config=CPU_CONFIG)
    verdict = evaluate(compute_features(steps_frame(records), ctx, strict.warmup_steps), strict)
    assert not any(f.rule == "data.input_wait" for f in verdict.findings)


def test_bad_rules_file_names_the_key_and_file(tmp_path: Path) -> None:
    rules_file = tmp_path / "bad.toml"
    rules_file.write_text('[rules."data.input_wait"]\nwarnign = 0.5\ncritical = "high"\n[rules."no.such"]\nx = 1\n')
    _, problems = load_rules(rules_file)
    text = "\n".join(problems)
    assert "unknown key 'warnign'" in text
    assert "'critical' must be a number" in text
    assert "unknown rule 'no.such'" in text
    assert str(rules_file) in text


def test_every_rule_has_thresholds_and_a_description() -> None:
    for rule_id, rule in REGISTRY.items():
        assert rule_id in RULES.thresholds
        assert rule.description
        assert rule.category in ("data", "compute", "communication", "algorithm")


def test_rules_doc_is_generated_from_the_registry() -> None:
    from profilerd.analysis.docs import render

    doc = Path(__file__).resolve().parents[1] / "docs" / "rules.md"
    assert doc.read_text() == render(), "regenerate: python -m profilerd.analysis.docs > docs/rules.md"


# ---- advice agrees with its evidence ------------------------------------------------------------------
def loader_config(workers: int) -> dict:
    return dict(CPU_CONFIG, dataloader=dict(CPU_CONFIG["dataloader"], num_workers=workers, persistent_workers=True))


def test_a_loader_that_saturates_the_host_gets_cheaper_samples_not_more_workers() -> None:
    """Two workers at a full core each on 2 cores: more workers have nowhere to run."""
    verdict = verdict_for(
        make_steps(data=0.7, fwd=0.1, bwd=0.15, opt=0.03),
        loader_config(2),
        cpu_count=2,
        host_busy_cores=1.95,
        worker_cpu_max_ratio=0.98,
    )
    assert verdict.primary == "data"
    recs = {r["id"]: r for r in verdict.recommendations() + verdict.minor_recommendations()}
    assert "dataloader.num_workers" not in recs
    cheaper = recs["dataloader.cheaper_samples"]
    assert "CPU-bound" in cheaper["title"]
    assert "cache" in cheaper["how"] and "GPU" in cheaper["how"]
    assert cheaper["why"].startswith("0.1 of 2 cores are free with 2 DataLoader workers running")
    assert "the input pipeline is CPU-bound" in verdict.summary


@pytest.mark.parametrize("workers", [0, 1, 2, 4])
@pytest.mark.parametrize("free", [0.0, 0.4, 1.0, 1.6, 3.0, 6.5])
@pytest.mark.parametrize("busy_worker", [0.2, 0.6, 0.98])
def test_more_workers_are_recommended_only_where_free_cores_can_run_them(
    workers: int, free: float, busy_worker: float
) -> None:
    verdict = verdict_for(
        make_steps(data=0.6, fwd=0.1, bwd=0.2, opt=0.05),
        loader_config(workers),
        cpu_count=8,
        host_busy_cores=8 - free,
        worker_cpu_max_ratio=busy_worker if workers else None,
    )
    recs = {r["id"]: r for r in verdict.recommendations() + verdict.minor_recommendations()}
    # What one more worker needs: what a current one uses, unless the host was full (then it got less).
    per_worker = max(busy_worker, 0.1) if workers and free >= 1 else 1.0
    if "dataloader.num_workers" in recs:
        rec = recs["dataloader.num_workers"]
        suggested = int(rec["title"].rsplit(" ", 1)[1])
        assert rec["title"].startswith(f"Raise DataLoader num_workers from {workers} to ")
        assert suggested > workers
        assert (suggested - workers) * per_worker <= free + 1e-9, rec
        assert f"{free:.1f} of 8 cores are free" in rec["why"]
    else:
        assert free < per_worker
        assert "dataloader.cheaper_samples" in recs


def test_without_a_host_measurement_the_why_says_so() -> None:
    verdict = verdict_for(make_steps(data=0.6, fwd=0.1, bwd=0.2, opt=0.05))
    rec = next(r for r in verdict.recommendations() if r["id"] == "dataloader.num_workers")
    assert rec["title"] == "Raise DataLoader num_workers from 0 to 2"
    assert rec["why"] == "the host's free cores were not measured: check that 2 more cores are idle"


def test_a_straggler_fix_is_bounded_by_the_culprits_excess_work() -> None:
    """The culprit's step is 87% data wait; the others wait 89% of theirs for it. Fixing it removes
    the culprit's excess own work, not all of the others' wait."""
    culprit = make_steps(rank=3, data=0.87, fwd=0.04, bwd=0.05, opt=0.01, comm=0.03)
    others = [make_steps(rank=r, data=0.01, fwd=0.04, bwd=0.05, opt=0.01, comm=0.89) for r in range(3)]
    verdict = verdict_for(culprit + [s for rank in others for s in rank])
    finding = next(f for f in verdict.findings if f.rule == "communication.straggler")
    rec = finding.recommendations[0]
    gap = finding.metrics["gap_fraction"]
    assert rec.estimated_speedup == pytest.approx(removed(min(gap, finding.metrics["victim_wait_fraction"])))
    assert rec.estimated_speedup < removed(finding.metrics["victim_wait_fraction"])
    assert f"{gap:.0%} of a step longer" in rec.why


def test_fixes_estimated_under_the_minimum_go_to_the_details() -> None:
    verdict = verdict_for(make_steps(data=0.02, fwd=0.35, bwd=0.45, opt=0.04))
    shown = verdict.recommendations()
    minor = verdict.minor_recommendations()
    assert all(r["estimated_speedup"] >= RULES.min_speedup for r in shown)
    assert minor and all(r["estimated_speedup"] < RULES.min_speedup for r in minor)
    assert "optimizer.fused" in {r["id"] for r in minor}  # 4% of step time, fused 2x faster: ~1.02x
    document = verdict.to_json("run-m")
    assert document["minor_recommendations"] == minor and document["recommendations"] == shown


def test_correctness_fixes_come_first_and_are_never_minor() -> None:
    records = make_steps(data=0.6, fwd=0.1, bwd=0.2, opt=0.05)
    records = [replace(s, loss=float("nan"), flags=FLAG_HAS_LOSS) for s in records]
    verdict = verdict_for(records, cpu_count=8, host_busy_cores=1.0)
    shown = verdict.recommendations()
    assert shown[0]["id"] == "convergence.nonfinite" and shown[0]["estimated_speedup"] == 1.0
    assert "dataloader.num_workers" in {r["id"] for r in shown}


# ---- live windows hold time, at any step rate -----------------------------------------------------------
def live_store(window_steps: int, window_s: float, ranks: int = 2):
    from profilerd.model import ProbeSession
    from profilerd.store import Store

    store = Store(window_steps, window_s)
    for rank in range(ranks):
        store.add_session(ProbeSession(100 + rank, "job", "run-1", rank, rank, ranks, "h", ("t",), 0.0, "1"))
    return store


def feed(store, records: list[StepRecord]) -> None:
    for seq, record in enumerate(sorted(records, key=lambda s: s.end_unix_s), 1):
        store.add_step(record, seq, 0)


def analyse_live(store, analyzer, now: float) -> None:
    """One live-analysis tick, its verdicts written to the store as the daemon's fan-out does."""
    for job, verdict in analyzer.tick(now).items():
        store.set_verdict(job, verdict)


def test_a_job_at_200_steps_per_second_gets_a_live_verdict_within_10_s() -> None:
    from profilerd.analysis.live import LiveAnalyzer
    from profilerd.config import DaemonConfig

    defaults = DaemonConfig()
    store = live_store(defaults.window_steps, defaults.window_s)
    records = [
        s for r in range(2) for s in make_steps(n=2000, step_s=0.005, fwd=0.1, bwd=0.2, opt=0.05, comm=0.6, rank=r)
    ]
    feed(store, records)
    now = max(s.end_unix_s for s in records)
    analyse_live(store, LiveAnalyzer(store, RULES), now)
    verdict = store.jobs["job"].verdict
    assert verdict.primary == "communication"
    assert verdict.features.duration_s >= RULES.min_seconds - 0.1  # the window spans 10 s, not 500 steps
    assert verdict.to_json("run-1")["evidence"]["level"] == "high"


def test_a_slow_job_keeps_enough_steps_in_its_live_window() -> None:
    """10 s per step: 120 s hold 12 steps, fewer than a verdict needs; the window keeps 22."""
    from profilerd.analysis.live import LiveAnalyzer

    store = live_store(500, 120.0, ranks=1)
    records = make_steps(n=40, step_s=10.0, data=0.6, fwd=0.1, bwd=0.2, opt=0.05)
    feed(store, records)
    analyse_live(store, LiveAnalyzer(store, RULES), max(s.end_unix_s for s in records))
    verdict = store.jobs["job"].verdict
    assert verdict.primary == "data"
    assert RULES.min_steps <= verdict.features.steps < 40


def test_the_live_verdict_keeps_the_first_nan_after_it_left_the_ring() -> None:
    from profilerd.analysis.live import LiveAnalyzer

    store = live_store(100, 120.0, ranks=1)
    analyzer = LiveAnalyzer(store, RULES)
    records = [
        replace(s, loss=float("nan") if s.step >= 9 else 2.0, flags=FLAG_HAS_LOSS)
        for s in make_steps(n=600, step_s=0.01, fwd=0.3, bwd=0.4, opt=0.1)
    ]
    for start in range(0, 600, 50):  # a tick every 50 steps; the ring holds 100
        chunk = records[start : start + 50]
        feed(store, chunk)
        analyse_live(store, analyzer, chunk[-1].end_unix_s)
    verdict = store.jobs["job"].verdict
    finding = next(f for f in verdict.findings if f.rule == "algorithm.loss_nonfinite")
    assert finding.metrics["first_nonfinite_step"] == 9
    assert finding.metrics["nonfinite_readings"] == 592  # every step counted once


def test_a_live_verdict_is_recorded_when_it_changes_and_at_least_every_10_s(tmp_path: Path) -> None:
    import sqlite3

    from profilerd.analysis.live import LiveAnalyzer
    from profilerd.recordings.schema import recording_file
    from profilerd.recordings.writer import Recorder
    from profilerd.samplers.sinks import RECORD_VERDICT_EVERY_S, RecordingSink, VerdictRecord

    store = live_store(500, 120.0, ranks=1)
    records = make_steps(n=40, step_s=10.0, data=0.6, fwd=0.1, bwd=0.2, opt=0.05)
    feed(store, records)
    verdict = LiveAnalyzer(store, RULES).tick(max(s.end_unix_s for s in records))["job"]
    assert verdict.primary == "data"
    changed = replace(verdict, severity="critical" if verdict.severity != "critical" else "warning")
    recorder = Recorder(tmp_path)
    recorder.start()
    now = [1000.0]
    sink = RecordingSink(recorder, store, clock=lambda: now[0])
    sink.verdicts([VerdictRecord("job", "run-1", verdict)])
    now[0] += RECORD_VERDICT_EVERY_S / 2
    sink.verdicts([VerdictRecord("job", "run-1", verdict)])  # unchanged, too soon: not again
    sink.verdicts([VerdictRecord("job", "run-1", changed)])  # changed: at once
    now[0] += RECORD_VERDICT_EVERY_S
    sink.verdicts([VerdictRecord("job", "run-1", changed)])  # unchanged, but 10 s on: again
    sink.verdicts([VerdictRecord("job", None, verdict)])  # a job without a run has no recording
    recorder.stop()
    conn = sqlite3.connect(recording_file(tmp_path, "run-1"))
    rows = conn.execute("SELECT job, primary_category, severity FROM verdicts ORDER BY rowid").fetchall()
    conn.close()
    assert rows == [
        ("job", "data", verdict.severity),
        ("job", "data", changed.severity),
        ("job", "data", changed.severity),
    ]


def test_a_loader_in_the_loop_waiting_on_io_may_move_to_one_worker_even_on_a_full_host() -> None:
    steps = make_steps(data=0.8, fwd=0.05, bwd=0.1, opt=0.02)
    io_bound = verdict_for(steps, cpu_count=2, host_busy_cores=2.0, trainer_cpu_cores=0.2)
    rec = next(r for r in io_bound.recommendations() if r["id"] == "dataloader.num_workers")
    assert rec["title"] == "Raise DataLoader num_workers from 0 to 1"
    assert "mostly waits on I/O" in rec["why"] and "0.0 of 2 cores are free" in rec["why"]
    cpu_bound = verdict_for(steps, cpu_count=2, host_busy_cores=2.0, trainer_cpu_cores=1.0)
    ids = {r["id"] for r in cpu_bound.recommendations()}
    assert "dataloader.num_workers" not in ids and "dataloader.cheaper_samples" in ids


def test_a_cpu_job_busy_outside_its_data_wait_is_not_said_to_wait_on_io() -> None:
    """Lightning's MLP in a 0.8 s run: 68% compute and 17% host work on the CPU, the process
    sampled at 0.10 cores (outside its steps). Its loader is not 'mostly waiting on I/O' and two
    workers do not fit in the 0.26 free cores: the advice must agree with the step's own shares."""
    steps = make_steps(data=0.15, fwd=0.2, bwd=0.25, opt=0.23)
    verdict = verdict_for(steps, cpu_count=2, host_busy_cores=1.74, trainer_cpu_cores=0.10)
    recs = {r["id"]: r for r in verdict.recommendations() + verdict.minor_recommendations()}
    assert "dataloader.num_workers" not in recs
    assert all("waits on I/O" not in r["why"] for r in recs.values())
    assert "dataloader.cheaper_samples" in recs


def test_hysteresis_does_not_hold_back_a_nan_loss() -> None:
    tracker = VerdictTracker(RULES.hysteresis_evaluations)
    records = make_steps(data=0.6, fwd=0.1, bwd=0.2, opt=0.05)
    assert tracker.update(verdict_for(records)).primary == "data"
    broken = [replace(s, loss=float("nan"), flags=FLAG_HAS_LOSS) for s in records]
    assert tracker.update(verdict_for(broken)).primary == "algorithm"


def test_live_windows_span_min_seconds_at_any_rate_and_aim_at_500_steps() -> None:
    from profilerd.analysis.diagnosis import WINDOW_TARGET_STEPS, select_window

    for steps_per_s, expected in ((400.0, 4000), (200.0, 2000), (20.0, WINDOW_TARGET_STEPS), (1.0, 120)):
        records = make_steps(n=4000, step_s=1 / steps_per_s)
        frame = steps_frame(records)
        window = select_window(frame, records[-1].end_unix_s, 120.0, 4000, RULES)
        assert abs(len(window) - expected) <= 1, (steps_per_s, len(window))


# ---- the primary class: where the step time goes that a fix gives back, a broken training first ----
def hf_trainer_steps(n: int = 200) -> list[StepRecord]:
    """The phase split the Hugging Face Trainer showed on CPU (docs/compatibility.md): 79%
    forward, backward and optimizer, 19% host work between the phases, 2% data wait."""
    return make_steps(n=n, data=0.017, fwd=0.42, bwd=0.344, opt=0.027)


def test_a_step_that_is_79_percent_compute_is_compute_bound_with_host_work_as_a_secondary_finding() -> None:
    verdict = verdict_for(hf_trainer_steps())
    assert verdict.features.fractions["compute"] == pytest.approx(0.791, abs=0.001)
    assert verdict.primary == "compute"
    assert verdict.severity == "info"  # the compute class's own severity: an eager fp32 model on CPU
    assert verdict.summary.startswith("COMPUTE-BOUND: 79% of step time in forward, backward and optimizer")
    host = next(f for f in verdict.findings if f.rule == "algorithm.host_overhead")
    assert host.severity == "warning"  # still reported, with its own severity and its fix
    assert verdict.findings[0].rule == "compute.bound"
    document = verdict.to_json("hf")
    assert (document["primary"], document["severity"]) == ("compute", "info")
    assert [f["rule"] for f in document["findings"]][:2] == ["compute.bound", "algorithm.host_overhead"]
    ids = [r["id"] for r in document["recommendations"]]
    assert ids.index("torch.compile") < ids.index("loop.host_work")  # the headline's fix comes first


def test_host_work_that_outweighs_what_compute_could_give_back_is_algorithm() -> None:
    """45% of the step between the phases: removing half of it gives more than compiling."""
    verdict = verdict_for(make_steps(data=0.0, fwd=0.25, bwd=0.25, opt=0.05))
    assert verdict.primary == "algorithm" and verdict.severity == "critical"


def test_a_compute_heavy_job_already_compiled_in_bf16_is_bound_by_the_waste_it_can_remove() -> None:
    config = dict(
        CPU_CONFIG,
        cpu_capability="AMX",
        models=[{"class": "Net", "parameter_dtypes": {"bfloat16": 1000}, "compiled": True}],
        optimizers=[{"class": "AdamW", "hyperparameters": {"fused": True}}],
        autocast={"enabled": True},
    )
    verdict = verdict_for(make_steps(data=0.3, fwd=0.3, bwd=0.35, opt=0.05), config)
    assert verdict.features.fractions["compute"] > verdict.features.fractions["data_wait"]
    assert verdict.primary == "data" and verdict.severity == "critical"
    bound = next(f for f in verdict.findings if f.rule == "compute.bound")
    assert bound.recommendations == ()  # nothing left to gain in compute


@pytest.mark.parametrize(
    ("rule", "loss", "lr"),
    [
        ("algorithm.loss_nonfinite", lambda i: math.nan if i >= 50 else 2.0, 1e-3),
        ("algorithm.loss_diverging", lambda i: 2.0 if i < 20 else 40.0 + i % 7, 1e-3),
        ("algorithm.loss_stuck", lambda i: 2.3 * (1.04 if i % 2 else 0.97), 0.0),
    ],
)
def test_a_broken_training_is_algorithm_whatever_the_time_split(rule: str, loss, lr: float) -> None:
    """A compute-bound split with a 1.2x compile fix on the table: the broken loss still wins."""
    records = [
        replace(s, loss=loss(i), lr=lr, flags=FLAG_HAS_LOSS | FLAG_HAS_LR)
        for i, s in enumerate(hf_trainer_steps(n=300))
    ]
    verdict = verdict_for(records)
    assert verdict.findings[0].rule == rule
    assert verdict.primary == "algorithm" and verdict.severity == "critical"
    assert verdict.summary.startswith("ALGORITHM: ")
    assert verdict.recommendations()[0]["rule"] == rule  # and its fix comes before any speedup


def test_advice_about_the_result_does_not_make_a_compute_bound_job_algorithm() -> None:
    """Adam's weight decay is an info finding about the model, not about where the time goes."""
    config = dict(CPU_CONFIG, optimizers=[{"class": "Adam", "hyperparameters": {"weight_decay": 0.01}}])
    verdict = verdict_for(make_steps(data=0.0, fwd=0.45, bwd=0.45, opt=0.05), config)
    assert "algorithm.adam_weight_decay" in {f.rule for f in verdict.findings}
    assert verdict.primary == "compute"


def test_syncs_on_a_cpu_cost_nothing_and_do_not_make_a_compute_bound_job_algorithm() -> None:
    """pytorch/examples word_language_model: 99% compute, a loss.item() per step on CPU."""
    records = [replace(s, sync_count=1, sync_s=0.0001) for s in make_steps(data=0.0, fwd=0.4, bwd=0.59, opt=0.0)]
    verdict = verdict_for(records, dict(CPU_CONFIG, models=[]))
    syncs = next(f for f in verdict.findings if f.rule == "algorithm.sync_in_loop")
    assert syncs.severity == "info" and "on CPU they cost nothing" in syncs.evidence
    assert verdict.primary == "compute"


def test_a_compute_bound_summary_gives_the_compute_share_and_the_best_fix_leads_the_advice() -> None:
    """Lightning's MLP: 44% of the step in an unfused AdamW, 96% compute in all."""
    verdict = verdict_for(make_steps(data=0.02, fwd=0.17, bwd=0.36, opt=0.44))
    assert verdict.primary == "compute"
    assert verdict.summary.startswith("COMPUTE-BOUND: 97% of step time in forward, backward and optimizer")
    assert verdict.recommendations()[0]["id"] == "optimizer.fused"


@pytest.mark.parametrize("free_cores", [0.0, 1.4])
def test_an_attach_without_steps_gets_the_loader_estimate_the_steps_would_give(free_cores: float) -> None:
    """Stack samples give shares but no step times: the loader fix is estimated from the shares,
    as for steps (a 1.0x estimate would leave a data-starved target without advice, and a
    compute finding's small fix would then name the class)."""
    from profilerd.analysis.diagnosis import SampledPhases, sampled_features

    shares = {"data_wait": 0.42, "forward": 0.2, "backward": 0.3, "optimizer": 0.08}
    context = Context(config=CPU_CONFIG, cpu_count=2, host_busy_cores=2.0 - free_cores)
    sampled = sampled_features(SampledPhases(seconds=5.0, samples=240, phases=shares), context)
    stepped = compute_features(
        steps_frame(make_steps(data=0.42, fwd=0.2, bwd=0.3, opt=0.08)), context, RULES.warmup_steps
    )
    from_samples, from_steps = evaluate(sampled, RULES), evaluate(stepped, RULES)
    assert from_samples.primary == from_steps.primary == "data"
    fix = from_samples.recommendations()[0]
    assert fix["id"] == from_steps.recommendations()[0]["id"]
    assert fix["estimated_speedup"] == pytest.approx(from_steps.recommendations()[0]["estimated_speedup"], rel=1e-3)
    assert fix["estimated_speedup"] > 1.5
