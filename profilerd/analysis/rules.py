"""Diagnosis rules as data: each has an id, a category, overridable thresholds and a pure check.

Thresholds and the assumptions behind speedup estimates come from ``default_rules.toml``,
overridden by a user's rules file. ``docs/rules.md`` is generated from ``REGISTRY``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from profilerd.analysis import recommendations as recs
from profilerd.analysis.features import Features
from profilerd.model import Finding, Recommendation

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_RULES_FILE = Path(__file__).with_name("default_rules.toml")

Check = Callable[[Features, dict[str, float], dict[str, float]], Finding | None]


@dataclass(frozen=True)
class Rule:
    id: str
    category: str
    title: str
    description: str
    check: Check
    recommendation_ids: tuple[str, ...] = ()


REGISTRY: dict[str, Rule] = {}


def rule(id: str, category: str, title: str, recommendation_ids: tuple[str, ...] = ()) -> Callable[[Check], Check]:
    def register(check: Check) -> Check:
        REGISTRY[id] = Rule(id, category, title, (check.__doc__ or "").strip(), check, recommendation_ids)
        return check

    return register


@dataclass(frozen=True)
class RuleSet:
    """Loaded thresholds: per rule, plus evidence, hysteresis and assumptions."""

    thresholds: dict[str, dict[str, float]]
    min_steps: int = 20
    min_seconds: float = 10.0
    warmup_steps: int = 2
    hysteresis_evaluations: int = 3
    assumptions: dict[str, float] = field(default_factory=dict)
    source: str = str(DEFAULT_RULES_FILE)


def _read(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def load_rules(path: Path | None = None) -> tuple[RuleSet, list[str]]:
    """Defaults merged with ``path``; problems name the key and the file."""
    base = _read(DEFAULT_RULES_FILE)
    problems: list[str] = []
    thresholds = {rid: dict(values) for rid, values in base["rules"].items()}
    evidence = dict(base["evidence"])
    hysteresis = dict(base["hysteresis"])
    assumptions = dict(base["assumptions"])
    if path is not None:
        try:
            user = _read(path)
        except FileNotFoundError:
            return RuleSet(thresholds, **_evidence_kwargs(evidence, hysteresis), assumptions=assumptions), [
                f"{path}: rules file not found"
            ]
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
            return RuleSet(thresholds, **_evidence_kwargs(evidence, hysteresis), assumptions=assumptions), [
                f"{path}: cannot read rules: {exc}"
            ]
        for key in user:
            if key not in ("rules", "evidence", "hysteresis", "assumptions"):
                problems.append(f"{path}: unknown section '{key}'")
        for section, target in (
            ("evidence", evidence),
            ("hysteresis", hysteresis),
            ("assumptions", assumptions),
        ):
            _merge(user.get(section, {}), target, f"{path} [{section}]", problems)
        for rule_id, values in user.get("rules", {}).items():
            if rule_id not in thresholds:
                problems.append(f"{path}: unknown rule '{rule_id}' (known: {', '.join(sorted(thresholds))})")
                continue
            _merge(values, thresholds[rule_id], f'{path} [rules."{rule_id}"]', problems)
    ruleset = RuleSet(
        thresholds,
        **_evidence_kwargs(evidence, hysteresis),
        assumptions=assumptions,
        source=str(path or DEFAULT_RULES_FILE),
    )
    return ruleset, problems


def _merge(values: Any, target: dict[str, Any], where: str, problems: list[str]) -> None:
    if not isinstance(values, dict):
        problems.append(f"{where}: must be a table")
        return
    for key, value in values.items():
        if key not in target:
            problems.append(f"{where}: unknown key '{key}'")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{where}: '{key}' must be a number, got {value!r}")
        elif value < 0:
            problems.append(f"{where}: '{key}' must not be negative")
        else:
            target[key] = value


def _evidence_kwargs(evidence: dict[str, Any], hysteresis: dict[str, Any]) -> dict[str, Any]:
    return {
        "min_steps": int(evidence["min_steps"]),
        "min_seconds": float(evidence["min_seconds"]),
        "warmup_steps": int(evidence["warmup_steps"]),
        "hysteresis_evaluations": max(1, int(hysteresis["evaluations"])),
    }


def _severity(value: float, thresholds: dict[str, float]) -> str | None:
    if value >= thresholds["critical"]:
        return "critical"
    if value >= thresholds["warning"]:
        return "warning"
    return None


def _confidence(features: Features, value: float, threshold: float) -> float:
    """More steps and a wider margin over the threshold give more confidence."""
    sample = min(1.0, features.steps / 200.0)
    margin = min(1.0, (value - threshold) / max(threshold, 1e-6))
    return round(0.5 + 0.25 * sample + 0.25 * max(0.0, margin), 3)


# ---- the rules -------------------------------------------------------------------------
@rule(
    "data.input_wait",
    "data",
    "The training loop waits for input batches",
    (
        "dataloader.num_workers",
        "dataloader.pin_memory",
        "dataloader.persistent_workers",
        "dataloader.prefetch_factor",
    ),
)
def check_input_wait(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Share of step time the training thread spends blocked in DataLoader.__next__."""
    wait = features.fractions["data_wait"]
    severity = _severity(wait, t)
    if severity is None:
        return None
    ctx = features.context
    loader = ctx.dataloader()
    workers = int(loader.get("num_workers") or 0)
    found: list[Recommendation] = [recs.num_workers(features)]
    if (ctx.config or {}).get("device_type") == "cuda" and not loader.get("pin_memory"):
        found.append(recs.pin_memory(features, a["pin_memory_gain"]))
    if workers > 0 and not loader.get("persistent_workers") and features.data_wait_spike_fraction > 0.01:
        found.append(recs.persistent_workers(features))
    saturation = ctx.worker_cpu_max_ratio
    if workers > 0 and saturation is not None and saturation < 0.5:
        found.append(recs.prefetch_factor(features))
    free = ctx.free_cores
    cores = f"; {free:.1f} of {ctx.cpu_count} cores idle" if free is not None and ctx.cpu_count else ""
    evidence = f"{wait:.0%} of step time waiting for batches; {workers} DataLoader workers{cores}"
    metrics = {"data_wait_fraction": wait, "num_workers": float(workers)}
    if free is not None:
        metrics["free_cores"] = free
    if saturation is not None:
        metrics["worker_cpu_max_ratio"] = saturation
    return Finding(
        "data.input_wait",
        "data",
        severity,
        evidence,
        _confidence(features, wait, t["warning"]),
        metrics,
        t,
        tuple(sorted(found, key=lambda r: -r.estimated_speedup)),
    )


@rule("communication.exposed", "communication", "Communication not hidden behind compute")
def check_exposed_comm(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Share of step time in collectives that did not overlap with compute."""
    comm = features.fractions["communication"]
    severity = _severity(comm, t)
    if severity is None:
        return None
    evidence = f"{comm:.0%} of step time in exposed communication"
    return Finding(
        "communication.exposed",
        "communication",
        severity,
        evidence,
        _confidence(features, comm, t["warning"]),
        {"communication_fraction": comm},
        t,
    )


@rule(
    "algorithm.host_overhead",
    "algorithm",
    "Host work between the phases of a step",
    ("loop.host_work", "torch.compile"),
)
def check_host_overhead(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Share of step time outside data wait, forward, backward, optimizer and communication."""
    other = features.fractions["other"]
    severity = _severity(other, t)
    if severity is None:
        return None
    found = [recs.host_work(features, a["host_work_gain"])]
    if (features.context.config or {}).get("device_type") == "cuda":
        found.append(recs.torch_compile(features, a["compile_speedup"], mode="reduce-overhead"))
    evidence = f"{other:.0%} of step time outside data, forward, backward and optimizer (host work)"
    return Finding(
        "algorithm.host_overhead",
        "algorithm",
        severity,
        evidence,
        _confidence(features, other, t["warning"]),
        {"other_fraction": other},
        t,
        tuple(found),
    )


@rule(
    "compute.bound",
    "compute",
    "Compute dominates the step, and runs less efficiently than it could",
    ("amp.autocast", "torch.compile"),
)
def check_compute_bound(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Share of step time in forward, backward and optimizer; recommends cheaper math."""
    compute = features.fractions["compute"]
    if compute < t["info"]:
        return None
    ctx = features.context
    config = ctx.config or {}
    device = config.get("device_type") or "cpu"
    models = ctx.models()
    fp32 = bool(models) and all(set(m.get("parameter_dtypes", {})) <= {"float32"} for m in models)
    autocast_on = bool((config.get("autocast") or {}).get("enabled"))
    compiled = any(m.get("compiled") for m in models)
    found: list[Recommendation] = []
    notes = []
    cpu_amx = "AMX" in str(config.get("cpu_capability") or "").upper()
    if fp32 and not autocast_on and (device == "cuda" or cpu_amx):
        local = a["amp_gpu_speedup"] if device == "cuda" else a["amp_cpu_speedup"]
        found.append(recs.autocast(features, device, local))
        notes.append("fp32 without autocast")
    if models and not compiled:
        found.append(recs.torch_compile(features, a["compile_speedup"]))
        notes.append("not compiled")
    severity = "warning" if any(r.id == "amp.autocast" for r in found) and device == "cuda" else "info"
    detail = f"; {', '.join(notes)}" if notes else ""
    evidence = f"{compute:.0%} of step time in forward, backward and optimizer on {device}{detail}"
    return Finding(
        "compute.bound",
        "compute",
        severity,
        evidence,
        _confidence(features, compute, t["info"]),
        {"compute_fraction": compute},
        t,
        tuple(sorted(found, key=lambda r: -r.estimated_speedup)),
    )


@rule("compute.optimizer_unfused", "compute", "The optimizer updates one tensor at a time", ("optimizer.fused",))
def check_optimizer_unfused(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Optimizer share of step time when the optimizer uses neither foreach nor fused."""
    share = features.phase_fractions["optimizer"]
    if share < t["info"]:
        return None
    for optimizer in features.context.optimizers():
        hyper = optimizer.get("hyperparameters", {})
        if hyper.get("fused") or hyper.get("foreach"):
            continue
        rec = recs.fused_optimizer(features, optimizer, a["fused_optimizer_speedup"])
        evidence = f"{share:.0%} of step time in {optimizer.get('class')}.step() without foreach or fused"
        return Finding(
            "compute.optimizer_unfused",
            "compute",
            "info",
            evidence,
            _confidence(features, share, t["info"]),
            {"optimizer_fraction": share},
            t,
            (rec,),
        )
    return None
