"""From features to a verdict: run every rule, pick the primary bottleneck, explain it.

``evaluate`` decides; ``Verdict.to_json`` builds the one verdict document. Callers do not come
here directly: ``analysis.diagnosis.diagnose`` is the entry point of every path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from profilerd.analysis.document import head, headline
from profilerd.analysis.features import Features
from profilerd.analysis.rules import REGISTRY, RuleSet
from profilerd.model import Finding
from profilerd.vocabulary import FRACTION_OF_CATEGORY, Severity


def _cost_key(category: str) -> str:
    """The fraction of step time that a finding of this category costs."""
    return FRACTION_OF_CATEGORY[category]


FULL_EVIDENCE_STEPS = 200  # with this many steps and min_seconds of them, evidence is complete


@dataclass(frozen=True)
class Verdict:
    primary: str  # data | compute | communication | algorithm | none
    severity: str  # ok | info | warning | critical
    summary: str  # the one sentence a user reads first
    features: Features
    findings: tuple[Finding, ...] = ()
    evaluated_unix_s: float = field(default_factory=time.time)
    confidence: float = 0.0  # of the primary category, given the amount of evidence
    min_speedup: float = 1.03  # speed fixes estimated below this are details, not recommendations

    @property
    def headline(self) -> str:
        return headline(self.primary)

    @property
    def basis(self) -> str:
        """What the verdict rests on, in words: steps, seconds, ranks and the confidence."""
        f = self.features
        ranks = f" on {f.ranks} ranks" if f.ranks > 1 else ""
        observed = f"{f.steps} steps over {f.duration_s:.1f} s{ranks}"
        if self.primary == "none":
            return observed
        return f"{observed}; confidence {self.confidence:.2f} ({_level(self.confidence)})"

    def _all_recommendations(self) -> list[dict[str, Any]]:
        """Fixes to a training that is broken (a warning or worse from a correctness rule) come
        first: no speedup matters until they are made. Then the best estimated speedup first."""
        seen: dict[str, dict[str, Any]] = {}
        urgent: set[str] = set()
        for finding in self.findings:
            rule = REGISTRY.get(finding.rule)
            correctness = bool(rule and rule.correctness)
            for rec in finding.recommendations:
                if _breaks_training(finding):
                    urgent.add(rec.id)
                if rec.id not in seen or rec.estimated_speedup > seen[rec.id]["estimated_speedup"]:
                    seen[rec.id] = dict(rec.to_json(), rule=finding.rule, correctness=correctness)
        return sorted(seen.values(), key=lambda r: (r["id"] not in urgent, -r["estimated_speedup"]))

    def recommendations(self) -> list[dict[str, Any]]:
        """Every fix worth making, ids unique: correctness fixes (they claim no speedup) and
        speed fixes estimated at ``min_speedup`` or more."""
        return [
            {k: v for k, v in r.items() if k != "correctness"}
            for r in self._all_recommendations()
            if r["correctness"] or r["estimated_speedup"] >= self.min_speedup
        ]

    def minor_recommendations(self) -> list[dict[str, Any]]:
        """Speed fixes estimated under ``min_speedup``: for the report's details only."""
        return [
            {k: v for k, v in r.items() if k != "correctness"}
            for r in self._all_recommendations()
            if not r["correctness"] and r["estimated_speedup"] < self.min_speedup
        ]

    def to_json(self, run_id: str, job: str | None = None, **extra: Any) -> dict[str, Any]:
        f = self.features
        document: dict[str, Any] = {
            **head(run_id, job, self.primary),
            "severity": self.severity,
            "summary": self.summary,
            "fractions": {k: round(v, 4) for k, v in f.fractions.items()},
            "phases": {k: round(v, 4) for k, v in f.phase_fractions.items()},
            "steps": f.steps,
            "ranks": f.ranks,
            "duration_s": round(f.duration_s, 3),
            "steps_per_s": round(f.steps_per_s, 3),
            "step_time_s": {
                "p50": round(f.step_time_p50_s, 6),
                "p95": round(f.step_time_p95_s, 6),
                "mean": round(f.step_time_mean_s, 6),
            },
            "evidence": {
                "steps": f.steps,
                "seconds": round(f.duration_s, 3),
                "ranks": f.ranks,
                "confidence": round(self.confidence, 3),
                "level": _level(self.confidence) if self.primary != "none" else None,
                "basis": self.basis,
            },
            "findings": [finding.to_json() for finding in self.findings],
            "recommendations": self.recommendations(),
            "minor_recommendations": self.minor_recommendations(),
            "evaluated_unix_s": round(self.evaluated_unix_s, 3),
        }
        if f.device is not None:
            document["device"] = f.device.to_json()
        if f.mfu is not None:
            document["mfu"] = f.mfu.to_json()
        if f.context.gpu:
            document["gpu"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in f.context.gpu.items()}
        if f.ranks > 1 and not f.per_rank.empty:
            document["per_rank"] = [
                {
                    "rank": int(row.rank),
                    "steps": int(row.steps),
                    "step_time_s": {
                        "p50": round(float(row.step_time_p50_s), 6),
                        "p95": round(float(row.step_time_p95_s), 6),
                    },
                    "fractions": {
                        "data_wait": round(float(row.data_wait_fraction), 4),
                        "compute": round(float(row.compute_fraction), 4),
                        "communication": round(float(row.communication_fraction), 4),
                        "other": round(float(row.other_fraction), 4),
                    },
                }
                for row in f.per_rank.itertuples()
            ]
        document.update(extra)
        return document


def evaluate(features: Features, ruleset: RuleSet, estimates: Sequence[Finding] = ()) -> Verdict:
    """One evaluation, no memory: the same input always gives the same verdict.

    A verdict needs ``min_steps`` steps, however short they are; decisive rules (a NaN loss)
    are checked even before that. Less evidence gives a lower confidence, not no verdict.
    ``estimates`` are findings from evidence the rules cannot read (attach's thread CPU); they
    are weighed with the rules' findings by the same decision.
    """
    enough = features.steps >= ruleset.min_steps
    findings = list(estimates)
    for rule in REGISTRY.values():
        if not (enough or rule.decisive):
            continue
        finding = rule.check(features, ruleset.thresholds[rule.id], ruleset.assumptions)
        if finding is not None:
            findings.append(finding)
    if not enough and not findings:
        summary = f"Not enough evidence yet: {features.steps} of {ruleset.min_steps} steps observed"
        return Verdict("none", "ok", summary, features, min_speedup=ruleset.min_speedup)
    findings.sort(key=lambda f: _rank(features, f, ruleset.min_speedup))
    primary, severity = _choose_primary(features, findings, ruleset.min_speedup)
    summary = _summary(primary, features, findings)
    confidence = _verdict_confidence(features, ruleset, primary, findings)
    return Verdict(
        primary,
        severity,
        summary,
        features,
        tuple(findings),
        confidence=confidence,
        min_speedup=ruleset.min_speedup,
    )


def _verdict_confidence(features: Features, ruleset: RuleSet, primary: str, findings: list[Finding]) -> float:
    """The leading finding's confidence, lowered when the verdict rests on few steps or little
    time; decisive evidence (a NaN loss) is as certain on 20 steps as on 20,000."""
    lead = next((f for f in findings if f.category == primary), None)
    rule = REGISTRY.get(lead.rule) if lead is not None else None
    if lead is not None and rule is not None and rule.decisive:
        return lead.confidence
    base = lead.confidence if lead is not None else 0.6
    seconds = features.duration_s / ruleset.min_seconds if ruleset.min_seconds > 0 else 1.0
    amount = min(1.0, features.steps / FULL_EVIDENCE_STEPS, seconds)
    return round(base * (0.6 + 0.4 * amount), 3)


def _level(confidence: float) -> str:
    return "high" if confidence >= 0.8 else "medium" if confidence >= 0.6 else "low"


def _breaks_training(finding: Finding) -> bool:
    """A warning or worse from a correctness rule (NaN, runaway or stuck loss, exploding
    gradients, skipped steps): the training itself is wrong, so no share of step time matters
    until it is fixed."""
    rule = REGISTRY.get(finding.rule)
    return bool(rule and rule.correctness) and Severity(finding.severity).rank >= Severity.WARNING.rank


def _step_cost(features: Features, finding: Finding) -> float:
    """The share of step time a finding accounts for: the rule's own measure where it has one
    (a sync's stall, a straggler's victims' wait), else its category's share."""
    return finding.cost or features.fractions[_cost_key(finding.category)]


def _gain(finding: Finding, min_speedup: float) -> float:
    """The share of step time the finding's best speed fix would give back, estimated as its
    recommendation is (bounded by the measured share it can change: Amdahl); 0 for a finding
    with nothing worth doing about it (a compiled bf16 model, syncs on a CPU), i.e. whose fixes
    are all details under ``min_speedup``."""
    best = max((r.estimated_speedup for r in finding.recommendations), default=1.0)
    return 1.0 - 1.0 / best if best >= min_speedup and best > 1.0 else 0.0


def _rank(features: Features, finding: Finding, min_speedup: float) -> tuple[int, float, float, float]:
    """The order of the findings; the first one decides the primary class.

    A broken training comes first, the most severe first: a diverging run is called that
    whatever the time split. Then the finding whose fixes would give back the most step time,
    then the larger share of step time, then severity. Not severity first: a severity says how
    bad a finding is against its own thresholds (20% host work is ``critical`` for host work,
    80% compute only ``info``, since compute is where a healthy job spends its time), not which
    class holds the step; ranking by severity called Hugging Face's Trainer, 79% compute and
    19% host work, algorithm-bound. Not the largest share alone either: 47% of the step idle
    waiting for batches (1.9x from more workers) is the problem of a job computing 53% of it
    (1.1x from compiling), and a job at 58% compute whose model is already compiled, in bf16
    and fused has nothing to gain there but 1.4x from its 41% of exposed communication. So the
    headline names the class of the fix worth most, as the recommendations' order does.
    """
    severity = -float(Severity(finding.severity).rank)
    if _breaks_training(finding):
        return 0, severity, -finding.cost, 0.0
    rule = REGISTRY.get(finding.rule)
    if rule is not None and rule.correctness:
        # Advice about the result (Adam's weight decay, a plateau), not about where time goes.
        return 2, 0.0, 0.0, severity
    return 1, -_gain(finding, min_speedup), -_step_cost(features, finding), severity


def _choose_primary(features: Features, findings: list[Finding], min_speedup: float) -> tuple[str, str]:
    """The class of the first finding in ``_rank`` order that breaks the training or has a
    speed fix, with the worst severity among that class's findings (a compute-bound job whose
    GPU throttles is as bad as the throttling). Without one, the job is bound by whatever takes
    the largest share: usually compute, where a healthy job should be."""
    lead = next((f for f in findings if _breaks_training(f) or _gain(f, min_speedup) > 0), None)
    if lead is not None:
        primary = lead.category
    else:
        shares = {str(category): features.fractions[key] for category, key in FRACTION_OF_CATEGORY.items()}
        primary = max(shares, key=lambda c: shares[c])
    severities = [Severity(f.severity) for f in findings if f.category == primary]
    return primary, str(max(severities, key=lambda s: s.rank)) if severities else "ok"


def _summary(primary: str, features: Features, findings: list[Finding]) -> str:
    """The headline with the evidence of the class: the broken training that decided it, else
    the finding that holds the most of the step (compute-bound says the compute share, not its
    optimizer's 15%; the best fix leads the recommendations)."""
    mine = [f for f in findings if f.category == primary]
    if mine:
        lead = mine[0] if _breaks_training(mine[0]) else max(mine, key=lambda f: _step_cost(features, f))
        return f"{headline(primary)}: {lead.evidence}"
    share = features.fractions[_cost_key(primary)]
    return f"{headline(primary)}: {share:.0%} of step time; no inefficiency found"


class VerdictTracker:
    """Hysteresis for the live verdict: a new primary must win several evaluations in a row."""

    def __init__(self, evaluations: int) -> None:
        self.evaluations = evaluations
        self.current: Verdict | None = None
        self._candidate: str | None = None
        self._count = 0

    def update(self, fresh: Verdict) -> Verdict:
        current = self.current
        # Decisive evidence (a NaN loss) is not noise to be waited out.
        lead = REGISTRY.get(fresh.findings[0].rule) if fresh.findings else None
        decisive = lead is not None and lead.decisive
        if current is None or current.primary == "none" or fresh.primary == current.primary or decisive:
            self._candidate, self._count = None, 0
            self.current = fresh
            return fresh
        if fresh.primary == "none":
            # Evidence thinned out (an idle window): keep the last verdict, refreshed in time.
            self.current = replace(current, evaluated_unix_s=fresh.evaluated_unix_s)
            return self.current
        if fresh.primary == self._candidate:
            self._count += 1
        else:
            self._candidate, self._count = fresh.primary, 1
        if self._count >= self.evaluations:
            self._candidate, self._count = None, 0
            self.current = fresh
            return fresh
        # Not yet: keep the shown category but with the fresh numbers behind it.
        held = [f for f in fresh.findings if f.category == current.primary]
        severity = held[0].severity if held else current.severity
        self.current = replace(
            fresh,
            primary=current.primary,
            severity=severity,
            summary=_summary(current.primary, fresh.features, list(fresh.findings)),
        )
        return self.current
