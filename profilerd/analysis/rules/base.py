"""What a rule is, the registry the category modules fill, the rules file loader and the
evidence helpers every category shares."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from profilerd.analysis.features import Features
from profilerd.config import known_key, read_toml
from profilerd.model import Finding

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_RULES_FILE = Path(__file__).parent.parent / "default_rules.toml"

Check = Callable[[Features, dict[str, float], dict[str, float]], Finding | None]


@dataclass(frozen=True)
class Rule:
    id: str
    category: str
    title: str
    description: str
    check: Check
    recommendation_ids: tuple[str, ...] = ()
    # Decisive rules judge run-wide evidence, so they run even before the window holds enough steps.
    decisive: bool = False
    # Correctness rules recommend fixing the training itself; their advice claims no speedup and
    # is never moved to the details for a small estimate.
    correctness: bool = False


REGISTRY: dict[str, Rule] = {}


def rule(
    id: str,
    category: str,
    title: str,
    recommendation_ids: tuple[str, ...] = (),
    *,
    decisive: bool = False,
    correctness: bool = False,
) -> Callable[[Check], Check]:
    def register(check: Check) -> Check:
        description = (check.__doc__ or "").strip()
        REGISTRY[id] = Rule(id, category, title, description, check, recommendation_ids, decisive, correctness)
        return check

    return register


@dataclass(frozen=True)
class RuleSet:
    """Loaded thresholds: per rule, plus evidence, hysteresis and assumptions."""

    thresholds: dict[str, dict[str, float]]
    min_steps: int = 20  # no verdict on fewer steps (after warm-up), unless the evidence is decisive
    min_seconds: float = 10.0  # time a live window spans when it can; less lowers the confidence
    warmup_steps: int = 2
    min_speedup: float = 1.03  # speed recommendations estimated below this go to the details
    hysteresis_evaluations: int = 3
    assumptions: dict[str, float] = field(default_factory=dict)
    source: str = str(DEFAULT_RULES_FILE)


def _read(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        document: dict[str, Any] = tomllib.load(fh)
    return document


def load_rules(path: Path | None = None) -> tuple[RuleSet, list[str]]:
    """Defaults merged with ``path``; problems name the key and the file."""
    base = _read(DEFAULT_RULES_FILE)
    problems: list[str] = []
    thresholds = {rid: dict(values) for rid, values in base["rules"].items()}
    evidence = dict(base["evidence"])
    hysteresis = dict(base["hysteresis"])
    assumptions = dict(base["assumptions"])
    if path is not None:
        user = read_toml(path, "rules file", problems)
        if problems:
            return RuleSet(thresholds, **_evidence_kwargs(evidence, hysteresis), assumptions=assumptions), problems
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
        if not known_key(key, target, where, problems):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
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
        "min_speedup": float(evidence["min_speedup"]),
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


def _nvml_note(features: Features) -> str:
    """NVML's view of the same GPUs over the same window, beside the device clock's."""
    device = features.device
    if device is None:
        return ""
    parts = []
    if device.nvml_utilization_ratio is not None:
        parts.append(f"utilization {device.nvml_utilization_ratio:.0%}")
    if device.nvml_sm_active_ratio is not None:
        parts.append(f"SM active {device.nvml_sm_active_ratio:.0%}")
    return f" (NVML: {', '.join(parts)})" if parts else ""


def _device_metrics(features: Features) -> dict[str, float]:
    """The device clock's numbers behind a finding, where the steps carry device timing."""
    device = features.device
    if device is None:
        return {}
    metrics = {
        "gpu_busy_fraction": device.busy_fraction,
        "gpu_idle_fraction": device.idle_fraction,
        "gpu_idle_data_wait_fraction": device.idle_data_wait_fraction,
        "host_data_wait_fraction": device.host_data_wait_fraction,
        "device_timed_steps": float(device.steps_timed),
    }
    if device.host_ahead_s_p50 is not None:
        metrics["host_ahead_s_p50"] = device.host_ahead_s_p50
    if device.nvml_utilization_ratio is not None:
        metrics["nvml_utilization_ratio"] = device.nvml_utilization_ratio
    if device.nvml_sm_active_ratio is not None:
        metrics["nvml_sm_active_ratio"] = device.nvml_sm_active_ratio
    return metrics


def _on_cuda(features: Features) -> bool:
    return (features.context.config or {}).get("device_type") == "cuda"
