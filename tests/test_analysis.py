"""The diagnosis on synthetic windows: categories, evidence, bounds, hysteresis, rules files."""

from __future__ import annotations

from pathlib import Path

import pytest

from profilerd.analysis.features import Context, compute_features, steps_frame
from profilerd.analysis.recommendations import removed
from profilerd.analysis.rules import REGISTRY, load_rules
from profilerd.analysis.verdict import VerdictTracker, evaluate
from profilerd.model import StepRecord

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
