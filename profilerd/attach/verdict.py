"""The verdict of an attach: what the layers saw, through the one diagnosis, as a verdict document."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypedDict

import pandas as pd

from profilerd.analysis.context import HOST_COLUMNS, PROCESS_COLUMNS
from profilerd.analysis.diagnosis import Observation, SampledPhases, diagnose
from profilerd.analysis.rules import RuleSet
from profilerd.analysis.verdict import Verdict
from profilerd.attach.sampling import L0Summary
from profilerd.attach.target import Target
from profilerd.model import Finding

Layer = Literal["L0", "L1", "L2"]


class LayerReport(TypedDict, total=False):
    """What one layer contributed, in the document's ``layers``: available, and then what it saw
    (L0's means, L1's stack samples per phase, L2's steps), or why not."""

    available: bool
    saw: dict[str, float | int | bool | None]
    samples: dict[str, int]
    steps: int
    detached: bool
    why: str


Layers = dict[str, LayerReport]  # keyed by Layer


L0_RULE = "attach.thread_cpu"  # the estimate's finding: not a rule of the rules file
L0_CONFIDENCE = 0.5  # thread CPU alone cannot see phases: at best a medium-low confidence


def classify_l0(s: L0Summary) -> tuple[Finding, dict[str, float]]:
    """A finding and rough fractions from thread CPU alone, for the one decision to weigh.

    The training thread's own CPU share says how much of the time it computes or runs Python;
    the rest it is blocked (waiting for input, the device or other ranks). Busy workers with
    an idle loop mean the input pipeline is the limit.
    """
    busy = min(1.0, s.main_thread_cores)
    workers_busy = s.worker_max_ratio is not None and s.worker_max_ratio >= 0.8
    compute_cores = s.main_thread_cores + s.other_threads_cores
    if workers_busy and busy < 0.6:
        evidence = (
            f"{s.workers} DataLoader workers run at {s.worker_max_ratio:.0%} of a core while the training "
            f"thread is busy only {busy:.0%} of the time"
        )
        category, severity, rough = "data", "warning", {"data_wait": 1 - busy, "compute": busy}
    elif busy < 0.5:
        what = "input" if s.workers or compute_cores < 0.5 else "the device or other ranks"
        evidence = (
            f"the training thread is busy only {busy:.0%} of the time and the process uses "
            f"{compute_cores:.1f} cores: it mostly waits ({what})"
        )
        category, severity, rough = "data", "warning", {"data_wait": 1 - busy, "compute": busy}
    elif s.other_threads_cores < 0.2 and busy >= 0.9:
        evidence = f"the training thread runs at {busy:.0%} of a core while the math threads idle: host-bound"
        category, severity, rough = "algorithm", "warning", {"other": busy, "compute": 1 - busy}
    else:
        evidence = f"the process keeps {compute_cores:.1f} of {s.cpu_count} cores busy computing"
        category, severity, rough = "compute", "info", {"compute": busy, "data_wait": 1 - busy}
    metrics = {"main_thread_busy_ratio": busy, "process_cpu_cores": compute_cores}
    finding = Finding(L0_RULE, category, severity, evidence, L0_CONFIDENCE, metrics, {}, cost=max(rough.values()))
    return finding, rough


@dataclass
class AttachResult:
    target: Target
    layer: Layer
    l0: L0Summary
    l1_counts: Counter[str] | None = None
    l1_note: str | None = None
    l2_note: str | None = None
    verdict: Verdict | None = None
    l0_estimate: Finding | None = None
    notes: list[str] = field(default_factory=list)


def attach_ruleset(ruleset: RuleSet, duration_s: float) -> RuleSet:
    """Evidence for attach is counted in stack samples over the attach window."""
    return replace(ruleset, min_steps=20, min_seconds=min(ruleset.min_seconds, max(1.0, duration_s * 0.5)))


def probed_verdict(recording: Path, ruleset: RuleSet, seconds: float) -> Verdict:
    """The verdict of an attach whose injected probes (L2) recorded steps: the recording's, as
    `report` gives it, over attach-sized evidence (``attach_ruleset``)."""
    from profilerd import recordings as runs

    return runs.analyse(runs.load(recording), attach_ruleset(ruleset, seconds))


def conclude(
    target: Target,
    summary: L0Summary,
    counts: Counter[str] | None,
    note: str | None,
    ruleset: RuleSet,
    duration_s: float,
) -> AttachResult:
    """The best verdict the gathered layers support: L1 stack samples when there are enough,
    else the L0 estimate from thread CPU; either way through the one ``diagnose``."""
    result = AttachResult(target, "L0", summary, counts, note)
    if summary.exited:
        result.notes.append(f"the target exited after {summary.seconds:.1f} s; the verdict uses what was gathered")
    estimate, rough = classify_l0(summary) if summary.samples else (None, None)
    result.l0_estimate = estimate
    if counts and sum(counts.values()) >= 5:
        result.layer = "L1"
        sampled = SampledPhases(summary.seconds, sum(counts.values()), phases=counts)
    elif estimate is not None:
        sampled = SampledPhases(summary.seconds, fractions=rough, estimate=estimate)
    else:
        sampled = SampledPhases(summary.seconds)
    observation = replace(observed(summary), sampled=sampled)
    result.verdict = diagnose(observation, attach_ruleset(ruleset, min(duration_s, summary.seconds)))
    return result


def observed(summary: L0Summary) -> Observation:
    """What L0 saw, as the samples the analysis reads: one host and one process sample holding the
    means over the attach, and the DataLoader workers it found as the configuration."""
    at = time.time()
    hosts = pd.DataFrame(
        [(at, summary.cpu_count, summary.host_busy_cores / max(1, summary.cpu_count))], columns=HOST_COLUMNS
    )
    process = (
        at,
        0,
        0,
        1,
        summary.main_thread_cores + summary.other_threads_cores,
        summary.workers,
        summary.workers_cores,
        summary.worker_max_ratio,
    )
    processes = pd.DataFrame([process], columns=PROCESS_COLUMNS)
    return Observation(config={"dataloader": {"num_workers": summary.workers}}, hosts=hosts, processes=processes)


def document(result: AttachResult, run_id: str) -> dict[str, Any]:
    """The verdict contract of `profilerd run`, plus attach_layer and what each layer saw."""
    layers: Layers = {"L0": {"available": True, "saw": result.l0.to_json()}}
    layers["L1"] = (
        {"available": True, "samples": dict(result.l1_counts)}
        if result.l1_counts
        else {"available": False, "why": result.l1_note or "not requested"}
    )
    layers["L2"] = {"available": False, "why": result.l2_note or "injection not requested (see --inject)"}
    verdict = result.verdict
    assert verdict is not None, "conclude() always decides"
    doc = verdict.to_json(run_id, f"pid-{result.target.pid}")
    notes = list(result.notes)
    if result.layer == "L1":
        # The evidence counted stack samples, not steps: no step boundaries are visible without the
        # probes, so step count, rate and time stay empty rather than mix samples with steps.
        samples = doc["steps"]
        doc.update(steps=0, steps_per_s=0.0, step_time_s={"p50": 0.0, "p95": 0.0, "mean": 0.0}, stack_samples=samples)
        notes.append(
            f"{samples} stack samples of the training thread over {result.l0.seconds:.1f} s; steps, step rate and "
            "step time need the probes (`--inject`, or train under `profilerd run`)"
        )
    return with_attach_fields(doc, result, layers, notes)


def with_attach_fields(doc: dict[str, Any], result: AttachResult, layers: Layers, notes: list[str]) -> dict[str, Any]:
    """The fields an attach adds to the verdict document: which layer decided, what each saw."""
    doc["attach_layer"] = result.layer
    doc["layers"] = layers
    doc["target"] = {"pid": result.target.pid, "python": result.target.python_version}
    if result.l0_estimate is not None:
        doc["l0_estimate"] = {"primary": result.l0_estimate.category, "evidence": result.l0_estimate.evidence}
    doc["notes"] = notes
    return doc
